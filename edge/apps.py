"""The admin, with the portal's own site (edge.site.PortalAdminSite) as `admin.site`."""

from django.contrib.admin.apps import AdminConfig


class PortalAdminConfig(AdminConfig):
    default_site = "edge.site.PortalAdminSite"
