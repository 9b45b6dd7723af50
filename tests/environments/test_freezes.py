"""Freeze windows as analysts plan them: one-off and recurring (iCalendar rules read in a time zone),
for one environment or all of an application's, expanded with dateutil."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError

from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments import policy, selectors, services
from environments.models import Deployment, FreezeWindow
from tests.conftest import SYSTEM, person

BERLIN = ZoneInfo("Europe/Berlin")
UTC = dt.UTC
State = Deployment.State


def utc(*args):
    return dt.datetime(*args, tzinfo=UTC)


def weekend_freeze(world, **kw):
    """Every Friday 16:00 to Monday 06:00, Europe/Berlin."""
    return services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.production, reason="weekend", recurrence="FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0",
        duration=dt.timedelta(hours=62), timezone="Europe/Berlin",
        starts_at=dt.datetime(2027, 3, 1, tzinfo=BERLIN), ends_at=utc(2030, 1, 1), **kw))


def test_weekly_freeze_keeps_its_wall_clock_times_across_daylight_saving(world):
    window = weekend_freeze(world)
    found = [(o.starts_at, o.ends_at) for o in window.occurrences(utc(2027, 3, 16), utc(2027, 4, 6))]
    assert found == [
        (utc(2027, 3, 19, 15), utc(2027, 3, 22, 5)),  # CET: UTC+1
        (utc(2027, 3, 26, 15), utc(2027, 3, 29, 4)),  # starts in CET, ends in CEST (clocks moved on the 28th)
        (utc(2027, 4, 2, 14), utc(2027, 4, 5, 4)),  # CEST: UTC+2
    ]
    for start, end in found:
        assert (start.astimezone(BERLIN).strftime("%a %H:%M"), end.astimezone(BERLIN).strftime("%a %H:%M")) == (
            "Fri 16:00", "Mon 06:00")
    assert str(window) == "MAC Production frozen: Every Friday 16:00 to Monday 06:00, Europe/Berlin"  # its title


def test_month_end_close_is_the_last_two_working_days(world):
    window = services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        application=world.app, reason="month-end close", timezone="Europe/Berlin",
        recurrence="FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-2,-1;BYHOUR=0;BYMINUTE=0",
        duration=dt.timedelta(days=1), starts_at=dt.datetime(2026, 11, 1, tzinfo=BERLIN), ends_at=utc(2030, 1, 1)))
    days = [o.starts_at.astimezone(BERLIN).strftime("%Y-%m-%d %a")
            for o in window.occurrences(utc(2026, 11, 1), utc(2027, 5, 1))]
    assert days == [
        "2026-11-27 Fri", "2026-11-30 Mon",  # 30 days, ends on a Monday: the weekend is not a working day
        "2026-12-30 Wed", "2026-12-31 Thu",
        "2027-01-28 Thu", "2027-01-29 Fri",  # 31 days, ends on a Sunday
        "2027-02-25 Thu", "2027-02-26 Fri",  # 28 days
        "2027-03-30 Tue", "2027-03-31 Wed",
        "2027-04-29 Thu", "2027-04-30 Fri",
    ]
    # for every environment of the application
    frozen = policy.active_freezes([world.qa, world.staging, world.production], utc(2027, 2, 26, 12))
    assert set(frozen) == {world.qa.pk, world.staging.pk, world.production.pk}
    assert policy.active_freezes([world.qa], utc(2027, 2, 27, 12)) == {}


def test_a_request_inside_a_recurring_freeze_is_refused_with_its_end_an_emergency_goes(world, monkeypatch):
    release = world.release()
    world.to_staging(release)
    weekend_freeze(world)
    friday_evening = utc(2027, 3, 19, 18)
    monkeypatch.setattr("django.utils.timezone.now", lambda: friday_evening)
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    assert info.value.refusal.code == "FREEZE_WINDOW"
    assert "frozen until 2027-03-22 05:00 UTC (weekend)" in info.value.refusal.detail
    assert "by a releaser of Production (who holds its deploy right)" in info.value.refusal.detail  # who may go
    assert AuditEvent.objects.filter(action="deployment.request.refused", code="FREEZE_WINDOW").exists()
    emergency = services.deployment_request(actor=person(world.bob), release=release, environment=world.production,
                                            emergency_reason="payments down")
    assert emergency.state == State.RUNNING and emergency.emergency


def test_a_queued_deployment_waits_for_the_recurring_freeze_to_end(world, monkeypatch, settings):
    settings.PORTAL_APPROVAL_EXPIRY_HOURS = 24 * 7  # the approval outlives the weekend
    first, second = world.release(), world.release()
    world.to_staging(first)
    world.to_staging(second)
    thursday = utc(2027, 3, 18, 12)
    monkeypatch.setattr("django.utils.timezone.now", lambda: thursday)
    running = services.deployment_request(actor=person(world.bob), release=first, environment=world.production)
    services.deployment_approve(actor=person(world.carol), deployment_id=running.pk)
    waiting = services.deployment_request(actor=person(world.bob), release=second, environment=world.production)
    services.deployment_approve(actor=person(world.carol), deployment_id=waiting.pk)
    weekend_freeze(world)
    friday_evening = utc(2027, 3, 19, 18)
    monkeypatch.setattr("django.utils.timezone.now", lambda: friday_evening)
    services.deployment_record_result(deployment_id=running.pk, state=State.SUCCEEDED)
    waiting.refresh_from_db()
    assert waiting.state == State.QUEUED
    assert selectors.queue_entry(waiting)["waiting_for"] == "frozen until 2027-03-22 05:00 UTC (weekend)"
    monday = utc(2027, 3, 22, 5, 1)
    monkeypatch.setattr("django.utils.timezone.now", lambda: monday)
    assert [d.pk for d in services.deployment_dispatch_idle()] == [waiting.pk]


def test_a_freeze_rule_is_checked_when_it_is_saved(world):
    with pytest.raises(ValidationError, match="recurrence"):
        services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
            environment=world.qa, reason="x", recurrence="FREQ=SOMETIMES", duration=dt.timedelta(hours=1),
            starts_at=utc(2027, 1, 1), ends_at=utc(2028, 1, 1)))
    with pytest.raises(ValidationError, match="time zone"):
        services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
            environment=world.qa, reason="x", timezone="Mars/Olympus", starts_at=utc(2027, 1, 1),
            ends_at=utc(2027, 1, 2)))
    with pytest.raises(ValidationError, match="one environment or for all"):
        services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
            reason="x", starts_at=utc(2027, 1, 1), ends_at=utc(2027, 1, 2)))
