from django.apps import AppConfig


class EnvironmentsConfig(AppConfig):
    name = "environments"

    def ready(self):
        from core import events
        from environments import services

        # A new release goes on to the auto-deploy environments that start its promotion path.
        events.subscribe(events.RELEASE_REGISTERED, services.auto_deploy_next)
