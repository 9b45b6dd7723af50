"""Freeze windows as analysts plan them in the admin, and the calendar of the coming ones. Saving and
ending go through the services: audited, and a freeze that holds now ends sooner only with a reason
and a second administrator."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEvent
from environments import selectors, services
from environments.models import ControlChange, FreezeWindow
from tests.conftest import SYSTEM

PLANNER_PERMS = ["environments.view_freezewindow", "environments.add_freezewindow", "environments.change_freezewindow",
                 "environments.delete_freezewindow", "environments.change_environment"]


@pytest.fixture
def planner(world, make_user, client):
    user = make_user("paula", perms=PLANNER_PERMS)
    client.force_login(user)
    return user


def form_data(world, **overrides):
    data = {"environment": world.production.pk, "application": "", "reason": "weekend", "preset": "",
            "starts_at_0": "2026-01-05", "starts_at_1": "00:00:00", "ends_at_0": "2030-01-01", "ends_at_1": "00:00:00",
            "recurrence": "", "duration": "", "timezone": "UTC", "change_reason": ""}
    data.update(overrides)
    return data


def texts(response):
    return [m.message for m in get_messages(response.wsgi_request)]


def running_freeze(world, hours=4):
    now = timezone.now()
    return services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.production, reason="release train", starts_at=now - dt.timedelta(hours=1),
        ends_at=now + dt.timedelta(hours=hours)))


def test_the_weekend_preset_plans_a_recurring_freeze_through_the_service(world, client, planner):
    response = client.post(reverse("admin:environments_freezewindow_add"), form_data(world, preset="weekend"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    window = FreezeWindow.objects.get()
    assert (window.recurrence, window.duration, window.timezone) == (
        "FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0", dt.timedelta(hours=62), "Europe/Berlin")
    event = AuditEvent.objects.get(action="freeze.create")
    assert event.actor_username == "paula" and event.data["changed"]["recurrence"][1] == window.recurrence
    listing = client.get(reverse("admin:environments_freezewindow_changelist"))
    assert "Every Friday 16:00 to Monday 06:00, Europe/Berlin" in listing.content.decode()
    assert 'id="freeze-calendar"' in listing.content.decode()


def test_the_month_end_preset_and_a_freeze_of_every_environment(world, client, planner):
    response = client.post(reverse("admin:environments_freezewindow_add"), form_data(
        world, environment="", application=world.app.pk, preset="month_end", timezone="Europe/Berlin",
        reason="month-end close"))
    assert response.status_code == 302
    window = FreezeWindow.objects.get()
    assert (window.application, window.environment, window.duration) == (world.app, None, dt.timedelta(days=1))
    assert "BYSETPOS=-2,-1" in window.recurrence


def test_shortening_a_running_freeze_needs_a_reason_then_becomes_a_proposal(world, client, planner):
    window = running_freeze(world)
    url = reverse("admin:environments_freezewindow_change", args=[window.pk])
    sooner = timezone.now() + dt.timedelta(minutes=30)
    data = form_data(world, reason="release train", starts_at_0=f"{window.starts_at:%Y-%m-%d}",
                     starts_at_1=f"{window.starts_at:%H:%M:%S}", ends_at_0=f"{sooner:%Y-%m-%d}",
                     ends_at_1=f"{sooner:%H:%M:%S}")
    response = client.post(url, data)
    assert response.status_code == 200
    assert "holds now and would end sooner" in str(response.context["adminform"].form.errors["change_reason"])
    response = client.post(url, {**data, "change_reason": "the train left early"})
    assert response.status_code == 302
    assert any(t.startswith("Proposed, not applied yet") for t in texts(response))
    window.refresh_from_db()
    assert window.ends_at > timezone.now() + dt.timedelta(hours=3)  # unchanged until a second person approves
    change = ControlChange.objects.get()
    assert change.freeze_window_id == window.pk and change.reason == "the train left early"


def test_ending_freezes_from_the_list_goes_through_the_service(world, client, planner):
    holding = running_freeze(world)
    later = services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.qa, reason="migration", starts_at=timezone.now() + dt.timedelta(days=3),
        ends_at=timezone.now() + dt.timedelta(days=4)))
    changelist = reverse("admin:environments_freezewindow_changelist")
    picked = {"action": "end_or_remove", "_selected_action": [holding.pk, later.pk]}
    confirm = client.post(changelist, picked)
    assert confirm.status_code == 200 and "1 of these hold now" in confirm.content.decode()
    refused = client.post(changelist, {**picked, "apply": "1", "comment": ""})
    assert "Reason" in refused.content.decode() and refused.context["error"]
    done = client.post(changelist, {**picked, "apply": "1", "comment": "plans changed"}, follow=True)
    messages = texts(done)
    assert any("removed" in m for m in messages) and any("Proposed, not applied yet" in m for m in messages)
    assert list(FreezeWindow.objects.values_list("pk", flat=True)) == [holding.pk]
    assert AuditEvent.objects.filter(action="freeze.remove", object_id=str(later.pk)).exists()
    assert ControlChange.objects.get().changes == {"removed": [True, True]}


def test_no_plain_delete(world, client, planner):
    window = running_freeze(world)
    assert client.post(reverse("admin:environments_freezewindow_delete", args=[window.pk])).status_code == 403


def test_the_calendar_lists_the_next_30_days_per_application(world):
    now = dt.datetime(2026, 3, 18, 12, tzinfo=dt.UTC)  # a Wednesday
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.production, reason="weekend", recurrence="FREQ=WEEKLY;BYDAY=FR;BYHOUR=16;BYMINUTE=0",
        duration=dt.timedelta(hours=62), timezone="Europe/Berlin", starts_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        ends_at=dt.datetime(2027, 1, 1, tzinfo=dt.UTC)))
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        application=world.app, reason="quarter end", starts_at=dt.datetime(2026, 3, 30, tzinfo=dt.UTC),
        ends_at=dt.datetime(2026, 4, 1, tzinfo=dt.UTC)))
    (calendar,) = selectors.freeze_calendar(now=now)
    assert calendar["application"] == "MAC"
    entries = [(e.starts_at, e.environments, e.reason) for e in calendar["entries"]]
    fridays = [(dt.datetime(2026, 3, 20, 15, tzinfo=dt.UTC), ("Production",), "weekend"),  # CET
               (dt.datetime(2026, 3, 27, 15, tzinfo=dt.UTC), ("Production",), "weekend"),  # CET; CEST from the 29th
               (dt.datetime(2026, 4, 3, 14, tzinfo=dt.UTC), ("Production",), "weekend"),
               (dt.datetime(2026, 4, 10, 14, tzinfo=dt.UTC), ("Production",), "weekend")]
    quarter = (dt.datetime(2026, 3, 30, tzinfo=dt.UTC), ("QA", "Staging", "Production"), "quarter end")
    assert entries == [*fridays[:2], quarter, *fridays[2:]]
    assert selectors.freeze_calendar(application="HAMS", now=now) == []
    saturday = selectors.freeze_calendar(now=dt.datetime(2026, 3, 21, 12, tzinfo=dt.UTC))[0]["entries"][0]
    assert saturday.running and saturday.ends_at == dt.datetime(2026, 3, 23, 5, tzinfo=dt.UTC)


def test_the_calendar_heads_a_freeze_by_its_day_where_it_is_planned(world, client, planner):
    """A close planned from Berlin's midnight is on its day there (it starts at 23:00 or 22:00 UTC the
    evening before): an analysts' walk found the month-end close under the day before."""
    berlin = ZoneInfo("Europe/Berlin")
    day = (timezone.now().astimezone(berlin) + dt.timedelta(days=3)).date()
    starts = dt.datetime.combine(day, dt.time(), tzinfo=berlin)  # Berlin's midnight
    ends = starts + dt.timedelta(days=2)
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.production, reason="close", timezone="Europe/Berlin", starts_at=starts, ends_at=ends))
    patch = starts.astimezone(dt.UTC) + dt.timedelta(minutes=30)  # planned in UTC: its day is the one before
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.qa, reason="patch", starts_at=patch, ends_at=patch + dt.timedelta(hours=1)))
    (calendar,) = selectors.freeze_calendar()
    assert [(e.reason, e.day) for e in calendar["entries"]] == [
        ("patch", day - dt.timedelta(days=1)), ("close", day)]  # in the order of their days
    page = client.get(reverse("admin:environments_freezewindow_changelist")).content.decode()
    close = page[page.index(f"{day.day} {day:%b}"):]
    utc = starts.astimezone(dt.UTC)
    assert close.index(f"{day:%A}") < close.index(f"{utc:%a} {utc.day} {utc:%b %H:%M}") < close.index(
        f"({starts:%a} 00:00 to {ends:%a} 00:00 Europe/Berlin)")


def test_the_list_and_its_calendar_cost_the_same_queries_whatever_the_windows(world, client, planner):
    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert client.get(reverse("admin:environments_freezewindow_changelist")).status_code == 200
        return len(captured)

    running_freeze(world)
    few = queries()
    for day in range(1, 12):
        services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
            application=world.app, reason=f"close {day}", recurrence="FREQ=WEEKLY;BYDAY=MO;BYHOUR=8",
            duration=dt.timedelta(hours=day), starts_at=timezone.now() - dt.timedelta(days=day),
            ends_at=timezone.now() + dt.timedelta(days=90)))
    assert queries() == few
