from django.apps import AppConfig


class AccessConfig(AppConfig):
    """Who may call the portal: API tokens (CI and personal) and people's accounts, changed only
    through audited services."""

    name = "access"
    verbose_name = "Access"
