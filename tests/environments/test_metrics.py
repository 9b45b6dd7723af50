"""Delivery metrics on a history written by hand, with each expected value worked out below it.

Every step runs at a moment of its own (moved_time) through the services, as the portal lives it.
Production needs one approval (carol); bob asks. Times are UTC; the weeks are ISO weeks:
W10 = Mon 2026-03-02, W11 = Mon 2026-03-09, W12 = Mon 2026-03-16.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from access.models import ApiToken
from access.services import token_create
from environments import metrics, services
from environments.metrics import MetricsPeriod
from environments.models import Deployment
from portal.management.demo_history import moved_time
from releases.models import Application
from tests.conftest import SYSTEM, person

State = Deployment.State
HOUR = 3600.0
W10, W11, W12 = dt.date(2026, 3, 2), dt.date(2026, 3, 9), dt.date(2026, 3, 16)
PERIOD = MetricsPeriod(W10, W12 + dt.timedelta(weeks=1))


def at(day: int, hour: float, month: int = 3) -> dt.datetime:
    return dt.datetime(2026, month, day, tzinfo=dt.UTC) + dt.timedelta(hours=hour)


class History:
    def __init__(self, world):
        self.world = world
        self.number = 0

    def release(self, built: dt.datetime, keys: list[str]):
        """A successful build at `built` (of a branch naming the last key), and the release cut from it."""
        self.number += 1
        with moved_time(built):
            build = self.world.build(number=f"h{self.number}", branch=f"feature/{keys[-1]}-change")
            return self.world.release(f"9.{self.number}.0", issue_keys=keys, build=build)

    def run(self, deployment, finished: dt.datetime, result=State.SUCCEEDED):
        services.deployment_start(deployment_id=deployment.pk)
        with moved_time(finished):
            return services.deployment_record_result(deployment_id=deployment.pk, state=result)

    def early(self, release, start: dt.datetime):
        """QA then Staging, half an hour each, from `start`."""
        for i, environment in enumerate((self.world.qa, self.world.staging)):
            with moved_time(start + dt.timedelta(minutes=30 * i)):
                deployment = services.deployment_request(actor=self.world.ci, release=release,
                                                         environment=environment)
            self.run(deployment, start + dt.timedelta(minutes=30 * i + 20))

    def production(self, release, requested, decided=None, finished=None, result=State.SUCCEEDED, *,
                   reject=False, emergency=""):
        w = self.world
        with moved_time(requested):
            deployment = services.deployment_request(actor=person(w.bob), release=release,
                                                     environment=w.production, emergency_reason=emergency)
        if decided is not None:
            decide = services.deployment_reject if reject else services.deployment_approve
            with moved_time(decided):
                deployment = decide(actor=person(w.carol), deployment_id=deployment.pk, comment="looked at it")
        if finished is not None:
            with moved_time(decided or requested):
                deployment = self.run(deployment, finished, result)
        return deployment


def hand_checked_history(world) -> History:
    h = History(world)
    # W09, before the period: counts nowhere.
    z = h.release(at(24, 9, month=2), ["BIZPLAT-9"])
    h.early(z, at(24, 10, month=2))
    h.production(z, at(25, 9, month=2), at(25, 10, month=2), at(25, 11, month=2))
    # W10
    a = h.release(at(2, 9), ["BIZPLAT-1"])
    h.early(a, at(2, 10))
    h.production(a, at(2, 12), at(2, 14), at(2, 15))  # wait 2 h; lead time of BIZPLAT-1: 09:00 -> 15:00 = 6 h
    b = h.release(at(3, 9), ["BIZPLAT-2"])
    h.early(b, at(3, 10))
    h.production(b, at(4, 9), at(4, 13), at(4, 14), State.FAILED)  # wait 4 h; fails at 14:00
    c = h.release(at(4, 15), ["BIZPLAT-2", "BIZPLAT-3"])
    h.early(c, at(4, 15.5))
    h.production(c, at(4, 16.5), at(4, 17), at(4, 18))  # wait 0.5 h; restores after 4 h
    # BIZPLAT-2 arrives with c: 03-03 09:00 -> 03-04 18:00 = 33 h; BIZPLAT-3: 15:00 -> 18:00 = 3 h
    # W11
    d = h.release(at(9, 9), ["BIZPLAT-4"])
    h.early(d, at(9, 10))
    h.production(d, at(10, 9), at(10, 10), reject=True)  # rejected after 1 h
    h.production(d, at(10, 11), at(10, 12), at(10, 12.5), State.FAILED)  # wait 1 h; an outage begins 12:30
    h.production(d, at(10, 13), at(10, 13.5), at(10, 14), State.FAILED)  # wait 0.5 h; the same outage
    e = h.release(at(11, 8), ["BIZPLAT-4", "BIZPLAT-5"])
    h.early(e, at(11, 8.5))
    h.production(e, at(11, 10), None, at(11, 10.5), emergency="ledger totals wrong")  # no approval wait
    # restored 03-10 12:30 -> 03-11 10:30 = 22 h; BIZPLAT-4: 03-09 09:00 -> 03-11 10:30 = 49.5 h; BIZPLAT-5: 2.5 h
    # W12
    f = h.release(at(16, 9), ["BIZPLAT-6"])
    h.early(f, at(16, 10))
    h.production(f, at(17, 9), at(17, 9.25), at(17, 10), State.FAILED)  # wait 0.25 h; not restored yet
    h.production(f, at(18, 9))  # awaiting approval: no decision, no wait counted
    return h


def weeks_of(result, environment):
    return next(m for m in result if m.environment == environment).weeks


def test_each_measure_equals_the_hand_computed_value(world):
    hand_checked_history(world)
    result = metrics.delivery_metrics(world.app, period=PERIOD)
    w10, w11, w12 = weeks_of(result, world.production)
    assert [w.label for w in (w10, w11, w12)] == ["2026-W10", "2026-W11", "2026-W12"]

    # deployment frequency and change failure rate
    assert (w10.deployment_frequency, w10.failed, w10.change_failure_rate) == (2, 1, pytest.approx(1 / 3))
    assert (w11.deployment_frequency, w11.failed, w11.change_failure_rate) == (1, 2, pytest.approx(2 / 3))
    assert (w12.deployment_frequency, w12.failed, w12.change_failure_rate) == (0, 1, 1.0)
    # emergency share
    assert (w10.emergency_share, w11.emergency_share, w12.emergency_share) == (0, pytest.approx(1 / 3), 0)
    # lead time for changes: (6 + 33 + 3) / 3 = 14 h; (49.5 + 2.5) / 2 = 26 h
    assert (w10.changes, w10.lead_time) == (3, pytest.approx(14 * HOUR))
    assert (w11.changes, w11.lead_time) == (2, pytest.approx(26 * HOUR))
    assert (w12.changes, w12.lead_time) == (0, None)
    # time to restore: one outage a week; the one of W12 is still open
    assert (w10.failures_to_restore, w10.restored, w10.time_to_restore) == (1, 1, pytest.approx(4 * HOUR))
    assert (w11.failures_to_restore, w11.restored, w11.time_to_restore) == (1, 1, pytest.approx(22 * HOUR))
    assert (w12.failures_to_restore, w12.restored, w12.time_to_restore) == (1, 0, None)
    # approval wait: (2 + 4 + 0.5) / 3 h; (1 + 1 + 0.5) / 3 h (a rejection decides too); 0.25 h
    assert (w10.approval_decisions, w10.approval_wait) == (3, pytest.approx(6.5 / 3 * HOUR))
    assert (w11.approval_decisions, w11.approval_wait) == (3, pytest.approx(2.5 / 3 * HOUR))
    assert (w12.approval_decisions, w12.approval_wait) == (1, pytest.approx(0.25 * HOUR))

    total = next(m for m in result if m.environment == world.production).total
    assert (total.succeeded, total.failed, total.emergencies, total.changes) == (3, 4, 1, 5)
    assert total.change_failure_rate == pytest.approx(4 / 7)
    assert total.lead_time == pytest.approx((6 + 33 + 3 + 49.5 + 2.5) / 5 * HOUR)
    assert total.time_to_restore == pytest.approx((4 + 22) / 2 * HOUR)
    assert total.approval_wait == pytest.approx((6.5 + 2.5 + 0.25) / 7 * HOUR)

    # QA: every release once, 20 minutes after it was asked for; the lead time counts from the build
    qa10, qa11, qa12 = weeks_of(result, world.qa)
    assert (qa10.deployment_frequency, qa11.deployment_frequency, qa12.deployment_frequency) == (3, 2, 1)
    assert qa10.lead_time == pytest.approx((80 + 80 + 50) / 3 * 60)  # 1 h 20, 1 h 20 (03-03), 50 min (c)
    assert qa10.approval_decisions == 0 and qa10.change_failure_rate == 0


def test_a_first_failure_begins_an_outage_too(world):
    h = History(world)
    first = h.release(at(2, 9), ["BIZPLAT-1"])
    h.early(first, at(2, 10))
    h.production(first, at(2, 11), at(2, 12), at(2, 13), State.FAILED)  # nothing ended before it
    h.production(first, at(2, 14), at(2, 15), at(2, 16))  # the same release again: restored after 3 h
    (only,) = metrics.delivery_metrics(world.app, period=PERIOD, environment=world.production)
    assert (only.weeks[0].failures_to_restore, only.weeks[0].time_to_restore) == (1, pytest.approx(3 * HOUR))
    assert (only.weeks[0].changes, only.weeks[0].lead_time) == (1, pytest.approx(7 * HOUR))  # 09:00 -> 16:00


def test_a_change_counts_from_the_first_build_of_its_branch(world):
    h = History(world)
    with moved_time(at(1, 9)):  # Sunday: the branch's first green build, long before the release
        world.build(number="branch-1", branch="bugfix/bizplat-7-rounding")
    with moved_time(at(1, 10)):  # a red one before it does not count
        world.build(number="branch-0", branch="bugfix/BIZPLAT-8", status="failed")
    release = h.release(at(2, 9), ["BIZPLAT-7", "BIZPLAT-8"])
    h.early(release, at(2, 10))
    h.production(release, at(2, 11), at(2, 12), at(2, 13))
    (only,) = metrics.delivery_metrics(world.app, period=PERIOD, environment=world.production)
    # BIZPLAT-7: 03-01 09:00 -> 03-02 13:00 = 28 h; BIZPLAT-8: its release's build 03-02 09:00 -> 13:00 = 4 h
    assert (only.weeks[0].changes, only.weeks[0].lead_time) == (2, pytest.approx(16 * HOUR))


def test_one_environment_and_the_dictionary_the_api_answers(world):
    hand_checked_history(world)
    (only,) = metrics.delivery_metrics(world.app, period=PERIOD, environment=world.production)
    week = only.weeks[1].as_dict()
    assert week == {
        "week": "2026-W11", "starts_on": "2026-03-09", "deployments_succeeded": 1, "deployments_failed": 2,
        "deployment_frequency": 1, "change_failure_rate": 0.6667, "emergency_deployments": 1,
        "emergency_share": 0.3333, "changes": 2, "lead_time_seconds": 26 * 3600, "failures": 1, "restored": 1,
        "time_to_restore_seconds": 22 * 3600, "approval_decisions": 3, "approval_wait_seconds": 3000,
    }


def test_the_period_is_whole_iso_weeks():
    period = MetricsPeriod.last_weeks(12, today=dt.date(2026, 3, 18))  # a Wednesday
    assert (period.first_monday, period.last_day) == (dt.date(2025, 12, 29), dt.date(2026, 3, 22))
    assert len(period.mondays) == 12 and metrics.week_label(period.first_monday) == "2026-W01"
    assert MetricsPeriod.covering(dt.date(2026, 3, 20), dt.date(2026, 3, 3)) == MetricsPeriod(W10, W12 + (W12 - W11))
    assert len(MetricsPeriod.covering(dt.date(2000, 1, 1), dt.date(2026, 1, 1)).mondays) == metrics.MAX_WEEKS


JIT_OFF = connection.vendor == "postgresql"  # one statement more: metrics._without_jit


def count_queries(world) -> int:
    with CaptureQueriesContext(connection) as captured:
        metrics.delivery_metrics(world.app, period=PERIOD)
    return len(captured)


def test_the_query_count_does_not_grow_with_the_history(world):
    small = count_queries(world)
    h = hand_checked_history(world)
    assert count_queries(world) == small
    for day in range(2, 20):  # a change a day more, with a failure every third day
        release = h.release(at(day, 1), [f"BIZPLAT-{100 + day}"])
        h.early(release, at(day, 2))
        h.production(release, at(day, 3), at(day, 4), at(day, 5), State.FAILED if day % 3 == 0 else State.SUCCEEDED)
    assert count_queries(world) == small == 5 + JIT_OFF


def test_on_postgresql_jit_is_off_for_the_metrics_reads_only(transactional_audit_db):
    app = Application.objects.create(name="JIT", issue_key_prefix="JIT")

    def jit():
        with connection.cursor() as cursor:
            cursor.execute("SHOW jit")
            return cursor.fetchone()[0]

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's setting")
    before = jit()
    with CaptureQueriesContext(connection) as captured:
        metrics.delivery_metrics(app, period=PERIOD)
    assert "SET LOCAL jit = off" in [q["sql"] for q in captured]
    assert jit() == before  # a persistent connection's other work keeps the server's setting


def bearer(raw: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def test_the_api_answers_the_same_numbers_and_a_ci_token_only_for_its_application(world, client):
    hand_checked_history(world)
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    response = client.get("/api/v1/applications/MAC/metrics?since=2026-03-04&until=2026-03-18&environment=Production",
                          **bearer(raw))
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["application"], body["since"], body["until"]) == ("MAC", "2026-03-02", "2026-03-22")
    (production,) = body["environments"]
    assert [w["week"] for w in production["weeks"]] == ["2026-W10", "2026-W11", "2026-W12"]
    assert production["weeks"][0]["lead_time_seconds"] == 14 * 3600
    assert production["total"]["change_failure_rate"] == round(4 / 7, 4)

    turned = client.get("/api/v1/applications/MAC/metrics?since=2026-03-18&until=2026-03-04", **bearer(raw)).json()
    assert (turned["since"], turned["until"]) == ("2026-03-02", "2026-03-22")  # the days the other way round
    every = client.get("/api/v1/applications/MAC/metrics?until=2026-03-22&weeks=2", **bearer(raw)).json()
    assert [e["environment"] for e in every["environments"]] == ["QA", "Staging", "Production"]
    assert every["since"] == "2026-03-09" and len(every["environments"][0]["weeks"]) == 2

    other = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    refused = client.get("/api/v1/applications/HAMS/metrics", **bearer(raw))
    assert (refused.status_code, refused.json()["code"]) == (404, "NOT_FOUND")
    _, theirs = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="hams-ci", applications=[other])
    assert client.get("/api/v1/applications/HAMS/metrics", **bearer(theirs)).status_code == 200
    _, carol = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="carol", user=world.carol)
    assert client.get("/api/v1/applications/MAC/metrics", **bearer(carol)).status_code == 200


@pytest.mark.parametrize("query", ["weeks=0", "weeks=500", "since=1066-10-14", "until=9999-12-31", "since=x",
                                   "environment=Nowhere"])
def test_bad_metrics_queries_are_4xx(world, client, query):
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    response = client.get(f"/api/v1/applications/MAC/metrics?{query}", **bearer(raw))
    assert response.status_code in (404, 422), response.content
    assert response.json()["code"] in ("INVALID", "NOT_FOUND")


def test_the_metrics_route_is_in_the_openapi_document(client):
    document = client.get("/api/v1/openapi.json").json()
    operation = document["paths"]["/api/v1/applications/{application}/metrics"]["get"]
    assert {p["name"] for p in operation["parameters"]} >= {"application", "since", "until", "weeks", "environment"}


def page(client, user, query=""):
    client.force_login(user)
    return client.get(reverse("admin:environments_metrics") + query)


@pytest.fixture
def analyst(world, make_user):
    return make_user("nina", perms=["environments.view_deployment", "environments.view_freezewindow"])


def test_the_page_draws_the_charts_and_the_table(world, client, analyst):
    hand_checked_history(world)
    response = page(client, analyst, "?application=MAC&since=2026-03-02&until=2026-03-22")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('<figure class="metrics-chart"') == html.count('role="img"') == 6
    for title in ("Deployments per week", "Lead time for changes", "Change failure rate", "Time to restore",
                  "Time waiting for approval", "Emergency share"):
        assert title in html
    assert "<rect class=\"bar-failed\"" in html and "<title>W11: 22 h</title>" in html  # the time to restore bar
    assert "Production week by week" in html  # the restricted end of the path by default
    table = response.context["rows"]
    assert table[0][:4] == ["2026-W10", 2, 1, "33%"] and table[0][7] == "14 h"
    assert table[-1][0] == "total" and table[-1][3] == "57%"
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html  # no CDN
    assert 'id="freeze-calendar"' in html


def test_the_page_says_what_it_did_with_days_it_cannot_measure_as_asked(world, client, analyst):
    """As the reports' page does: the last day before the first is refused, and a period longer than the
    page measures says that its latest weeks are shown (an analysts' walk found both taken silently)."""
    hand_checked_history(world)
    swapped = page(client, analyst, "?application=MAC&since=2026-03-22&until=2026-03-02")
    assert "The last day comes before the first." in swapped.content.decode()
    long = page(client, analyst, "?application=MAC&since=2020-01-01&until=2026-03-22")
    assert f"At most {metrics.MAX_WEEKS} weeks are measured: the latest are shown." in long.content.decode()
    assert long.context["period"].first_monday == dt.date(2023, 3, 20)  # 157 weeks up to 2026-W12
    labels = re.findall(r"<title>([0-9W-]+): ", long.content.decode())  # the charts' weeks cross years
    assert labels and all(re.fullmatch(r"20[0-9]{2}-W[0-9]{2}", label) for label in labels)
    assert "2026-W11" in labels
    axis = [mark.text for mark in long.context["charts"][0].labels]  # spaced so that they do not overlap
    assert axis[0] == "2023-W12" and len(axis) <= 7
    short = page(client, analyst, "?application=MAC&since=2026-03-02&until=2026-03-22")
    assert "<title>W11: " in short.content.decode()  # within one year, the week alone
    assert "weeks are measured" not in short.content.decode()


def test_the_csv_has_the_same_numbers_with_formula_cells_neutralized(world, client, analyst):
    hand_checked_history(world)
    world.production.name = "=HYPERLINK(1)"
    world.production.save()
    response = page(client, analyst, "?application=MAC&environment=%3DHYPERLINK(1)&since=2026-03-02&until=2026-03-22"
                                     "&format=csv")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert rows[0][:4] == ["application", "environment", "week", "starts_on"]
    assert [r[2] for r in rows[1:]] == ["2026-W10", "2026-W11", "2026-W12", "total"]
    assert rows[1][1] == "'=HYPERLINK(1)"
    week11 = dict(zip(rows[0], rows[2], strict=True))
    assert (week11["lead_time_seconds"], week11["time_to_restore_seconds"], week11["change_failure_rate"]) == (
        str(26 * 3600), str(22 * 3600), "0.6667")


def test_the_page_needs_the_right_to_see_deployments(world, client, make_user):
    assert page(client, make_user("nobody")).status_code == 403


def test_the_page_costs_the_same_queries_whatever_the_history(world, client, analyst):
    client.force_login(analyst)

    def queries():
        with CaptureQueriesContext(connection) as captured:
            url = reverse("admin:environments_metrics") + "?application=MAC&since=2026-03-02&until=2026-03-22"
            assert client.get(url).status_code == 200
        return len(captured)

    empty = queries()
    hand_checked_history(world)
    assert queries() == empty == 12 + JIT_OFF  # session, user, permissions (2), and the page's own 8
