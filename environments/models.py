from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrulestr
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

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
    playbook = models.CharField(
        max_length=255, default="deploy_demo.yml",
        help_text="Playbook file: in the portal's bundled playbooks, or in the playbook repository if one is set.",
    )
    inventory = models.TextField(
        blank=True, help_text="Inventory: a file path, or inline INI. Empty: this machine (local connection).",
    )
    playbook_repo = models.CharField(
        max_length=1000, blank=True,
        help_text="Git repository (URL or local path) holding the playbooks; cloned for each deployment.",
    )
    playbook_ref = models.CharField(max_length=255, blank=True, default="", help_text="Branch, tag or commit.")

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
            models.CheckConstraint(
                condition=Q(restricted=False) | Q(auto_deploy=False), name="environment_restricted_not_auto"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.application} {self.name}"

    def clean(self):
        if self.restricted and self.auto_deploy:
            raise ValidationError({"auto_deploy": "A restricted environment never deploys by itself."})
        if self.restricted and self.required_approvals < 1:
            raise ValidationError({"required_approvals": "A restricted environment needs at least one approval."})
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


@dataclass(frozen=True)
class FreezeOccurrence:
    """One concrete period of a freeze window (a one-off window has one)."""

    window: FreezeWindow
    starts_at: dt.datetime
    ends_at: dt.datetime

    @property
    def reason(self) -> str:
        return self.window.reason


WEEKEND_RULE = "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0"
MONTH_END_RULE = "FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-2,-1;BYHOUR=0;BYMINUTE=0"
FREEZE_PRESETS = {  # name: (label, rule, length of each occurrence, time zone or None for the chosen one)
    "weekend": ("Every Friday 16:00 to Monday 06:00, Europe/Berlin", WEEKEND_RULE, dt.timedelta(hours=62),
                "Europe/Berlin"),
    "month_end": ("The last 2 working days of the month, whole days in the chosen time zone", MONTH_END_RULE,
                  dt.timedelta(days=1), None),
}


class FreezeWindow(models.Model):
    """A period in which an environment takes no deployment except an emergency one (rule 7).

    For one environment, or for every environment of an application. One-off: from `starts_at` to
    `ends_at`. Recurring: an iCalendar recurrence rule (RFC 5545 RRULE, e.g.
    `FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0` for every Friday 16:00) read in `timezone`, each
    occurrence lasting `duration` of wall-clock time (so "Friday 16:00 to Monday 06:00" stays so across
    a daylight-saving change); the series runs from `starts_at` and stops at `ends_at`.
    """

    environment = models.ForeignKey(
        Environment, null=True, blank=True, on_delete=models.CASCADE, related_name="freeze_windows"
    )
    application = models.ForeignKey(
        Application, null=True, blank=True, on_delete=models.CASCADE, related_name="freeze_windows",
        help_text="Freeze every environment of this application (instead of one environment).",
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(help_text="End of the window; for a recurring one, when the series stops.")
    reason = models.CharField(max_length=255)
    recurrence = models.CharField(
        max_length=500, blank=True,
        help_text="iCalendar RRULE, e.g. FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0 (empty: one-off).",
    )
    duration = models.DurationField(null=True, blank=True, help_text="Length of each occurrence (recurring).")
    timezone = models.CharField(max_length=64, default="UTC", help_text="IANA time zone the rule is read in.")

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(condition=Q(ends_at__gt=F("starts_at")), name="freezewindow_ends_after_start"),
            models.CheckConstraint(
                condition=Q(environment__isnull=True, application__isnull=False)
                | Q(environment__isnull=False, application__isnull=True),
                name="freezewindow_one_target",
            ),
            models.CheckConstraint(
                condition=Q(recurrence="") | Q(duration__isnull=False), name="freezewindow_recurring_has_duration"
            ),
        ]

    def __str__(self) -> str:
        target = self.environment or f"{self.application} (all environments)"
        if self.recurrence:
            return f"{target} frozen: {self.schedule}"
        return f"{target} frozen {self.starts_at:%Y-%m-%d %H:%M} - {self.ends_at:%Y-%m-%d %H:%M}"

    @property
    def schedule(self) -> str:
        """How a person reads the schedule: a preset's words, else the rule with its length and zone."""
        if not self.recurrence:
            return "one-off"
        for label, rule, duration, zone in FREEZE_PRESETS.values():
            if self.recurrence == rule and self.duration == duration and (zone is None or zone == self.timezone):
                return label if zone else f"{label} ({self.timezone})"
        return f"{self.recurrence}, {self.duration} each ({self.timezone})"

    def clean(self):
        if (self.environment_id is None) == (self.application_id is None):
            raise ValidationError("A freeze window is for one environment or for all environments of an application.")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValidationError({"timezone": f"Unknown time zone {self.timezone!r}."}) from None
        if self.recurrence:
            if not self.duration or self.duration <= dt.timedelta(0):
                raise ValidationError({"duration": "A recurring freeze needs the length of each occurrence."})
            try:
                self._rule(zone)
            except (ValueError, TypeError) as exc:
                raise ValidationError({"recurrence": f"Not an iCalendar recurrence rule: {exc}"}) from None

    def _rule(self, zone: ZoneInfo):
        start = self.starts_at.astimezone(zone).replace(tzinfo=None)
        return rrulestr(self.recurrence, dtstart=start, ignoretz=True)

    def occurrences(self, since: dt.datetime, until: dt.datetime) -> list[FreezeOccurrence]:
        """The periods of this window that overlap [since, until), in order."""
        if not self.recurrence:
            if self.starts_at < until and self.ends_at > since:
                return [FreezeOccurrence(self, self.starts_at, self.ends_at)]
            return []
        zone = ZoneInfo(self.timezone)
        rule = self._rule(zone)
        local_since = (since.astimezone(zone) - self.duration).replace(tzinfo=None)
        local_until = until.astimezone(zone).replace(tzinfo=None)
        found = []
        for start in rule.between(local_since, local_until, inc=True):
            begins = start.replace(tzinfo=zone).astimezone(dt.UTC)
            ends = min((start + self.duration).replace(tzinfo=zone).astimezone(dt.UTC), self.ends_at)
            if begins < self.ends_at and begins < until and ends > since and begins >= self.starts_at:
                found.append(FreezeOccurrence(self, begins, ends))
        return found

    def active_at(self, moment: dt.datetime) -> FreezeOccurrence | None:
        occurrences = self.occurrences(moment, moment + dt.timedelta(microseconds=1))
        return occurrences[-1] if occurrences else None


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
        SUPERSEDED = "superseded", "Superseded"
        REFUSED = "refused", "Refused"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    OPEN_STATES = (State.AWAITING_APPROVAL, State.QUEUED, State.RUNNING)
    FINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.REJECTED, State.INTERRUPTED,
                    State.SUPERSEDED, State.REFUSED)

    release = models.ForeignKey(Release, on_delete=models.PROTECT, related_name="deployments")
    environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="deployments")
    state = models.CharField(max_length=20, choices=State.choices)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    requested_by_label = models.CharField(max_length=200, help_text="User name, ci:<token name> or system.")
    requested_via = models.CharField(max_length=20)
    requested_token_id = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The API token the request came with (a revoked token's requests end)."
    )
    automatic = models.BooleanField(
        default=False, help_text="Asked for by the portal or CI, not by a person: a newer one may supersede it."
    )
    requested_at = models.DateTimeField(default=timezone.now)  # the service gives its own now: queued_at's too
    expires_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(
        null=True, blank=True, help_text="When it passed the rules and joined the queue: the queue's order."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    promoted_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="The succeeded deployment to the previous environment that allowed this one.",
    )
    required_approvals = models.PositiveSmallIntegerField(
        default=0, help_text="The environment's required approvals when this was requested (evidence)."
    )
    emergency = models.BooleanField(default=False)
    emergency_reason = models.TextField(blank=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_comment = models.TextField(blank=True)
    result_detail = models.TextField(blank=True)
    refusal_code = models.CharField(
        max_length=40, blank=True, help_text="The rule that refused it when it came to the front of its queue."
    )
    superseded_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+",
        help_text="The newer automatic deployment that replaced this one while it waited.",
    )
    engine = models.CharField(
        max_length=200, blank=True,
        help_text="host:pid of the deploy worker running the playbook; only that host kills a leftover playbook.",
    )
    sod_checks = models.JSONField(
        "separation-of-duties checks", default=list, blank=True, help_text="The checks that were made and passed."
    )
    progress = models.JSONField(default=dict, blank=True)
    playbook_commit = models.CharField(
        max_length=120, blank=True,
        help_text="Git commit of the playbooks used, or bundled:<sha256> of the portal's own playbooks.",
    )
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life of the deploy job.")
    cancel_requested_at = models.DateTimeField(
        null=True, blank=True, help_text="Set when someone cancels a running deployment; the deploy job stops it."
    )

    class Meta:
        ordering = ["-requested_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["environment"], condition=Q(state="running"), name="deployment_one_running_per_environment",
            ),
            models.CheckConstraint(
                condition=Q(state__in=["awaiting_approval", "queued", "running", "succeeded", "failed",
                                  "cancelled", "rejected", "interrupted", "superseded", "refused"]),
                name="deployment_state_valid",
            ),
            models.CheckConstraint(
                condition=Q(superseded_by__isnull=True) | Q(state="superseded"), name="deployment_superseded_state",
            ),
            models.CheckConstraint(
                condition=Q(emergency=False) | ~Q(emergency_reason=""), name="deployment_emergency_has_reason"
            ),
        ]
        indexes = [
            models.Index(fields=["release", "environment", "state"], name="deployment_release_env_idx"),
            models.Index(fields=["environment", "state", "queued_at"], name="deployment_queue_idx"),
            # what runs in an environment now: its last succeeded deployment (the board, the API)
            models.Index(fields=["environment", "state", "-finished_at", "-id"], name="deployment_current_idx"),
            models.Index(fields=["-requested_at", "-id"], name="deployment_latest_idx"),  # the list, newest first
            models.Index(fields=["environment", "-requested_at", "-id"], name="deployment_env_last_idx"),  # its last
            # the open exceptions (the board, the exceptions report): emergencies not reviewed yet, oldest first
            models.Index(fields=["requested_at", "id"], condition=Q(emergency=True, reviewed_at__isnull=True),
                         name="deployment_unreviewed_idx"),
            # the list sorted by a column, either way (edge.lists.LargeChangeList: its tiebreak, the id, goes
            # the column's way): a page is read from the index, not by sorting every deployment. Not by
            # finished_at: the planner took such an index for an environment's last success (migration 0015)
            models.Index(fields=["state", "id"], name="deployment_by_state_idx"),  # and a state's deployments
            models.Index(fields=["requested_by_label", "id"], name="deployment_by_requester_idx"),
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


class DeploymentEvent(models.Model):
    """One event of the playbook run (from ansible-runner), stored as it comes: the progress a person
    watches and the output log kept with the deployment."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    counter = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    event = models.CharField(max_length=64)
    host = models.CharField(max_length=255, blank=True)
    task = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=20, blank=True, help_text="ok, changed, failed, unreachable, skipped")
    stdout = models.TextField(blank=True)

    class Meta:
        ordering = ["deployment", "counter"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "counter"], name="deploymentevent_unique_counter"),
        ]

    def __str__(self) -> str:
        return f"#{self.deployment_id}.{self.counter} {self.event} {self.host}".strip()


class NotificationChannel(models.Model):
    """Where an application's deployments are announced: issue tracker, chat, monitoring."""

    class Kind(models.TextChoices):
        ISSUE_TRACKER = "issue_tracker", "Issue tracker (Jira REST: comment on each issue key)"
        CHAT = "chat", "Chat webhook (Slack-compatible JSON)"
        MONITORING = "monitoring", "Monitoring deploy marker (Grafana annotations API)"

    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="notification_channels")
    kind = models.CharField(max_length=20, choices=Kind.choices)
    url = models.CharField(max_length=1000, help_text="Base URL (issue tracker, monitoring) or the webhook URL.")
    credential = models.CharField(
        max_length=500, blank=True,
        help_text="Token sent as a bearer token (or user:token for basic auth). Never logged nor queued.",
    )
    enabled = models.BooleanField(default=True)

    class Meta:
        ordering = ["application__name", "kind"]
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=["issue_tracker", "chat", "monitoring"]),
                                   name="notificationchannel_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.application} {self.get_kind_display()}"


class NotificationDelivery(models.Model):
    """One attempt to tell a channel about a deployment (a failing receiver is retried with backoff)."""

    channel = models.ForeignKey(NotificationChannel, on_delete=models.CASCADE, related_name="deliveries")
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="notifications")
    attempt = models.PositiveSmallIntegerField()
    target = models.CharField(max_length=1000, help_text="The URL posted to (no credentials).")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    delivered = models.BooleanField(default=False)
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["sent_at", "id"]
        verbose_name_plural = "notification deliveries"

    def __str__(self) -> str:
        return f"{self.channel} #{self.deployment_id} attempt {self.attempt}"


class ControlChange(models.Model):
    """A change that makes a restricted environment's control weaker, proposed by one administrator
    and applied only when a different one approves it (the four-eyes rule on the controls themselves).

    `changes` holds {field: [from, to]} for an environment's settings, or, for a freeze window,
    {"ends_at": [from, to]} (shortened) or {"removed": [true, true]} (removed while it runs).
    Making a control stricter never needs a proposal: it applies at once.
    """

    class State(models.TextChoices):
        PROPOSED = "proposed", "Proposed"
        APPLIED = "applied", "Approved and applied"
        REJECTED = "rejected", "Rejected"

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="control_changes")
    environment = models.ForeignKey(
        Environment, null=True, blank=True, on_delete=models.PROTECT, related_name="control_changes",
        help_text="Empty for a freeze window of every environment of the application.",
    )
    freeze_window = models.ForeignKey(
        FreezeWindow, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The freeze window to shorten or remove, for a freeze change.",
    )
    changes = models.JSONField(help_text="{field: [from, to]}")
    reason = models.TextField()
    state = models.CharField(max_length=20, choices=State.choices, default=State.PROPOSED)
    proposed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    proposed_at = models.DateTimeField(auto_now_add=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)

    class Meta:
        ordering = ["-proposed_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=["proposed", "applied", "rejected"]),
                                   name="controlchange_state_valid"),
            models.CheckConstraint(condition=~Q(decided_by=F("proposed_by")), name="controlchange_four_eyes"),
            models.CheckConstraint(condition=~Q(reason=""), name="controlchange_has_reason"),
        ]

    def __str__(self) -> str:
        return f"control change #{self.pk} on {self.environment or self.application}"

    def summary(self) -> str:
        if "removed" in self.changes:
            return "end the running freeze window"
        shown = {name: pair for name, pair in self.changes.items() if not (name == "promotes_from" and "path" in
                                                                            self.changes)}  # the path says it by name
        return "; ".join(_change_text(name, old, new) for name, (old, new) in sorted(shown.items()))


def _change_text(name: str, old, new) -> str:
    if name == "path":  # the environments a release passes first, in the order it passes them
        def path(names):
            return " then ".join(reversed(names)) or "none (it starts a promotion path)"
        return f"environments passed before it: {path(old)} -> {path(new)}"
    return f"{name}: {old!r} -> {new!r}"
