from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q

from releases.models import Application, Release


class Environment(models.Model):
    """A deploy target of one application, placed on a promotion path.

    A release may go here only after a succeeded deployment to `promotes_from` (rule 1).
    `restricted` environments are SOX-controlled: releasers only, separation of duties, approvals.
    """

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="environments")
    name = models.CharField(max_length=64)
    promotes_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="promotes_to",
        help_text="The environment a release must have reached first.",
    )
    restricted = models.BooleanField(default=False, help_text="SOX-controlled: releasers and approvals only.")
    auto_deploy = models.BooleanField(default=False)
    required_approvals = models.PositiveSmallIntegerField(default=0)
    requires_code_review = models.BooleanField(
        default=False, help_text="The release's pull request needs a reviewer who is neither author nor implementer."
    )
    playbook = models.CharField(max_length=255, default="deploy_demo.yml")
    inventory = models.TextField(blank=True, help_text="Inventory path or inline INI inventory.")

    class Meta:
        ordering = ["application__name", "id"]
        permissions = [
            ("deploy_environment", "Can request deployments to this environment"),
            ("approve_environment", "Can approve deployments to this environment"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["application", "name"], name="environment_unique_name"),
            models.CheckConstraint(condition=~Q(promotes_from=F("id")), name="environment_not_own_source"),
            models.CheckConstraint(
                condition=Q(restricted=False) | Q(required_approvals__gte=1),
                name="environment_restricted_needs_approval",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.application} {self.name}"

    def clean(self):
        source = self.promotes_from
        if source is None:
            return
        if source.application_id != self.application_id:
            raise ValidationError({"promotes_from": "A promotion path stays within one application."})
        seen = {self.pk}
        while source is not None:
            if source.pk in seen:
                raise ValidationError({"promotes_from": "This promotion path would form a cycle."})
            seen.add(source.pk)
            source = source.promotes_from


class FreezeWindow(models.Model):
    """A period in which an environment takes no deployment except an emergency one (rule 7)."""

    environment = models.ForeignKey(Environment, on_delete=models.CASCADE, related_name="freeze_windows")
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=255)

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__gt=F("starts_at")), name="freezewindow_ends_after_start")
        ]

    def __str__(self) -> str:
        return f"{self.environment} frozen {self.starts_at:%Y-%m-%d %H:%M} - {self.ends_at:%Y-%m-%d %H:%M}"


class Deployment(models.Model):
    """One release going to one environment: a state machine driven only by environments.services."""

    class State(models.TextChoices):
        AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"
        REJECTED = "rejected", "Rejected"
        INTERRUPTED = "interrupted", "Interrupted"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    OPEN_STATES = (State.AWAITING_APPROVAL, State.QUEUED, State.RUNNING)
    FINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.REJECTED, State.INTERRUPTED)

    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="deployments")
    environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="deployments")
    state = models.CharField(max_length=20, choices=State.choices, db_index=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    requested_by_label = models.CharField(max_length=200, help_text="User name, ci:<token name> or system.")
    requested_via = models.CharField(max_length=20)
    requested_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    promoted_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="The succeeded deployment to the previous environment that allowed this one.",
    )
    emergency = models.BooleanField(default=False)
    emergency_reason = models.TextField(blank=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_comment = models.TextField(blank=True)
    result_detail = models.TextField(blank=True)
    sod_checks = models.JSONField(default=list, blank=True, help_text="Separation-of-duties checks that passed.")
    progress = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["environment"],
                condition=Q(state__in=["queued", "running"]),
                name="deployment_one_active_per_environment",
            ),
            models.CheckConstraint(
                condition=Q(state__in=["awaiting_approval", "queued", "running", "succeeded", "failed",
                                  "cancelled", "rejected", "interrupted"]),
                name="deployment_state_valid",
            ),
            models.CheckConstraint(
                condition=Q(emergency=False) | ~Q(emergency_reason=""), name="deployment_emergency_has_reason"
            ),
        ]
        indexes = [
            models.Index(fields=["release", "environment", "state"], name="deployment_release_env_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.release} -> {self.environment.name}"


class Approval(models.Model):
    """One person's decision on one deployment."""

    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"

    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="approvals")
    approver = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    decision = models.CharField(max_length=10, choices=Decision.choices)
    comment = models.TextField(blank=True)
    decided_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["decided_at"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "approver"], name="approval_one_decision_per_approver"),
            models.CheckConstraint(condition=Q(decision__in=["approve", "reject"]), name="approval_decision_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.approver} {self.decision} #{self.deployment_id}"
