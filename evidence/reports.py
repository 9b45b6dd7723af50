"""SOX evidence: the reports an auditor samples and tests, streamed with flat memory.

Each report is a header and rows from database iterators (server-side cursors on PostgreSQL),
written as RFC 4180 CSV with spreadsheet-formula cells neutralized (OWASP). While the CSV streams,
its SHA-256 and row count are computed for the manifest, which also names the audit chain head
taken when the report started. Generating a report is an audit event.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Aggregate, CharField, F, Max, Min, OuterRef, Q, Subquery
from django.db.models.functions import Cast
from django.utils import timezone

from audit import chain
from audit.actors import Actor
from audit.models import AuditEvent
from core.times import iso
from environments import policy
from environments import selectors as env_selectors
from environments.models import Approval, ControlChange, Deployment, Environment
from evidence import pg_reports, reconcile
from evidence.columns import AUDIT_COLUMNS, CHANGES_COLUMNS, DANGEROUS_FIRST, Period
from releases.models import Implementer, ReleaseIssue

CHUNK = 64 * 1024
ITERATOR_CHUNK = 5000


def safe_cell(value) -> str:
    """One CSV cell: times in UTC ISO 8601, lists joined with ';', formula starters neutralized."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, list | tuple):
        value = ";".join(str(v) for v in value)
    text = str(value)
    if text.startswith(DANGEROUS_FIRST):
        return "'" + text
    return text


class ListAgg(Aggregate):
    """Values joined with ';' (STRING_AGG on PostgreSQL, GROUP_CONCAT on SQLite)."""

    function = "STRING_AGG"
    template = "%(function)s(%(expressions)s, ';' ORDER BY %(expressions)s)"
    output_field = CharField()

    def as_sqlite(self, compiler, connection, **extra):
        return super().as_sql(compiler, connection, function="GROUP_CONCAT",
                              template="%(function)s(%(expressions)s, ';')", **extra)


def _sorted_list(text: str | None) -> str:
    return ";".join(sorted(text.split(";"))) if text else ""


# --- changes ---------------------------------------------------------------------------------------




def _per_release(model, field_name):
    return Subquery(
        model.objects.filter(release=OuterRef("release")).order_by().values("release")
        .annotate(v=ListAgg(field_name)).values("v")[:1]
    )


def _changes_queryset(period: Period):
    approvals = Approval.objects.filter(deployment=OuterRef("pk"), decision=Approval.Decision.APPROVE).order_by()
    # what ran in the environment when the attempt started: the last success there before it
    replaced = Deployment.objects.filter(
        environment=OuterRef("environment"), state=Deployment.State.SUCCEEDED, finished_at__lt=OuterRef("started_at")
    ).order_by("-finished_at", "-id")
    events = AuditEvent.objects.filter(
        object_type="environments.deployment", object_id=Cast(OuterRef("pk"), CharField())
    ).order_by().values("object_type")
    return reconcile.restricted_requested(period).order_by("requested_at", "id").annotate(
        issue_keys=_per_release(ReleaseIssue, "key"),
        implementer_list=_per_release(Implementer, "identity"),
        approver_list=Subquery(approvals.values("deployment").annotate(v=ListAgg("approver__username"))
                               .values("v")[:1]),
        last_approved_at=Subquery(approvals.values("deployment").annotate(v=Max("decided_at")).values("v")[:1]),
        audit_first=Subquery(events.annotate(v=Min("seq")).values("v")[:1]),
        audit_last=Subquery(events.annotate(v=Max("seq")).values("v")[:1]),
        replaced_version=Subquery(replaced.values("release__version")[:1]),
        replaced_release=Subquery(replaced.values("release_id")[:1]),
    ).values_list(
        "pk", "release__application__name", "environment__name", "release__version", "release__artifact_sha256",
        "release__build__number", "release__build__url", "release__build__tests_passed",
        "release__build__tests_failed", "issue_keys", "implementer_list", "release__pull_request_url",
        "release__pull_request_reviewers", "playbook_commit", "requested_by_label", "requested_at", "approver_list",
        "last_approved_at", "required_approvals", "emergency", "emergency_reason", "reviewed_by__username",
        "reviewed_at", "promoted_from_id", "promoted_from__finished_at", "started_at", "finished_at", "state",
        "sod_checks", "audit_first", "audit_last", "result_detail", "review_comment", "replaced_version",
        "replaced_release", "release_id",
    )


def changes_rows(period: Period) -> Iterator[tuple]:
    for row in _changes_queryset(period).iterator(chunk_size=ITERATOR_CHUNK):
        *row, replaced_release, release_id = row
        row[9], row[10], row[16] = _sorted_list(row[9]), _sorted_list(row[10]), _sorted_list(row[16])
        # a rollback: the attempt took the environment back to a release older than the one it ran
        yield [*row, policy.is_rollback(release_id, replaced_release)]


# --- exceptions ------------------------------------------------------------------------------------

EXCEPTIONS_COLUMNS = [
    "kind", "status", "time", "deployment_id", "application", "environment", "version", "actor", "rule",
    "detail", "audit_seq",
]
def _about(d: Deployment | None) -> tuple:
    """An exception's time, deployment_id, application, environment and version cells (blank: none)."""
    if d is None:
        return "", "", "", "", ""
    return d.requested_at, d.pk, d.release.application.name, d.environment.name, d.release.version


def _sod_missing(deployment: Deployment) -> set[str]:
    """Separation-of-duties checks a restricted deployment that went ahead should carry (the policy's list)."""
    required = policy.required_sod_checks(restricted=True, emergency=deployment.emergency,
                                          reviewed=deployment.reviewed_at is not None)
    return required - set(deployment.sod_checks or [])


def _actor(event: AuditEvent) -> str:
    """Who acted, as an exception row names them: a command's event (`system`) with the operating-system
    account that ran it, which its event holds."""
    shell = event.data.get("os_account")
    return f"{event.actor_username} (shell account {shell})" if shell else event.actor_username


def _adopted(data: dict) -> str:
    """What an adopted right is, in a few words."""
    if "changed" in data:
        return ", ".join(f"{flag} {change.get('from')} -> {change.get('to')}"
                         for flag, change in data["changed"].items())
    if "added" in data:
        return "holds " + ", ".join(data["added"])
    return f"{data.get('user')} a member"


def exceptions_rows(period: Period) -> Iterator[tuple]:
    restricted = reconcile.restricted_requested(period).select_related("release__application", "environment",
                                                                        "reviewed_by")
    # Every emergency requested in the period, and every earlier one still open in it (unreviewed, or
    # reviewed only within or after it): an open exception does not drop out of the next period's report.
    emergencies = Deployment.objects.filter(
        Q(requested_at__gte=period.since) | Q(reviewed_at__isnull=True) | Q(reviewed_at__gte=period.since),
        environment__restricted=True, emergency=True, requested_at__lt=period.until,
    ).select_related("release__application", "environment", "reviewed_by")
    if period.application:
        emergencies = emergencies.filter(release__application__name=period.application)
    emergencies = list(emergencies.order_by(F("reviewed_at").asc(nulls_first=True), "requested_at"))
    # Each one's request in the chain: its event, and what it went past (a freeze).
    requests = env_selectors.requests_in_the_chain([d.pk for d in emergencies])
    for d in emergencies:
        if d.reviewed_at:
            took = (d.reviewed_at - d.requested_at).days
            late = " (LATE)" if policy.review_overdue(d.requested_at, reviewed_at=d.reviewed_at) else ""
            status = f"reviewed by {d.reviewed_by.username} at {iso(d.reviewed_at)}, after {took} days{late}"
        else:
            age = (timezone.now() - d.requested_at).days
            status = f"UNREVIEWED, {age} days old" + (" (OVERDUE)" if policy.review_overdue(d.requested_at) else "")
        seq, skipped = requests.get(d.pk, ("", None))
        went_past = f" (it went past {skipped})" if skipped else ""
        yield ("emergency", status, *_about(d), d.requested_by_label, "EMERGENCY", d.emergency_reason + went_past, seq)

    in_period = events = AuditEvent.objects.filter(created_at__gte=period.since, created_at__lt=period.until)
    if period.application:
        events = events.filter(Q(data__application=period.application) | Q(object_repr__startswith=period.application))
    for e in events.filter(action__endswith=".refused").order_by("seq").iterator(chunk_size=ITERATOR_CHUNK):
        yield ("refusal", "refused", e.created_at, e.data.get("deployment_id", ""), e.data.get("application", ""),
               e.data.get("environment", ""), e.data.get("version", ""), _actor(e), e.code,
               f"{e.action}: {e.data.get('detail', '')}", e.seq)
    # A group's new member holds whatever the group holds, whatever the application: listed in every report.
    grants = (events.filter(action="environment.grant") | in_period.filter(action="group.add_member")).exclude(
        data__has_key="adopted").order_by("seq")
    for e in grants.iterator(chunk_size=ITERATOR_CHUNK):
        who = e.data.get("user") or f"group {e.data.get('group')}"
        what = (f"{e.data.get('permission')} on {e.data.get('environment')} to {who}" if e.action == "environment.grant"
                else f"{e.data.get('user')} added to group {e.data.get('group')}")
        yield ("grant", "granted", e.created_at, "", "", "", "", _actor(e), e.action, what, e.seq)

    # Rights found made outside the portal (or before it audited them) and recorded by adopt_rights.
    adopted = in_period.filter(action__in=reconcile.ADOPTED_ACTIONS, data__has_key="adopted").order_by("seq")
    for e in adopted.iterator(chunk_size=ITERATOR_CHUNK):
        yield ("adopted_right", "adopted", e.created_at, "", "", "", "", _actor(e), "RIGHT_MADE_OUTSIDE_PORTAL",
               f"{e.action} {e.object_repr}: {_adopted(e.data)}; reason: {e.data.get('adopted')}", e.seq)

    changes = ControlChange.objects.filter(proposed_at__gte=period.since, proposed_at__lt=period.until).select_related(
        "environment__application", "proposed_by", "decided_by").order_by("proposed_at", "id")
    if period.application:
        changes = changes.filter(environment__application__name=period.application)
    changes = list(changes)  # a few a period
    # Each one's proposal and decision in the chain: the row's audit_seq, and the decision's in its detail.
    seqs = {(object_id, action): seq for object_id, action, seq in AuditEvent.objects.filter(
        object_type="environments.controlchange", object_id__in=[str(c.pk) for c in changes],
        action__in=("control_change.propose", "control_change.approve", "control_change.reject"),
    ).values_list("object_id", "action", "seq")}
    for c in changes:
        decision = seqs.get((str(c.pk), "control_change.reject" if c.state == c.State.REJECTED
                             else "control_change.approve"))
        decided = (f"; {c.get_state_display().lower()} by {c.decided_by.username} at {iso(c.decided_at)}"
                   + (f" (audit event {decision})" if decision else "")
                   if c.decided_by_id else "; waiting for a second administrator")
        yield ("control_change", c.state, c.proposed_at, "", c.environment.application.name, c.environment.name,
               "", c.proposed_by.username, "CONTROL_WEAKENED",
               f"{c.summary()}; reason: {c.reason}; proposed by {c.proposed_by.username}{decided}",
               seqs.get((str(c.pk), "control_change.propose"), ""))

    went_ahead = restricted.exclude(queued_at__isnull=True).order_by("requested_at", "id")
    for d in went_ahead.iterator(chunk_size=ITERATOR_CHUNK):
        missing = _sod_missing(d)
        if missing:
            yield ("sod_incomplete", "EXCEPTION", *_about(d), d.requested_by_label, "SEPARATION_OF_DUTIES",
                   "missing checks: " + ";".join(sorted(missing)), "")

    # The tables these rows come from, read again against the audit chain: a row changed outside the
    # portal (by SQL) shows here (evidence.reconcile).
    for m in reconcile.mismatches(period):
        yield ("evidence_mismatch", "EXCEPTION", *_about(m.deployment), "", "TABLE_DIFFERS_FROM_AUDIT_CHAIN",
               m.sentence(), "")


# --- access ----------------------------------------------------------------------------------------

ACCESS_COLUMNS = ["application", "environment", "username", "email", "permission", "via", "since", "since_audit_seq",
                  "conflict", "conflict_releases", "changed_by", "change"]
ACCOUNT_ACTIONS = ("user.create", "user.change", "user.set_password", "user.permissions", "user.delete")
# What changes the rights of a group's members (the row names the group; its members hold what it holds).
GROUP_ACTIONS = ("group.add_member", "group.remove_member", "group.permissions", "group.rename", "group.delete")
# Who may deploy to or approve for an environment, given and taken away.
GRANT_ACTIONS = ("environment.grant", "environment.revoke")
# What identifies a person (separation of duties matches implementers by user name and e-mail) and
# what lets them in.
ACCOUNT_FIELDS = ("is_active", "is_staff", "is_superuser", "username", "email")


def access_rows(period: Period) -> Iterator[tuple]:
    environments = Environment.objects.filter(restricted=True).select_related("application").order_by(
        "application__name", "name")
    if period.application:
        environments = environments.filter(application__name=period.application)
    rights = defaultdict(list)  # the rights held now, each with the events the chain gave it by
    for right in reconcile.held_rights(environments):
        if right.user.is_active:
            rights[right.environment.pk].append(right)
    for env in environments:
        if not rights[env.pk]:
            continue
        implementers = _implementers_deployed(env, period)
        people = policy.identities_of_users(r.user.pk for r in rights[env.pk])
        by_name = sorted(rights[env.pk], key=lambda r: (r.user.username, r.codename, r.group.name if r.group else ""))
        for right in by_name:
            user, since = right.user, right.since()
            conflicts = sorted(implementers.implemented_by(user, people[user.pk]))
            yield (env.application.name, env.name, user.username, user.email, right.codename,
                   f"group {right.group.name}" if right.group else "direct", since.created_at if since else "",
                   since.seq if since else "", bool(conflicts), conflicts, "", "")
    yield from account_rows(period)


def _account_changes(event: AuditEvent) -> Iterator[tuple[str, str, bool]]:
    """(what, change, conflict) for one administrator action on an account. A conflict is a password
    someone set for another person (they can sign in as them) or a change to one's own account."""
    data = event.data
    by_other = data.get("by_another_person", True)
    if event.action == "user.set_password":
        if by_other:
            usable = (data.get("usable_password") or {}).get("to", True)
            yield "password", "set by another person" if usable else "password sign-in switched off", True
    elif event.action == "user.change":
        for name in ACCOUNT_FIELDS:
            if name in data.get("changed", {}):
                change = data["changed"][name]
                yield name, f"{safe_cell(change['from'])} -> {safe_cell(change['to'])}", not by_other
    elif event.action == "user.permissions":
        parts = [f"{label}: {', '.join(data[key])}" for key, label in (("added", "added"), ("removed", "removed"))
                 if data.get(key)]
        yield "user_permissions", "; ".join(parts), not by_other
    elif event.action == "user.delete":
        yield "account", "deleted", False
    elif event.action == "user.create":
        flags = [flag for flag in ACCOUNT_FIELDS if data.get(flag) is True]
        yield "account", "created" + "".join(f"; {flag}" for flag in flags), False
    elif event.action in ("group.add_member", "group.remove_member"):
        joined = event.action == "group.add_member"
        yield "group", f"{'added to' if joined else 'removed from'} {data.get('group')}", False
    elif event.action == "group.permissions":
        parts = [f"{label}: {', '.join(data[key])}" for key, label in (("added", "added"), ("removed", "removed"))
                 if data.get(key)]
        yield "group_permissions", "; ".join(parts), False
    elif event.action in GRANT_ACTIONS:
        given = event.action == "environment.grant"
        yield ("environment_grant", f"{'granted' if given else 'revoked'} {data.get('permission')} on "
                                    f"{data.get('environment')}", False)
    elif event.action == "group.rename":
        yield "group", f"renamed from {data.get('from')} to {data.get('to')}", False
    elif event.action == "group.delete":
        lost = [f"{label}: {', '.join(data.get(key) or []) or 'none'}" for key, label in (
            ("members", "members"), ("permissions", "permissions"), ("environment_grants", "environment grants"))]
        yield "group_deleted", "; ".join(lost), False


def _implementers_deployed(environment: Environment, period: Period) -> policy.ImplementersIndex:
    """The implementers of the releases deployed to the environment in the period, by version (one query)."""
    deployed = Deployment.objects.filter(environment=environment, requested_at__gte=period.since,
                                         requested_at__lt=period.until, queued_at__isnull=False).values("release_id")
    return policy.ImplementersIndex(Implementer.objects.filter(release_id__in=deployed).values_list(
        "release__version", "identity", "user_id").iterator(chunk_size=ITERATOR_CHUNK))


def account_rows(period: Period) -> Iterator[tuple]:
    """Administrator actions on accounts in the period: passwords set for another person, activation,
    staff and superuser flags, user name and e-mail, permission changes; and on groups: members added
    and removed, a group's permissions, a group deleted with who lost what (whatever the application:
    a person is not)."""
    events = AuditEvent.objects.filter(created_at__gte=period.since, created_at__lt=period.until,
                                       action__in=ACCOUNT_ACTIONS + GROUP_ACTIONS + GRANT_ACTIONS).order_by("seq")
    # a person's e-mail by their id, which a rename does not change (by name for events without one)
    by_id, by_name = {}, {}
    for pk, username, email in get_user_model().objects.values_list("pk", "username", "email"):
        by_id[pk], by_name[username] = email, email
    for e in events.iterator(chunk_size=ITERATOR_CHUNK):
        target = e.data.get("user") or (f"group {e.data.get('group')}" if e.action in GROUP_ACTIONS + GRANT_ACTIONS
                                         else e.object_repr)
        user_id = e.data.get("user_id") if e.action not in ACCOUNT_ACTIONS else int(e.object_id or 0)
        email = by_id.get(user_id) if user_id else None
        email = email if email is not None else by_name.get(target, e.data.get("email", ""))
        for what, change, conflict in _account_changes(e):
            yield ("", "", target, email, what, e.via, e.created_at, e.seq, conflict, "", e.actor_username, change)


# --- audit -----------------------------------------------------------------------------------------




def audit_rows(period: Period, up_to_seq: int) -> Iterator[tuple]:
    """The period's events as one run of consecutive events: from the first event timed in the period
    to the last one, every event between them included, so that each link of the run can be checked.

    An event's time is taken as its writer asks for the chain's lock, so along the chain a time can be
    a few milliseconds before the time of the event before it; such an event, between two events of the
    period, is in the run even when its own time falls just outside the period (and an event at the
    period's edge may be left to the next period's run)."""
    timed = AuditEvent.objects.filter(created_at__gte=period.since, created_at__lt=period.until, seq__lte=up_to_seq)
    bounds = timed.aggregate(first=Min("seq"), last=Max("seq"))
    if bounds["first"] is None:
        return
    events = AuditEvent.objects.filter(seq__gte=bounds["first"], seq__lte=bounds["last"])
    yield from events.order_by("seq").values_list(*AUDIT_COLUMNS).iterator(chunk_size=ITERATOR_CHUNK)


# --- exports ---------------------------------------------------------------------------------------

REPORTS: dict[str, list[str]] = {
    "changes": CHANGES_COLUMNS, "exceptions": EXCEPTIONS_COLUMNS, "access": ACCESS_COLUMNS, "audit": AUDIT_COLUMNS,
}


@contextlib.contextmanager
def _snapshot():
    """PostgreSQL: one REPEATABLE READ snapshot for the whole report (and server-side cursors).
    SQLite: no transaction, which here would take the database write lock for the whole export."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        yield


@dataclass
class Export:
    """One report being generated: stream `chunks()`, then read `manifest`."""

    report: str
    period: Period
    actor: Actor
    row_count: int = 0
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.report not in REPORTS:
            raise ValueError(f"Unknown report {self.report!r}; choose one of {', '.join(REPORTS)}.")

    fast: bool = True  # use a database-specific fast path where there is one

    def _batches(self, head_seq: int) -> Iterator[list]:
        rows: dict[str, Callable[[], Iterator[tuple]]] = {
            "changes": lambda: changes_rows(self.period),
            "exceptions": lambda: exceptions_rows(self.period),
            "access": lambda: access_rows(self.period),
            "audit": lambda: audit_rows(self.period, head_seq),
        }
        batch = []
        for row in rows[self.report]():
            batch.append([safe_cell(v) for v in row])
            if len(batch) >= 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    def _csv(self, head_seq: int) -> Iterator[bytes]:
        """The CSV in chunks of about 64 KiB, counting rows."""
        if self.fast and connection.vendor == "postgresql" and self.report in ("changes", "audit"):
            sql, params = (pg_reports.changes_sql(self.period) if self.report == "changes"
                           else pg_reports.audit_sql(self.period, head_seq))
            pending, size, rows = [], 0, -1  # the header is not a row
            for line in pg_reports.copy_csv(sql, params):
                pending.append(line)
                size += len(line)
                rows += 1
                if size >= CHUNK:
                    self.row_count = rows
                    yield b"".join(pending)
                    pending, size = [], 0
            self.row_count = rows
            yield b"".join(pending)
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(REPORTS[self.report])
        for batch in self._batches(head_seq):
            writer.writerows(batch)
            self.row_count += len(batch)
            if buffer.tell() >= CHUNK:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()

    def chunks(self) -> Iterator[bytes]:
        """The CSV, in chunks of about 64 KiB; when exhausted, the manifest is ready and audited."""
        generated_at = timezone.now()
        head = chain.head()
        head_seq, head_hash = (head.seq, head.hash) if head else (0, chain.GENESIS_HASH)
        digest = hashlib.sha256()
        with _snapshot():
            for data in self._csv(head_seq):
                digest.update(data)
                yield data
        self.manifest = {
            "report": self.report, "parameters": self.period.as_dict(), "generated_at": iso(generated_at),
            "generated_by": self.actor.label, "row_count": self.row_count, "columns": REPORTS[self.report],
            "sha256": digest.hexdigest(), "chain_head": {"seq": head_seq, "hash": head_hash},
        }
        chain.append(actor=self.actor, action="report.export", object_type="report", object_id=self.report,
                     object_repr=f"{self.report} report", data=self.manifest)

    def manifest_json(self) -> str:
        return json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
