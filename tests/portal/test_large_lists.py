"""The lists of tables that grow without end (deployments, audit events) behave as they must at millions
of rows (edge.lists): an issue key is searched as one, through its index; beyond PORTAL_EXACT_COUNT_LIMIT
the count says "about" (PostgreSQL's estimate) or "more than"; filter choices and dates are read from
indexes, never with SELECT DISTINCT over the whole table. Fixed query counts: tests/portal/test_page_queries.py."""

import datetime as dt
import re

import pytest
from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import AuditEvent
from edge.templatetags import requester
from environments import services
from environments.models import Deployment
from releases.models import Release, as_issue_key
from tests.conftest import person

DEPLOYMENTS = reverse("admin:environments_deployment_changelist")
RELEASES = reverse("admin:releases_release_changelist")
AUDIT = reverse("admin:audit_auditevent_changelist")


@pytest.fixture
def root(make_user):
    return make_user("root", superuser=True)


def listing(client, user, url, **params):
    client.force_login(user)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    response.sql = [q["sql"] for q in captured.captured_queries]
    return response


def deployments_of(response) -> set[int]:
    return {d.release_id for d in response.context["cl"].result_list}


@pytest.mark.parametrize(("text", "key"), [
    ("BIZPLAT-64951", "BIZPLAT-64951"), (" bizplat-7 ", "BIZPLAT-7"), ("HAMS_2-10", "HAMS_2-10"),
    ("1.0.5", None), ("BIZPLAT-", None), ("BIZPLAT", None), ("fix BIZPLAT-7", None), ("7-7", None),
])
def test_what_reads_as_an_issue_key(text, key):
    assert as_issue_key(text) == key


def test_an_issue_key_finds_the_deployments_of_the_releases_carrying_it_and_only_them(client, world, root):
    five, fifty, five_hundred = (world.release(issue_keys=[key]) for key in ("BIZPLAT-5", "BIZPLAT-50",
                                                                            "BIZPLAT-500"))
    both = world.release(issue_keys=["BIZPLAT-5", "BIZPLAT-6"])
    for release in (five, fifty, five_hundred, both):
        world.to_staging(release)

    found = listing(client, root, DEPLOYMENTS, q=" bizplat-5 ")  # any case: keys are stored upper-case
    assert deployments_of(found) == {five.pk, both.pk}  # not BIZPLAT-50 nor BIZPLAT-500
    assert found.context["cl"].result_count == 4
    assert not any(" LIKE " in sql for sql in found.sql)  # the key's index, not a scan

    assert deployments_of(listing(client, root, DEPLOYMENTS, q="BIZPLAT-6")) == {both.pk}
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="BIZPLAT-404")) == set()
    releases = listing(client, root, RELEASES, q="bizplat-50").context["cl"].result_list
    assert [r.pk for r in releases] == [fifty.pk]


def test_any_other_search_is_the_admins_own_as_before(client, world, root):
    mac, other = world.release(issue_keys=["BIZPLAT-5"]), world.release(version="2.0.0-rc1", issue_keys=["OPS-5"])
    for release in (mac, other):
        world.to_staging(release)
    assert deployments_of(listing(client, root, DEPLOYMENTS, q=mac.version)) == {mac.pk}
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="rc1")) == {other.pk}
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="BIZPLAT")) == {mac.pk}  # part of a key
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="ci:")) == {mac.pk, other.pk}  # who asked
    assert [r.pk for r in listing(client, root, RELEASES, q="2.0.0").context["cl"].result_list] == [other.pk]


def test_a_search_finds_what_the_list_shows(client, world, root):
    """What an analyst types after reading a row: the application and version as the row writes them,
    the environment, a deployment's number, and who approved, rejected or reviewed it."""
    older, newer = world.release(), world.release()
    world.to_staging(older)
    world.to_staging(newer)
    production = world.deploy(older, world.production, actor=person(world.bob))  # approved by carol
    refused = services.deployment_request(actor=person(world.bob), release=newer, environment=world.production)
    services.deployment_reject(actor=person(world.erin), deployment_id=refused.pk, comment="not yet")

    def found(**params):
        return {d.pk for d in listing(client, root, DEPLOYMENTS, **params).context["cl"].result_list}

    assert found(q=f"MAC {older.version}") == set(Deployment.objects.filter(release=older).values_list("pk", flat=True))
    assert found(q="production") == {production.pk, refused.pk}
    assert found(q=f"#{production.pk}") == {production.pk} and production.pk in found(q=str(production.pk))
    assert found(q="carol") == {production.pk} and found(q="erin") == {refused.pk}
    by_the_portal = {services.auto_deploy(release=world.release(), environment=world.qa).pk}
    assert {d.pk for d in Deployment.objects.all() if requester(d) == "the portal (automatic)"} == by_the_portal
    assert by_the_portal and found(q="automatic") == found(q="Portal") == by_the_portal  # as the list shows them
    assert found(q="the portal (automatic)") == by_the_portal  # the words, pasted
    assert found(q=f"Production {older.version}") == {production.pk}
    assert found(q=f"MAC {older.version} to Production") == {production.pk}  # a row's title, pasted
    assert found(q="²") == found(q="#²") == set()  # a digit int() does not read is no number
    client.force_login(root)
    assert client.get(reverse("admin:index"), {"q": "#²"}).status_code == 302  # to the releases' search
    assert not listing(client, root, RELEASES, q=f"#{older.pk}").context["cl"].result_list  # not shown there
    client.force_login(root)
    assert client.get(reverse("admin:index"), {"q": f"#{production.pk}"}).url == reverse(
        "admin:environments_deployment_change", args=[production.pk])
    releases = listing(client, root, RELEASES, q=f"mac {newer.version}")
    assert [r.pk for r in releases.context["cl"].result_list] == [newer.pk]
    assert "a version" in releases.content.decode()  # the list says what its search reads


def three_in_staging(world) -> None:
    """Six deployments: three releases, each to QA and Staging."""
    for _ in range(3):
        world.to_staging(world.release())


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the planner's estimate exists on PostgreSQL")
def test_beyond_the_limit_the_list_says_about_from_the_estimate_or_more_than(client, world, root, settings):
    three_in_staging(world)
    settings.PORTAL_EXACT_COUNT_LIMIT = 4
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE environments_deployment")  # autovacuum does it on a table that grows

    everything = listing(client, root, DEPLOYMENTS)
    # ANALYZE read every row of a small table (6); autovacuum may cut the dead pages earlier tests left
    # between ANALYZE and the count, and the estimate scales its density by the table's size now
    label = everything.context["cl"].paginator.count_label
    assert label in ("about 5", "about 6"), label
    assert f"{label} deployments" in everything.content.decode()
    assert f"{label} results" not in everything.content.decode()  # said once, below the list (nothing to clear)
    assert "(an estimate: the last page shows the list&#x27;s last rows; a filter or the dates reach every row)" \
        in everything.content.decode()
    assert len(everything.context["cl"].result_list) == 6
    assert not any("COUNT(*)" in sql and " LIMIT " not in sql for sql in everything.sql)  # never a whole count

    succeeded = listing(client, root, DEPLOYMENTS, state__exact="succeeded")  # no statistic knows this one
    assert succeeded.context["cl"].paginator.count_label == "more than 4"
    page = succeeded.content.decode()
    assert "more than 4 deployments" in page and "more than 4 results" in page

    assert "the pages reach the first 4: a narrower search, a filter or the dates reach the rest" in page

    qa = listing(client, root, DEPLOYMENTS, environment__name="QA")
    assert (qa.context["cl"].result_count, qa.context["cl"].paginator.count_label) == (3, "")  # exact


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the planner's estimate exists on PostgreSQL")
def test_the_last_page_of_a_list_counted_by_estimate_shows_its_last_rows(client, world, root, settings, monkeypatch):
    """An estimate may miss the rows' number: its last page (and one asked beyond it) shows the list's
    last rows, not the rows its number ends on (a helper found the oldest rows out of reach)."""
    three_in_staging(world)
    settings.PORTAL_EXACT_COUNT_LIMIT = 4
    monkeypatch.setattr(admin.site._registry[Deployment], "list_per_page", 2)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE environments_deployment")
    world.to_staging(world.release())  # two more rows than the statistics know of
    newest_first = list(Deployment.objects.order_by("-requested_at", "-id").values_list("pk", flat=True))
    first = listing(client, root, DEPLOYMENTS)
    assert first.context["cl"].paginator.count_label.startswith("about")
    pages = first.context["cl"].paginator.num_pages
    assert pages * 2 < len(newest_first)  # the estimate's pages end before the rows do
    for asked in (pages, 99):
        last = listing(client, root, DEPLOYMENTS, p=asked)
        assert [d.pk for d in last.context["cl"].result_list] == newest_first[-2:]
        assert f'<span class="this-page">{pages}</span>' in last.content.decode()


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite counts exactly: every page is reached")
def test_a_page_beyond_those_counted_shows_the_last_one_and_keeps_the_search(client, world, root, settings,
                                                                           monkeypatch):
    three_in_staging(world)
    settings.PORTAL_EXACT_COUNT_LIMIT = 4
    monkeypatch.setattr(admin.site._registry[Deployment], "list_per_page", 2)
    far = listing(client, root, DEPLOYMENTS, state__exact="succeeded", p="3")  # pages 1 and 2 hold the first 4
    cl = far.context["cl"]
    assert (len(cl.result_list), cl.paginator.count_label) == (2, "more than 4")
    assert [d.pk for d in cl.result_list] == [d.pk for d in listing(client, root, DEPLOYMENTS, state__exact="succeeded",
                                                                    p="2").context["cl"].result_list]
    assert "state__exact=succeeded" in far.content.decode()  # the filter is still on


@pytest.mark.parametrize("asked", ["0", "-1", "-99999999999"])
def test_a_page_before_the_first_shows_the_first(client, world, root, monkeypatch, asked):
    """Not the last one, and not an error page from the page links (a helper found p=0 answered 500)."""
    three_in_staging(world)
    monkeypatch.setattr(admin.site._registry[Deployment], "list_per_page", 2)
    first = [d.pk for d in listing(client, root, DEPLOYMENTS).context["cl"].result_list]
    shown = listing(client, root, DEPLOYMENTS, p=asked)
    assert [d.pk for d in shown.context["cl"].result_list] == first
    assert '<span class="this-page">1</span>' in shown.content.decode()  # the page links mark it
    assert "?p=2" in shown.content.decode()


@pytest.mark.parametrize("url", [DEPLOYMENTS, AUDIT])
@pytest.mark.parametrize("date", [{"year": "9999"}, {"year": "9999", "month": "12"},
                                  {"year": "9999", "month": "12", "day": "31"}, {"year": "0"}])
def test_a_date_beyond_the_calendar_is_a_bad_lookup_not_an_error_page(client, world, root, url, date):
    """Django's date hierarchy computes the period after the one asked: past year 9999 it raised."""
    field = "requested_at" if url == DEPLOYMENTS else "created_at"
    client.force_login(root)
    response = client.get(url, {f"{field}__{part}": value for part, value in date.items()})
    assert response.status_code == 302 and response.url.endswith("?e=1")


def test_an_empty_list_says_0(client, world, root):
    page = listing(client, root, DEPLOYMENTS, q="nothing-is-called-this").content.decode()
    assert "0 deployments" in page


@pytest.mark.skipif(connection.vendor == "postgresql", reason="SQLite has no estimate: it counts")
def test_sqlite_counts_exactly_whatever_the_limit(client, world, root, settings):
    three_in_staging(world)
    settings.PORTAL_EXACT_COUNT_LIMIT = 4
    for params in ({}, {"state__exact": "succeeded"}):
        cl = listing(client, root, DEPLOYMENTS, **params).context["cl"]
        assert (cl.result_count, cl.paginator.count_label) == (6, "")


def test_audit_filters_offer_every_value_read_from_the_index(client, world, root):
    three_in_staging(world)
    response = listing(client, root, AUDIT)
    offered = {spec.field_path: spec.lookup_choices for spec in response.context["cl"].filter_specs}
    for name in ("action", "code", "via"):  # each value once, in the database's order
        assert offered[name] == list(AuditEvent.objects.order_by(name).values_list(name, flat=True).distinct())
    assert "deployment.finish" in offered["action"]
    assert not any("DISTINCT" in sql for sql in response.sql)
    chosen = listing(client, root, AUDIT, action="deployment.finish").context["cl"]
    assert {e.action for e in chosen.result_list} == {"deployment.finish"}
    # the events without a code (no refusal) are a choice with words, not an empty link
    assert '<a href="?code=">none (not a refusal)</a>' in response.content.decode()
    plain = listing(client, root, AUDIT, code="").context["cl"]
    assert plain.result_count == AuditEvent.objects.filter(code="").count() > 0


def january_and_march(world) -> Deployment:
    """The six deployments of three_in_staging, the first asked for on 15 January 2026, the others on 2
    March; returns the second."""
    three_in_staging(world)
    first, *rest = Deployment.objects.order_by("id")
    Deployment.objects.filter(pk=first.pk).update(requested_at=dt.datetime(2026, 1, 15, 9, tzinfo=dt.UTC))
    march = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC)
    Deployment.objects.filter(pk__in=[d.pk for d in rest]).update(requested_at=march)
    return rest[0]


def test_the_date_hierarchy_offers_the_periods_that_hold_a_row_without_reading_them_all(client, world, root):
    second = january_and_march(world)
    Deployment.objects.filter(pk=second.pk).update(requested_at=dt.datetime(2026, 3, 4, 9, tzinfo=dt.UTC))

    months = listing(client, root, DEPLOYMENTS)
    page = months.content.decode()
    for month in (1, 3):
        assert f"?requested_at__month={month}&amp;requested_at__year=2026" in page
    for month in (2, 4):  # February lies between the first and the last row but holds none
        assert f"requested_at__month={month}&" not in page
    assert not any("DISTINCT" in sql and "environments_deployment" in sql for sql in months.sql)

    march = listing(client, root, DEPLOYMENTS, requested_at__year=2026, requested_at__month=3)
    days = march.content.decode()
    assert "requested_at__day=2&" in days and "requested_at__day=4&" in days
    assert "requested_at__day=3&" not in days and "requested_at__day=5&" not in days
    assert len(march.context["cl"].result_list) == 5
    # each day offered lists its rows
    day = listing(client, root, DEPLOYMENTS, requested_at__year=2026, requested_at__month=3, requested_at__day=4)
    assert [d.pk for d in day.context["cl"].result_list] == [second.pk]


def test_a_search_finding_more_than_the_limit_offers_every_period_between_without_probing(client, world, root,
                                                                                          settings):
    """Each query over a search that finds many rows pays for finding them again (a second at a million
    rows): there the hierarchy offers the calendar between its first and last row, as the whole list did
    before; a search that finds few is probed as any list."""
    january_and_march(world)
    settings.PORTAL_EXACT_COUNT_LIMIT = 10
    probed = listing(client, root, DEPLOYMENTS, q="BIZPLAT-1")
    assert "requested_at__month=2&" not in probed.content.decode()
    assert any("WITH periods" in sql for sql in probed.sql)

    settings.PORTAL_EXACT_COUNT_LIMIT = 2
    many = listing(client, root, DEPLOYMENTS, q="BIZPLAT-1")
    assert len(many.context["cl"].result_list) == 6  # counted only up to the limit on PostgreSQL
    assert all(f"requested_at__month={m}&" in many.content.decode() for m in (1, 2, 3))
    assert not any("WITH periods" in sql for sql in many.sql)
    blank = listing(client, root, DEPLOYMENTS, q=" ")  # no search at all: probed (a helper found it was not)
    assert "requested_at__month=2&" not in blank.content.decode()
    assert any("WITH periods" in sql for sql in blank.sql)

    # its first and last dates are the table's, read without finding the search's rows once more
    other = world.release(version="0.9.0", issue_keys=["OPS-1"])
    world.to_staging(other)
    Deployment.objects.filter(release=other).update(requested_at=dt.datetime(2025, 11, 3, 9, tzinfo=dt.UTC))
    years = listing(client, root, DEPLOYMENTS, q="BIZPLAT-1")
    assert deployments_of(years) == set(Release.objects.exclude(pk=other.pk).values_list("pk", flat=True))
    assert all(f"requested_at__year={y}" in years.content.decode() for y in (2025, 2026))
    (bounds,) = [sql for sql in years.sql if "MIN(" in sql and "environments_deployment" in sql]
    assert "releases_releaseissue" not in bounds
    # within a year or a month chosen, the periods are that year's or that month's (a helper walking the
    # lists found every day from the table's first one under a month's links)
    year = listing(client, root, DEPLOYMENTS, q="BIZPLAT-1", requested_at__year=2026).content.decode()
    assert set(re.findall(r"requested_at__month=(\d+)", year)) == {"1", "2", "3"}
    month = listing(client, root, DEPLOYMENTS, q="BIZPLAT-1", requested_at__year=2026, requested_at__month=3)
    assert set(re.findall(r"requested_at__day=(\d+)", month.content.decode())) == {"2"}
    assert len(month.context["cl"].result_list) == 5


def test_the_date_hierarchys_probes_are_one_query_whatever_the_gaps(client, world, root):
    """A month with a row every other day, then one with rows on its first and last day only: the
    same number of queries."""
    three_in_staging(world)
    rows = list(Deployment.objects.order_by("id"))

    def month_page(days):
        for row, day in zip(rows, days, strict=False):
            Deployment.objects.filter(pk=row.pk).update(requested_at=dt.datetime(2026, 5, day, 9, tzinfo=dt.UTC))
        return listing(client, root, DEPLOYMENTS, requested_at__year=2026, requested_at__month=5)

    spread = month_page([1, 3, 5, 7, 9, 11])
    assert len(spread.sql) == len(month_page([1, 31, 31, 31, 31, 31]).sql)
    page = spread.content.decode()
    assert all(f"requested_at__day={d}&" in page for d in (1, 3, 5, 7, 9, 11))
    assert not any(f"requested_at__day={d}&" in page for d in (2, 4, 6, 8, 10, 12))


def test_a_search_of_several_words_needs_each_word_somewhere(client, world, root):
    """As the admin's own search: each word in the version, an issue key or who asked (deployments), or
    an implementer (releases); "quoted words" stay one."""
    mac = world.release(issue_keys=["BIZPLAT-5"])
    other = world.release(version="2.0.0-rc1", issue_keys=["OPS-5"], implementers=("erin@example.com",))
    for release in (mac, other):
        world.to_staging(release)
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="rc1 OPS")) == {other.pk}
    assert deployments_of(listing(client, root, DEPLOYMENTS, q="rc1 BIZPLAT")) == set()
    assert deployments_of(listing(client, root, DEPLOYMENTS, q='"2.0.0-rc1" ci:')) == {other.pk}
    assert [r.pk for r in listing(client, root, RELEASES, q="ERIN rc1").context["cl"].result_list] == [other.pk]
    assert [r.pk for r in listing(client, root, RELEASES, q="alice rc1").context["cl"].result_list] == []


def test_a_search_reads_the_releases_found_not_a_join_of_every_row(client, world, root):
    world.to_staging(world.release(version="7.7.7"))
    found = listing(client, root, DEPLOYMENTS, q="7.7.7")
    assert len(deployments_of(found)) == 1
    # the keys are read on their own (a union of release ids), never joined to every deployment
    searched = [sql for sql in found.sql if "releases_releaseissue" in sql]
    assert searched and not any('JOIN "releases_releaseissue"' in sql for sql in searched)


def test_a_searched_pages_rows_are_read_by_their_keys_alone(client, world, root, monkeypatch):
    """The search runs to find a page's keys; the rows with their joins are then read by those keys
    (running it again cost the 300,000-approval person's page 190 ms at a million deployments)."""
    world.to_staging(world.release(version="7.7.7"))
    monkeypatch.setattr(type(admin.site._registry[Deployment]), "list_per_page", 1)  # two pages
    found = listing(client, root, DEPLOYMENTS, q="7.7.7")
    assert len(deployments_of(found)) == 1 and len(found.context["cl"].result_list) == 1
    (rows,) = [sql for sql in found.sql if sql.startswith('SELECT "environments_deployment"."id", ') and
               'JOIN "releases_application"' in sql]  # the page's rows, with the list's joins
    assert "7.7.7" not in rows


@pytest.mark.parametrize("order", ["", "-5", "2.-1"])  # the default order, a column, two columns
def test_a_page_found_by_its_keys_shows_the_rows_the_list_would_in_its_order(client, world, root, monkeypatch,
                                                                             order):
    """A page of many is read as its keys first, then those rows: the same rows in the same order as
    the list's own slice, on every page, with a search too."""
    for _ in range(4):
        world.to_staging(world.release())
    model_admin = admin.site._registry[Deployment]
    monkeypatch.setattr(type(model_admin), "list_per_page", 3)
    for params in ({}, {"q": "1.0"}):
        if order:
            params = {**params, "o": order}
        shown = []
        for page in (1, 2, 3):
            response = listing(client, root, DEPLOYMENTS, p=page, **params)
            cl = response.context["cl"]
            shown += [d.pk for d in cl.result_list]
        whole = listing(client, root, DEPLOYMENTS, **params).context["cl"].queryset
        assert shown == list(whole.values_list("pk", flat=True)) and len(shown) == 8


def test_a_word_finding_more_than_the_limit_is_asked_of_each_row_in_the_lists_order(client, world, root, settings,
                                                                                   monkeypatch):
    """A word finding more rows than PORTAL_EXACT_COUNT_LIMIT (a person who approved 300,000 deployments)
    is asked of each row, the list read in its own order (an EXISTS per way the word finds rows), where a
    word finding few is gathered first (a union of the keys found): the same rows, in the same order, on
    every page, with a filter too; a list sorted by a column gathers them in any case."""
    for n in range(5):
        release = world.release(f"4.{n}.0")
        world.to_staging(release)
        world.deploy(release, world.production, actor=person(world.bob))  # approved by carol
    monkeypatch.setattr(type(admin.site._registry[Deployment]), "list_per_page", 2)
    KEYS = 'SELECT "environments_deployment"."id" AS "pk"'  # noqa: N806 - the page's keys

    def shown(limit: int, **params) -> tuple[list[int], bool]:
        settings.PORTAL_EXACT_COUNT_LIMIT = limit
        pages = [listing(client, root, DEPLOYMENTS, p=page, **params) for page in (1, 2)]
        keys = [sql for sql in pages[0].sql if sql.startswith(KEYS)]
        return [d.pk for page in pages for d in page.context["cl"].result_list], "EXISTS" in keys[-1]

    for params in ({"q": "carol"}, {"q": "4."}, {"q": "ci:"}, {"q": "carol 4."},
                   {"q": "carol", "state__exact": "succeeded"}, {"q": "4.", "environment__name": "Production"}):
        gathered, asked_of_each = shown(1000, **params)
        assert not asked_of_each and len(gathered) == 4, params  # two pages of two
        each, asked_of_each = shown(4, **params)  # "more than 4": the pages reach the first 4
        assert asked_of_each and each == gathered, params
    sorted_by_requester = str(admin.site._registry[Deployment].list_display.index("requested_by_name"))
    assert not shown(4, q="carol", o=sorted_by_requester)[1]  # read in full in any case: gathered
    settings.PORTAL_EXACT_COUNT_LIMIT = 4
    few = listing(client, root, DEPLOYMENTS, q="4.1.0")  # three deployments: gathered
    assert [d.release.version for d in few.context["cl"].result_list] == ["4.1.0"] * 2
    assert not any("EXISTS" in sql for sql in few.sql if sql.startswith(KEYS))
    releases = listing(client, root, RELEASES, q="4.")  # five releases: asked of each (the newest 4 counted)
    assert [r.version for r in releases.context["cl"].result_list][:4] == ["4.4.0", "4.3.0", "4.2.0", "4.1.0"]
    assert any("EXISTS" in sql for sql in releases.sql if "releases_release" in sql.split(" FROM ")[1])


@pytest.mark.parametrize(("column", "field", "index"), [
    ("state_and_place", "state", "deployment_by_state_idx"),
    ("requested_by_name", "requested_by_label", "deployment_by_requester_idx"),
])
def test_a_list_sorted_by_a_column_breaks_its_ties_the_columns_way_and_reads_its_index(client, world, root, column,
                                                                                       field, index):
    """Ties (every automatic deployment has the same requester) are broken by the number in the sort's
    own direction, so that on PostgreSQL a page of a million deployments sorted by a column, either
    way, is read from that column's index (a sort of every row took 200 to 400 ms)."""
    for _ in range(3):
        world.to_staging(world.release())  # QA and Staging, by the portal and by a person: all finished
    number = str(admin.site._registry[Deployment].list_display.index(column))
    rows = list(Deployment.objects.values_list(field, "pk"))
    values = [value for value, _ in rows]
    assert None not in values and len(set(values)) < len(values)  # ties to break
    for order, descending in ((number, False), (f"-{number}", True)):
        shown = listing(client, root, DEPLOYMENTS, o=order)
        assert [d.pk for d in shown.context["cl"].result_list] == [pk for _, pk in sorted(rows, reverse=descending)]
        if connection.vendor == "postgresql":
            keys = shown.context["cl"].queryset.values("pk")[:100]  # a long list's page: its keys first
            with connection.cursor() as cursor:
                cursor.execute("SET enable_seqscan = off; SET enable_sort = off")  # a few rows: as at a million
                plan = keys.explain()
                cursor.execute("RESET enable_seqscan; RESET enable_sort")
            assert index in plan and "Sort" not in plan, plan


def test_sorted_by_release_the_deployments_follow_the_order_releases_were_registered(client, world, root):
    """Not the versions as text, which put 0.10.0 before 0.2.0 (an analyst's walk found it)."""
    releases = [world.release(version) for version in ("0.1.0", "0.2.0", "0.10.0")]
    for release in releases:
        world.deploy(release, world.qa)
    column = admin.site._registry[Deployment].list_display.index("release_to_environment")
    ascending = listing(client, root, DEPLOYMENTS, o=str(column)).context["cl"].result_list
    assert [d.release.version for d in ascending] == ["0.1.0", "0.2.0", "0.10.0"]
    nine, ten = world.build(number=9), world.build(number=10)
    column = admin.site._registry[type(nine)].list_display.index("build_number")
    shown = [b.pk for b in listing(client, root, reverse("admin:releases_build_changelist"), q="",
                                   o=f"-{column}").context["cl"].result_list]
    assert shown.index(ten.pk) < shown.index(nine.pk)  # the newer build first, not "9" before "10"
