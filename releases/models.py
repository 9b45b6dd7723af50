import re
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

ISSUE_KEY_MAX = 64
BUILD_NUMBER_MAX = 255  # a Jenkins BUILD_TAG holds the job's whole folder path
ISSUE_KEY_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*-[0-9]+$"  # PROJECT-123: the API, the board's search, the lists
_ISSUE_KEY = re.compile(ISSUE_KEY_PATTERN)


def as_issue_key(text: str) -> str | None:
    """`text` read as one issue key, upper-cased as keys are stored (`bizplat-7` -> `BIZPLAT-7`), or
    None when it does not look like one (a version, a name)."""
    text = text.strip()
    if _ISSUE_KEY.fullmatch(text) and len(text) <= ISSUE_KEY_MAX:
        return text.upper()
    return None


def issue_keys_in(prefix: str, text: str) -> list[str]:
    """The issue keys with this prefix named in `text` (a branch name), upper-cased:
    `feature/BIZPLAT-64951-rounding`, `BIZPLAT-12/fix` and `bugfix/bizplat-7-x` all count."""
    prefix = prefix.strip()
    if not prefix or not text:
        return []
    pattern = rf"(?<![A-Za-z0-9]){re.escape(prefix)}-([0-9]{{1,20}})(?![0-9])"
    keys = {f"{prefix.upper()}-{n}" for n in re.findall(pattern, text, flags=re.IGNORECASE)}
    return sorted(k for k in keys if len(k) <= ISSUE_KEY_MAX)  # upper() can grow a string


class ImmutableError(Exception):
    """Raised when code tries to change a release after registration."""


class Application(models.Model):
    """A system released on its own (e.g. MAC); its change tickets carry `issue_key_prefix`."""

    name = models.CharField(max_length=64, unique=True)
    issue_key_prefix = models.CharField(max_length=32, help_text="Issue-tracker key prefix, e.g. BIZPLAT.")
    issue_url_pattern = models.CharField(
        "issue link", max_length=500, blank=True,
        help_text="Where an issue key opens in the tracker: {key} is replaced by the key, "
                  "e.g. https://jira.example.com/browse/{key}. Empty: keys are not linked.",
    )
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        if self.issue_url_pattern and (
            "{key}" not in self.issue_url_pattern or not self.issue_url_pattern.startswith(("https://", "http://"))
        ):
            raise ValidationError({"issue_url_pattern": "An http(s) address containing {key}."})

    def issue_url(self, key: str) -> str:
        """The tracker's address of one issue key, or "" when the application links none."""
        if not self.issue_url_pattern:
            return ""
        return self.issue_url_pattern.replace("{key}", quote(key, safe=""))

    def issue_keys_in(self, text: str) -> list[str]:
        return issue_keys_in(self.issue_key_prefix, text)


class VcsAlias(models.Model):
    """A VCS identity (commit author name or address, PR login) that belongs to a portal user.

    Separation of duties matches release implementers against these, so a developer who commits
    as `jdoe` cannot approve their own change as `john.doe@example.com`.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="vcs_aliases")
    identity = models.CharField(max_length=254, help_text="Stored lower-case.")

    class Meta:
        verbose_name = "VCS alias"
        verbose_name_plural = "VCS aliases"
        constraints = [models.UniqueConstraint(fields=["identity"], name="vcsalias_unique_identity")]

    def __str__(self) -> str:
        return f"{self.identity} -> {self.user}"

    def save(self, *args, **kwargs):
        self.identity = self.identity.strip().lower()
        super().save(*args, **kwargs)


class Build(models.Model):
    """One CI run of one commit on one branch. A finished build's status never changes."""

    class Status(models.TextChoices):
        IN_PROGRESS = "in_progress", "In progress"
        SUCCESSFUL = "successful", "Successful"
        FAILED = "failed", "Failed"

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="builds")
    number = models.CharField(max_length=BUILD_NUMBER_MAX)
    commit = models.CharField(max_length=64)
    branch = models.CharField(max_length=255)
    url = models.CharField(max_length=1000, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices)
    tests_passed = models.PositiveIntegerField(default=0)
    tests_failed = models.PositiveIntegerField(default=0)
    tests_skipped = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["application", "number"], name="build_unique_number"),
            models.CheckConstraint(condition=Q(status__in=["in_progress", "successful", "failed"]),
                                   name="build_status_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.application} build {self.number}"

    @property
    def is_finished(self) -> bool:
        return self.status != self.Status.IN_PROGRESS


class BuildIssue(models.Model):
    """An issue key named in a build's branch (`feature/BIZPLAT-64951-rounding`): where a change is
    before it is released. Append-only, like the other evidence."""

    build = models.ForeignKey(Build, on_delete=models.PROTECT, related_name="issues")
    key = models.CharField(max_length=ISSUE_KEY_MAX, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["build", "key"], name="buildissue_unique_key")]

    def __str__(self) -> str:
        return self.key


class Release(models.Model):
    """An immutable, versioned artifact of an application, cut from a successful build.

    Production gets exactly this row's artifact (same URL, same sha256) that passed the earlier
    environments. The row is never updated (model, queryset and database triggers refuse).
    """

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="releases")
    version = models.CharField(max_length=100)
    build = models.ForeignKey(Build, on_delete=models.PROTECT, related_name="releases")
    artifact_url = models.CharField(max_length=1000)
    artifact_sha256 = models.CharField(max_length=64)
    pull_request_url = models.CharField(max_length=1000, blank=True)
    pull_request_author = models.CharField(max_length=254, blank=True)
    pull_request_reviewers = models.JSONField(default=list, blank=True)
    pull_request_approved_at = models.DateTimeField(null=True, blank=True)
    registration_digest = models.CharField(
        max_length=64, help_text="SHA-256 of the registration payload: tells an identical repeat from a conflict."
    )
    registered_by = models.CharField(max_length=200)
    registered_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-registered_at", "-id"]
        indexes = [models.Index(fields=["-registered_at", "-id"], name="release_latest_idx")]  # the list, newest first
        constraints = [
            models.UniqueConstraint(fields=["application", "version"], name="release_unique_version"),
            models.CheckConstraint(condition=Q(artifact_sha256__regex=r"^[0-9a-f]{64}$"),
                                   name="release_sha256_hex64"),
        ]

    def __str__(self) -> str:
        return f"{self.application} {self.version}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ImmutableError("A release cannot be changed after registration.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise ImmutableError("A release cannot be deleted.")


class ReleaseIssue(models.Model):
    """A change ticket (issue key, e.g. BIZPLAT-64951) carried by a release."""

    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="issues")
    key = models.CharField(max_length=64, db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["release", "key"], name="releaseissue_unique_key")]

    def __str__(self) -> str:
        return self.key


class Implementer(models.Model):
    """A VCS identity that wrote or committed the change. `user` is resolved when known, but the
    identity counts for separation of duties even if it matches no user."""

    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="implementers")
    identity = models.CharField(max_length=254, help_text="Stored lower-case.")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["release", "identity"], name="implementer_unique_identity")
        ]

    def __str__(self) -> str:
        return self.identity
