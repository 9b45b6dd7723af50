import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
site = get_wsgi_application()  # sets Django up

from portal.handlers import ApiHandler, Dispatch  # noqa: E402 - needs the settings set up above

application = Dispatch(site, ApiHandler())
