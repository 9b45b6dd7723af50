"""The demo's past: weeks of releases written through the services at moved times, once."""

import datetime as dt
from io import StringIO

from django.core.management import call_command
from django.utils import timezone

from audit import chain
from audit.models import AuditEvent
from environments import metrics, policy, selectors
from environments.models import Deployment, Environment, FreezeWindow
from portal.management import demo_history
from releases.models import Application

State = Deployment.State


def test_the_demo_has_weeks_of_history_that_the_audit_chain_verifies(db, settings):
    settings.DEMO = True
    call_command("demo_data", stdout=StringIO())
    events = AuditEvent.objects.count()
    call_command("demo_data", stdout=StringIO())
    assert AuditEvent.objects.count() == events  # twice changes nothing

    out = StringIO()
    call_command("verify_audit", stdout=out)
    assert out.getvalue().startswith("OK ") and chain.verify().ok

    app = Application.objects.get(name="MAC")
    production = Environment.objects.get(application=app, name="Production")
    deployments = Deployment.objects.filter(environment=production, release__version__startswith="0.")  # the history
    now = timezone.now()
    history_start = now - dt.timedelta(weeks=demo_history.WEEKS + 1)
    assert deployments.filter(state=State.SUCCEEDED).count() == 15
    assert deployments.filter(state=State.FAILED).count() == 3
    assert deployments.filter(state=State.REJECTED).count() == 1
    assert all(history_start < d.finished_at < now for d in deployments)
    (emergency,) = deployments.filter(emergency=True)
    assert emergency.state == State.SUCCEEDED and emergency.reviewed_at is None  # an open exception
    freeze = policy.active_freeze(production, emergency.requested_at)
    assert freeze is not None and freeze.window.recurrence  # it went during the weekend freeze

    weekend = FreezeWindow.objects.get(environment=production, recurrence__startswith="FREQ=WEEKLY")
    assert (weekend.timezone, weekend.duration) == ("Europe/Berlin", dt.timedelta(hours=62))
    calendar = selectors.freeze_calendar(now=now)
    assert [c["application"] for c in calendar] == ["MAC"]
    reasons = {e.reason for e in calendar[0]["entries"]}
    assert any(r.startswith("Month-end") for r in reasons) and any(r.startswith("Quarter-end") for r in reasons)
    assert policy.active_freeze(production, now) is None  # nothing holds while the demo is walked through
    assert weekend.ends_at <= now

    (found,) = metrics.delivery_metrics(app, environment=production)
    total = found.total
    everything = Deployment.objects.filter(environment=production)  # the history and the walk-through's past
    assert (total.succeeded, total.failed, total.emergencies) == (
        everything.filter(state=State.SUCCEEDED).count(), 3, 1)
    assert total.restored == 3 and total.time_to_restore > 0 and total.lead_time > 0
    assert total.approval_decisions >= 18 and total.approval_wait > 0
    # the walk-through's present after the past: tests/portal/test_commands.py checks it
