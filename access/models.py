import hashlib

from django.conf import settings
from django.db import models
from django.db.models import Q

from releases.models import Application


def hash_token(raw: str) -> str:
    """Tokens are 256-bit random secrets, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token for the API, stored hashed and shown once.

    CI tokens act for CI on the listed applications and never on restricted environments.
    Personal tokens act as their user, with that user's permissions.
    """

    class Kind(models.TextChoices):
        CI = "ci", "CI"
        PERSONAL = "personal", "Personal"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    name = models.CharField(max_length=100)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="api_tokens",
        help_text="The person a personal token acts as.",
    )
    applications = models.ManyToManyField(Application, blank=True, related_name="ci_tokens")
    key_prefix = models.CharField(max_length=12, help_text="First characters of the token, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_by_label = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "portal_apitoken"  # the table it had when the portal app held it
        verbose_name = "API token"
        constraints = [
            models.CheckConstraint(
                condition=Q(kind="ci") | Q(user__isnull=False), name="apitoken_personal_has_user"
            ),
            models.CheckConstraint(condition=Q(kind__in=["ci", "personal"]), name="apitoken_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} token {self.name} ({self.key_prefix}...)"
