"""Delivery metrics: how an application's team delivers, per environment and ISO week.

Computed in the database with aggregates, grouped by environment and week, so a page or an API
answer costs the same few queries whatever the history (one for the environments, one per family
of measures). Each measure is counted in the week its event happened:

- deployment frequency: succeeded deployments, in the week they finished;
- change failure rate: failed / (succeeded + failed), in the week they finished;
- emergency share: emergency deployments among those (succeeded + failed);
- lead time for changes: for each change (an issue key) the first time a release carrying it
  reached the environment, minus the first successful build of that change (a build of a branch
  naming the key, or of a release carrying it), in the week it arrived;
- time to restore: from a failed deployment (the first of a run of failures) to the next succeeded
  deployment of the same environment, in the week of the failure;
- time waiting for approval: from the request to the deciding approval (the one that queued it,
  or the rejection), for requests that needed approvals, in the week they were asked for.
  Emergency deployments skip the wait and are not counted there.

Durations are in seconds. Averages over the whole period are weighted by what each week counted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field

from django.db import connection, transaction
from django.db.models import Avg, Count, Exists, F, FloatField, Func, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, TruncWeek
from django.utils import timezone

from environments.models import Approval, Deployment, Environment
from releases.models import Application, Build, ReleaseIssue

State = Deployment.State
DEFAULT_WEEKS = 12
MAX_WEEKS = 157  # three years: enough for a trend, bounded for a page


class SecondsBetween(Func):
    """`end - start` in seconds, as a float, on PostgreSQL and SQLite."""

    arity = 2
    output_field = FloatField()

    def __init__(self, end, start, **extra):
        super().__init__(end, start, **extra)

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection, template="EXTRACT(EPOCH FROM (%(expressions)s))::double precision",
                           arg_joiner=" - ", **extra)

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(compiler, connection, template="((julianday(%(expressions)s)) * 86400.0)",
                           arg_joiner=") - julianday(", **extra)


class EarlierOf(Func):
    """The earlier of two times, or the one that is not null: PostgreSQL's LEAST skips nulls, so each
    runs once; SQLite's MIN of values is null if any is."""

    function = "LEAST"
    arity = 2

    def as_sqlite(self, compiler, connection, **extra):
        first, second = self.get_source_expressions()
        return Func(Coalesce(first, second), Coalesce(second, first), function="MIN",
                    output_field=self.output_field).as_sql(compiler, connection, **extra)


def monday_of(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=day.weekday())


def week_label(monday: dt.date) -> str:
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class MetricsPeriod:
    """Whole ISO weeks, Monday 00:00 UTC to the Monday after the last one."""

    first_monday: dt.date
    end_monday: dt.date  # exclusive

    @classmethod
    def covering(cls, first_day: dt.date, last_day: dt.date) -> MetricsPeriod:
        """The ISO weeks that hold these days (at most MAX_WEEKS, the latest kept)."""
        if last_day < first_day:
            first_day, last_day = last_day, first_day
        end = monday_of(last_day) + dt.timedelta(weeks=1)
        first = max(monday_of(first_day), end - dt.timedelta(weeks=MAX_WEEKS))
        return cls(first, end)

    @classmethod
    def last_weeks(cls, weeks: int = DEFAULT_WEEKS, today: dt.date | None = None) -> MetricsPeriod:
        """The last `weeks` ISO weeks, this one included."""
        today = today or timezone.now().date()
        weeks = min(max(weeks, 1), MAX_WEEKS)
        return cls.covering(today - dt.timedelta(weeks=weeks - 1), today)

    @property
    def since(self) -> dt.datetime:
        return dt.datetime.combine(self.first_monday, dt.time(), tzinfo=dt.UTC)

    @property
    def until(self) -> dt.datetime:
        return dt.datetime.combine(self.end_monday, dt.time(), tzinfo=dt.UTC)

    @property
    def last_day(self) -> dt.date:
        return self.end_monday - dt.timedelta(days=1)

    @property
    def mondays(self) -> list[dt.date]:
        count = (self.end_monday - self.first_monday).days // 7
        return [self.first_monday + dt.timedelta(weeks=i) for i in range(count)]


@dataclass
class WeekMetrics:
    """The measures of one environment over one week (or, for `total`, over the whole period)."""

    week: dt.date | None  # Monday; None for the total
    label: str
    succeeded: int = 0
    failed: int = 0
    emergencies: int = 0
    changes: int = 0
    lead_time: float | None = None  # seconds, average
    failures_to_restore: int = 0  # failures that began an outage (first of a run of failures)
    restored: int = 0
    time_to_restore: float | None = None  # seconds, average over the restored ones
    approval_decisions: int = 0
    approval_wait: float | None = None  # seconds, average

    @property
    def deployment_frequency(self) -> int:
        return self.succeeded

    @property
    def change_failure_rate(self) -> float | None:
        ran = self.succeeded + self.failed
        return self.failed / ran if ran else None

    @property
    def emergency_share(self) -> float | None:
        ran = self.succeeded + self.failed
        return self.emergencies / ran if ran else None

    def as_dict(self) -> dict:
        return {
            "week": self.label,
            "starts_on": self.week.isoformat() if self.week else None,
            "deployments_succeeded": self.succeeded,
            "deployments_failed": self.failed,
            "deployment_frequency": self.deployment_frequency,
            "change_failure_rate": _rounded(self.change_failure_rate, 4),
            "emergency_deployments": self.emergencies,
            "emergency_share": _rounded(self.emergency_share, 4),
            "changes": self.changes,
            "lead_time_seconds": _rounded(self.lead_time, 0),
            "failures": self.failures_to_restore,
            "restored": self.restored,
            "time_to_restore_seconds": _rounded(self.time_to_restore, 0),
            "approval_decisions": self.approval_decisions,
            "approval_wait_seconds": _rounded(self.approval_wait, 0),
        }


def _rounded(value: float | None, digits: int):
    if value is None:
        return None
    return int(round(value)) if digits == 0 else round(value, digits)


@dataclass
class EnvironmentMetrics:
    environment: Environment
    weeks: list[WeekMetrics]
    total: WeekMetrics = field(init=False)

    def __post_init__(self):
        self.total = _total(self.weeks)

    @property
    def production(self) -> bool:
        return self.environment.restricted

    def as_dict(self) -> dict:
        return {"environment": self.environment.name, "restricted": self.environment.restricted,
                "weeks": [w.as_dict() for w in self.weeks], "total": self.total.as_dict()}


def _weighted(weeks: list[WeekMetrics], value: str, count: str) -> float | None:
    pairs = [(getattr(w, value), getattr(w, count)) for w in weeks if getattr(w, value) is not None]
    n = sum(c for _, c in pairs)
    return sum(v * c for v, c in pairs) / n if n else None


def _total(weeks: list[WeekMetrics]) -> WeekMetrics:
    total = WeekMetrics(None, "total")
    for name in ("succeeded", "failed", "emergencies", "changes", "failures_to_restore", "restored",
                 "approval_decisions"):
        setattr(total, name, sum(getattr(w, name) for w in weeks))
    total.lead_time = _weighted(weeks, "lead_time", "changes")
    total.time_to_restore = _weighted(weeks, "time_to_restore", "restored")
    total.approval_wait = _weighted(weeks, "approval_wait", "approval_decisions")
    return total


# --- the queries: each grouped by environment and week ------------------------------------------

def _week(expression) -> TruncWeek:
    return TruncWeek(expression, tzinfo=dt.UTC)


def _as_monday(value) -> dt.date:
    return value.date() if isinstance(value, dt.datetime) else value


def _outcomes(environment_ids, period: MetricsPeriod):
    """Succeeded, failed and emergency deployments per environment and week of their finish."""
    ran = Q(state__in=(State.SUCCEEDED, State.FAILED))
    return (
        Deployment.objects.filter(environment_id__in=environment_ids, state__in=(State.SUCCEEDED, State.FAILED),
                                  finished_at__gte=period.since, finished_at__lt=period.until)
        .order_by().values("environment_id", week=_week("finished_at"))
        .annotate(succeeded=Count("id", filter=Q(state=State.SUCCEEDED)),
                  failed=Count("id", filter=Q(state=State.FAILED)),
                  emergencies=Count("id", filter=ran & Q(emergency=True)))
    )


def _lead_times(application: Application, environment_ids, period: MetricsPeriod):
    """Per environment and week: the changes (issue keys) that reached it for the first time, and
    the average time from their first successful build."""
    earlier = Deployment.objects.filter(
        environment_id=OuterRef("arrived_in"), state=State.SUCCEEDED, release__issues__key=OuterRef("key"),
        finished_at__lt=OuterRef("arrived_at"),
    )
    successful = Build.objects.filter(application=application, status=Build.Status.SUCCESSFUL).order_by("created_at")
    on_its_branch = Subquery(successful.filter(issues__key=OuterRef("key")).values("created_at")[:1])
    released_from = Subquery(successful.filter(releases__issues__key=OuterRef("key")).values("created_at")[:1])
    first_build = EarlierOf(on_its_branch, released_from)
    return (
        ReleaseIssue.objects.filter(
            release__application=application, release__deployments__environment_id__in=environment_ids,
            release__deployments__state=State.SUCCEEDED, release__deployments__finished_at__gte=period.since,
            release__deployments__finished_at__lt=period.until,
        )
        .annotate(arrived_in=F("release__deployments__environment_id"),
                  arrived_at=F("release__deployments__finished_at"))
        .filter(~Exists(earlier))
        .annotate(first_build=first_build)
        .order_by().values("arrived_in", week=_week("arrived_at"))
        .annotate(changes=Count("key", distinct=True),
                  lead_time=Avg(SecondsBetween(F("arrived_at"), F("first_build"))))
    )


def _restores(environment_ids, period: MetricsPeriod):
    """Per environment and week: failures that began an outage, and how long until the next success."""
    # Each a single probe of the index on (environment, state, finished_at): one state at a time (the
    # deployment before a failure, of either state, would sort every earlier deployment of its
    # environment, for each failure).
    def last(state: str, before: bool):
        found = Deployment.objects.filter(environment_id=OuterRef("environment_id"), state=state)
        if before:
            found = found.filter(finished_at__lt=OuterRef("finished_at")).order_by("-finished_at")
        else:
            found = found.filter(finished_at__gt=OuterRef("finished_at")).order_by("finished_at")
        return Subquery(found.values("finished_at")[:1])

    return (
        Deployment.objects.filter(environment_id__in=environment_ids, state=State.FAILED,
                                  finished_at__gte=period.since, finished_at__lt=period.until)
        .annotate(failed_before=last(State.FAILED, before=True), succeeded_before=last(State.SUCCEEDED, before=True))
        # the first of a run of failures: no failure before it, or a success between them
        .filter(Q(failed_before__isnull=True) | Q(succeeded_before__gt=F("failed_before")))
        .annotate(restored_at=last(State.SUCCEEDED, before=False))
        .order_by().values("environment_id", week=_week("finished_at"))
        .annotate(failures=Count("id"), restored=Count("restored_at"),
                  time_to_restore=Avg(SecondsBetween(F("restored_at"), F("finished_at"))))
    )


def _approval_waits(environment_ids, period: MetricsPeriod):
    """Per environment and week of the request: decided approval requests and the average wait."""
    rejection = Approval.objects.filter(deployment=OuterRef("pk"), decision=Approval.Decision.REJECT)
    return (
        Deployment.objects.filter(environment_id__in=environment_ids, required_approvals__gt=0, emergency=False,
                                  requested_at__gte=period.since, requested_at__lt=period.until)
        .annotate(decided_at=Coalesce("queued_at", Subquery(rejection.values("decided_at")[:1])))
        .filter(decided_at__isnull=False)
        .order_by().values("environment_id", week=_week("requested_at"))
        .annotate(decisions=Count("id"), wait=Avg(SecondsBetween(F("decided_at"), F("requested_at"))))
    )


@contextlib.contextmanager
def _without_jit():
    """PostgreSQL plans the lead times' query as costly enough to compile it to machine code (JIT),
    and at a million deployments the compiling took longer than it saved: the metrics page took
    1.45 s with it, 0.91 s without (bench/run.py --only pages). Off for these reads only, in their
    transaction (SET LOCAL: within another, until that one ends; no savepoint, which would cost two
    round trips more)."""
    if connection.vendor != "postgresql":  # (on SQLite a transaction would take the write lock: IMMEDIATE)
        yield
        return
    with transaction.atomic(savepoint=False):
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL jit = off")
        yield


def delivery_metrics(application: Application, *, period: MetricsPeriod | None = None,
                     environment: Environment | None = None) -> list[EnvironmentMetrics]:
    """The measures of every environment of `application` (or of one), week by week. Five queries
    (six on PostgreSQL: see _without_jit)."""
    period = period or MetricsPeriod.last_weeks()
    environments = [environment] if environment is not None else list(
        Environment.objects.filter(application=application).order_by("id"))
    ids = [e.pk for e in environments]
    grid = {(e.pk, monday): WeekMetrics(monday, week_label(monday)) for e in environments for monday in period.mondays}

    def cell(environment_id, week) -> WeekMetrics:
        return grid[(environment_id, _as_monday(week))]

    with _without_jit():
        for row in _outcomes(ids, period):
            w = cell(row["environment_id"], row["week"])
            w.succeeded, w.failed, w.emergencies = row["succeeded"], row["failed"], row["emergencies"]
        for row in _lead_times(application, ids, period):
            w = cell(row["arrived_in"], row["week"])
            w.changes, w.lead_time = row["changes"], row["lead_time"]
        for row in _restores(ids, period):
            w = cell(row["environment_id"], row["week"])
            w.failures_to_restore, w.restored = row["failures"], row["restored"]
            w.time_to_restore = row["time_to_restore"]
        for row in _approval_waits(ids, period):
            w = cell(row["environment_id"], row["week"])
            w.approval_decisions, w.approval_wait = row["decisions"], row["wait"]
    return [EnvironmentMetrics(e, [grid[(e.pk, m)] for m in period.mondays]) for e in environments]


def production_of(environments: list[Environment]) -> Environment | None:
    """The environment the page opens on: the last restricted one on the path, else the last one."""
    if not environments:
        return None
    restricted = [e for e in environments if e.restricted]
    return (restricted or environments)[-1]
