"""Some weeks of history for the demo, so the board, the delivery metrics, the freeze calendar and the
reports have something to show: eight weeks of releases going QA -> Staging -> Production, a few
production failures restored by the next release, a rejected request, a weekend freeze on Production
(every Friday 16:00 to Monday 06:00, Europe/Berlin), an emergency deployment during that freeze still
awaiting its review, and a one-off quarter-end freeze coming up.

The services stamp everything they write with `django.utils.timezone.now()`: requests, approvals,
results, the models' automatic times and the audit events. To write a past that looks lived, every
step runs inside `moved_time(moment)`, a context manager that makes that call answer `moment`, and
goes through the same services as everything else (so the audit chain records each step and
`verify_audit` passes). The audit events keep the order they were written in (their sequence
numbers) and carry the moved times.

History is written into a fresh demo only (an application with no release yet): on a second run,
or on a demo that already has releases, it does nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from audit.actors import Actor
from environments import services
from environments.models import Deployment, Environment, FreezeWindow
from releases.models import Application, Release
from releases.services import PullRequest, TestCounts, build_register, release_register

State = Deployment.State
WEEKS = 8
ENGINE = "demo:history"


@contextlib.contextmanager
def moved_time(moment: dt.datetime):
    """Within the block, `timezone.now()` answers `moment` (an aware datetime). For the demo and the
    tests only: nothing that serves requests moves the clock."""
    if moment.tzinfo is None:
        raise ValueError("moved_time needs an aware datetime")
    with mock.patch("django.utils.timezone.now", lambda: moment):
        yield moment


@dataclass(frozen=True)
class Step:
    """One release of the history: built on `weekday` of `week` (0 = the oldest) at `hour` UTC."""

    week: int
    weekday: int  # 0 = Monday
    hour: float
    keys: tuple[str, ...]
    production: str  # succeeded | failed | rejected | qa_failed | emergency
    approval_hours: float = 1.5  # from the production request to the approval


K = "BIZPLAT"
PLAN = [
    Step(0, 1, 9, (f"{K}-11",), "succeeded"),
    Step(0, 3, 10, (f"{K}-12",), "succeeded", 3),
    Step(1, 1, 8, (f"{K}-13",), "failed"),
    Step(1, 1, 12, (f"{K}-13", f"{K}-14"), "succeeded", 0.5),  # the fix restores Production the same day
    Step(2, 1, 9, (f"{K}-15",), "qa_failed"),
    Step(2, 2, 9, (f"{K}-15", f"{K}-16"), "succeeded", 4),
    Step(3, 0, 10, (f"{K}-17",), "succeeded", 2),
    Step(3, 2, 9, (f"{K}-18",), "rejected"),
    Step(3, 3, 9, (f"{K}-18", f"{K}-19"), "succeeded", 1),
    Step(4, 1, 9, (f"{K}-20",), "succeeded", 0.75),
    Step(4, 2, 9, (f"{K}-21",), "failed", 2),
    Step(4, 3, 8, (f"{K}-21", f"{K}-22"), "succeeded", 1),  # restored the next day
    Step(5, 1, 9, (f"{K}-23",), "succeeded", 0.5),
    Step(5, 2, 10, (f"{K}-24",), "succeeded", 1),
    Step(5, 3, 10, (f"{K}-25",), "succeeded", 2.5),
    Step(6, 1, 9, (f"{K}-26",), "succeeded", 1),
    Step(6, 3, 11, (f"{K}-27",), "failed", 1),
    Step(7, 0, 9, (f"{K}-27", f"{K}-28"), "succeeded", 2),
    Step(7, 2, 9, (f"{K}-29",), "succeeded", 0.5),
    Step(7, 4, 9, (f"{K}-30",), "emergency"),  # Saturday, during the weekend freeze
]
FAILURES = {
    "failed": "Playbook failed on app2: the health check answered 503 after the restart.",
    "qa_failed": "Playbook failed on qa1: database migration 0042 timed out.",
}


def setup_moment(now: dt.datetime) -> dt.datetime:
    """When a fresh demo's application, environments, groups and people are set up: before its history
    (and its first weekend freeze) begins."""
    today = now.date()
    first_monday = today - dt.timedelta(days=today.weekday(), weeks=WEEKS)
    return dt.datetime.combine(first_monday - dt.timedelta(days=4), dt.time(9), tzinfo=dt.UTC)


class History:
    def __init__(self, application: Application, production: Environment, now: dt.datetime):
        self.application = application
        self.production = production
        self.environments = list(Environment.objects.filter(application=application).order_by("id"))
        users = get_user_model().objects
        self.bob, self.carol = users.get(username="bob"), users.get(username="carol")
        self.ci = Actor.command()  # the demo command: registers builds, releases and freezes (its shell recorded)
        today = now.date()
        self.first_monday = today - dt.timedelta(days=today.weekday(), weeks=WEEKS)

    def moment(self, step: Step, hours_later: float = 0) -> dt.datetime:
        day = self.first_monday + dt.timedelta(weeks=step.week, days=step.weekday)
        return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC) + dt.timedelta(hours=step.hour + hours_later)

    def weekend_freeze(self, now: dt.datetime) -> None:
        """Every weekend of the past weeks. The series stops now: a freeze holding when someone walks
        through the demo (or a test runs it) would refuse the walk-through's Production requests."""
        start = dt.datetime.combine(self.first_monday, dt.time(), tzinfo=dt.UTC)
        with moved_time(start - dt.timedelta(days=3)):
            services.freeze_window_save(actor=self.ci, window=FreezeWindow(
                environment=self.production, reason="Weekend: nobody on call to watch a release",
                recurrence="FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0", duration=dt.timedelta(hours=62),
                timezone="Europe/Berlin", starts_at=start, ends_at=now))

    def month_end_freeze(self, now: dt.datetime) -> None:
        """The month-end close (the last 2 working days of each month) from tomorrow on, so the calendar
        shows a recurring freeze, whatever the day, that never holds while the demo is being set up."""
        berlin = ZoneInfo("Europe/Berlin")
        first = dt.datetime.combine(now.astimezone(berlin).date() + dt.timedelta(days=1), dt.time())
        with moved_time(now - dt.timedelta(days=1)):
            services.freeze_window_save(actor=self.ci, window=FreezeWindow(
                environment=self.production, reason="Month-end close: the last 2 working days of the month",
                recurrence="FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-2,-1;BYHOUR=0;BYMINUTE=0",
                duration=dt.timedelta(days=1), timezone="Europe/Berlin",
                starts_at=first.replace(tzinfo=berlin), ends_at=first.replace(tzinfo=berlin) + dt.timedelta(days=730)))

    def quarter_end_freeze(self, now: dt.datetime) -> None:
        """A one-off freeze a few weeks ahead, so the calendar shows more than weekends."""
        day = now.date() + dt.timedelta(days=16)
        starts = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
        with moved_time(now - dt.timedelta(days=1)):
            services.freeze_window_save(actor=self.ci, window=FreezeWindow(
                environment=self.production, reason="Quarter-end close: finance reconciles the ledgers",
                starts_at=starts, ends_at=starts + dt.timedelta(days=2)))

    def release(self, number: int, step: Step) -> Release:
        version = f"0.{number}.0"
        branch = f"feature/{step.keys[-1]}-demo-change"
        artifact_dir = Path(settings.VAR_DIR) / "artifacts"
        artifact_dir.mkdir(parents=True, exist_ok=True)
        artifact = artifact_dir / f"mac-{version}.tar.gz"
        if not artifact.exists():
            artifact.write_bytes(f"MAC {version} demo artifact\n".encode())
        branch_build, main_build = f"{100 + 2 * number}", f"{101 + 2 * number}"
        with moved_time(self.moment(step, -26)):  # CI builds the branch the day before it is merged
            build_register(actor=self.ci, application=self.application.name, number=branch_build,
                           commit=f"{number:04x}b" * 8, branch=branch, url=f"https://ci.example.com/MAC/{branch_build}",
                           status="successful", tests=TestCounts(380 + number, 0, 3))
        with moved_time(self.moment(step)):
            build_register(actor=self.ci, application=self.application.name, number=main_build,
                           commit=f"{number:04x}a" * 8, branch="main", url=f"https://ci.example.com/MAC/{main_build}",
                           status="successful", tests=TestCounts(381 + number, 0, 3))
            release, _ = release_register(  # the portal deploys it to QA at once (auto-deploy)
                actor=self.ci, application=self.application.name, version=version, build=main_build,
                artifact_url=artifact.as_uri(), artifact_sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(),
                issue_keys=list(step.keys), implementers=["alice@example.com"],
                pull_request=PullRequest(f"https://vcs.example.com/mac/pull/{40 + number}", "alice@example.com",
                                         ("erin",)),
            )
        return release

    def finish(self, environment: Environment, release: Release, at: dt.datetime, state: str = State.SUCCEEDED,
               detail: str = ""):
        """The deploy engine takes the running deployment up and ends it at `at`."""
        deployment = Deployment.objects.get(release=release, environment=environment, state=State.RUNNING)
        services.deployment_start(deployment_id=deployment.pk, engine=ENGINE)
        with moved_time(at):
            services.deployment_record_result(
                deployment_id=deployment.pk, state=state,
                detail=detail or "Succeeded (the demo's history: recorded, no playbook ran).")

    def play(self, number: int, step: Step) -> None:
        qa, staging = self.environments[0], self.environments[1]
        release = self.release(number, step)
        if step.production == "qa_failed":
            with moved_time(self.moment(step, 0.1)):
                self.finish(qa, release, self.moment(step, 0.25), State.FAILED, FAILURES["qa_failed"])
            return
        with moved_time(self.moment(step, 0.1)):
            self.finish(qa, release, self.moment(step, 0.25))  # the portal then deploys it to Staging
        with moved_time(self.moment(step, 0.3)):
            self.finish(staging, release, self.moment(step, 0.6))
        bob = Actor(user=self.bob, via="admin")
        if step.production == "emergency":
            saturday = self.moment(step, 24 + 1)
            with moved_time(saturday):
                services.deployment_request(
                    actor=bob, release=release, environment=self.production,
                    emergency_reason="Payment files rejected by the bank since Friday night; the fix cannot wait "
                                     "for Monday.")
                self.finish(self.production, release, saturday + dt.timedelta(minutes=25))
            return
        with moved_time(self.moment(step, 2)):
            deployment = services.deployment_request(actor=bob, release=release, environment=self.production)
        carol = Actor(user=self.carol, via="admin")
        decided = self.moment(step, 2 + step.approval_hours)
        with moved_time(decided):
            if step.production == "rejected":
                services.deployment_reject(actor=carol, deployment_id=deployment.pk,
                                           comment="No rollback plan in the ticket; add one and ask again.")
                return
            services.deployment_approve(actor=carol, deployment_id=deployment.pk, comment="Checked the ticket.")
            ended = decided + dt.timedelta(minutes=20 if step.production == "succeeded" else 12)
            if step.production == "failed":
                self.finish(self.production, release, ended, State.FAILED, FAILURES["failed"])
            else:
                self.finish(self.production, release, ended)


def build(*, application: Application, production: Environment) -> None:
    """Write the demo's past (see the module's docstring), once, into a fresh demo.

    The history plays the deploy engine's part itself (claim and result through the services), so
    the jobs that would hand its deployments to the worker are not queued: they would find every
    one of them finished and do nothing.
    """
    if Release.objects.filter(application=application).exists():
        return
    now = timezone.now()
    history = History(application, production, now)
    with mock.patch.object(services, "_enqueue", lambda *args, **kwargs: None):
        history.weekend_freeze(now)
        for number, step in enumerate(PLAN, start=1):
            history.play(number, step)
        history.quarter_end_freeze(now)
        history.month_end_freeze(now)
