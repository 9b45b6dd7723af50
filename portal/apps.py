from django.apps import AppConfig
from django.db.backends.signals import connection_created

from core import timestamps


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal access"

    def ready(self):
        connection_created.connect(timestamps.use_c_loader, dispatch_uid="core.timestamps")
