"""The audit list's search, as an auditor uses it: each word somewhere in the person, the object, the
action or the code, in any case; an action or a refusal code typed whole finds exactly its events. On
PostgreSQL the search and a filtered list's dates read indexes, not every event (checked on the plan,
since a test's table is too small for timings to say anything)."""

import pytest
from django.db import connection, transaction
from django.db.models import Max, Min
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit import chain
from audit.actors import Actor
from audit.admin import AuditEventAdmin
from audit.models import AuditEvent
from edge.lists import CalendarChangeList

postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="the indexes are PostgreSQL's")


@pytest.fixture
def events(db, make_user):
    carol = make_user("carol")
    with transaction.atomic():
        for action, who, repr_, code in [
            ("deployment.approve", carol, "#7 MAC 1.0.7 -> Production", ""),
            ("deployment.request", None, "#8 MAC 1.0.8 -> Production", ""),
            ("deployment.refuse", carol, "#9 MAC 1.0.9 -> Production", "SOD_IMPLEMENTER_APPROVER"),
            ("release.register", None, "MAC 1.0.10", ""),
            ("deployment.request_again", None, "#11 MAC 1.0.11 -> Production", ""),
        ]:
            actor = Actor(user=who, via="admin") if who else Actor.system(via="auto")
            chain.append(actor=actor, action=action, object_type="environments.deployment",
                         object_id=repr_.split()[0].lstrip("#"), object_repr=repr_, code=code)
    return {e.object_repr: e.seq for e in AuditEvent.objects.all()}


@pytest.fixture
def auditor(client, make_user):
    client.force_login(make_user("audrey", perms=["audit.view_auditevent"]))
    return client


def listed(client, **params) -> list[str]:
    response = client.get(reverse("admin:audit_auditevent_changelist"), params)
    assert response.status_code == 200
    return sorted(e.object_repr for e in response.context["cl"].result_list
                  if e.object_type == "environments.deployment")  # (not the users the fixtures made)


@pytest.mark.parametrize(("term", "found"), [
    ("CAROL", ["#7 MAC 1.0.7 -> Production", "#9 MAC 1.0.9 -> Production"]),  # a person, any case
    ("1.0.8", ["#8 MAC 1.0.8 -> Production"]),  # part of an object
    ("mac production", ["#11 MAC 1.0.11 -> Production", "#7 MAC 1.0.7 -> Production",
                        "#8 MAC 1.0.8 -> Production", "#9 MAC 1.0.9 -> Production"]),  # every word, anywhere
    ("carol 1.0.9", ["#9 MAC 1.0.9 -> Production"]),
    # an action, whole: with the actions it is part of
    ("deployment.request", ["#11 MAC 1.0.11 -> Production", "#8 MAC 1.0.8 -> Production"]),
    ("sod_implementer_approver", ["#9 MAC 1.0.9 -> Production"]),  # a refusal code, whole, any case
    ("register", ["MAC 1.0.10"]),  # part of an action
    ('"carol deployment"', []),  # one phrase never spans two columns
    ("nobody", []),
    ("%", []),  # LIKE's wildcards are looked for as they are
    ("r_g", []),
])
def test_each_word_is_found_somewhere_in_the_person_object_action_or_code(auditor, events, term, found):
    assert listed(auditor, q=term) == found


def test_a_searched_list_offers_the_dates_of_what_it_found(auditor, events):
    today = AuditEvent.objects.get(seq=events["#7 MAC 1.0.7 -> Production"]).created_at
    page = auditor.get(reverse("admin:audit_auditevent_changelist"), {"q": "carol"})
    assert f"?created_at__day={today.day}&amp;created_at__month={today.month}" in page.content.decode()
    empty = auditor.get(reverse("admin:audit_auditevent_changelist"), {"q": "nobody"})
    assert empty.status_code == 200 and "created_at__day" not in empty.content.decode()


def _plan(queryset) -> str:
    """How PostgreSQL finds the rows (in no order: the list's order would walk the seq index)."""
    sql, params = queryset.order_by().query.sql_with_params()
    with transaction.atomic(), connection.cursor() as cursor:
        # A few rows: the planner would read them all, or walk any index and filter.
        cursor.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_indexscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


@postgresql_only
def test_a_search_reads_the_trigram_index_of_the_searched_text(rf, events):
    admin = AuditEventAdmin(AuditEvent, None)
    found, _ = admin.get_search_results(rf.get("/"), AuditEvent.objects.all(), "carol 1.0.9")
    assert "auditevent_search_trgm" in _plan(found)
    exact, _ = admin.get_search_results(rf.get("/"), AuditEvent.objects.all(), "deployment.request")
    assert "auditevent_action_time_idx" in _plan(exact)


@postgresql_only
def test_a_filtered_list_reads_its_first_and_last_time_from_the_filters_index(events):
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("EXPLAIN SELECT MIN(created_at), MAX(created_at) FROM audit_auditevent"
                       " WHERE action = %s", ["deployment.approve"])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "auditevent_action_time_idx" in plan, plan


def test_the_dates_of_a_few_events_are_read_once_and_match_the_events(events):
    class Listed:  # what the date hierarchy sees of a change list
        queryset = AuditEvent.objects.filter(actor_username="carol").order_by("-seq")
        result_count = 2

    calendar = CalendarChangeList(Listed()).queryset
    assert calendar._few == 2
    with CaptureQueriesContext(connection) as captured:
        bounds = calendar.aggregate(first=Min("created_at"), last=Max("created_at"))
        days = calendar.datetimes("created_at", "day")
    carols = AuditEvent.objects.filter(actor_username="carol")
    assert bounds == carols.aggregate(first=Min("created_at"), last=Max("created_at"))
    assert days and len(captured) == 1


def test_the_dates_of_a_list_counted_only_up_to_the_cap_are_read_over_all_of_it(events, settings):
    settings.PORTAL_EXACT_COUNT_LIMIT = 2

    class Paginator:
        count_label = "more than 2"  # the paginator stopped counting: the list holds more

    class Listed:
        queryset = AuditEvent.objects.filter(object_type="environments.deployment").order_by("-seq")
        result_count, paginator = 2, Paginator()

    calendar = CalendarChangeList(Listed()).queryset
    assert calendar._few is None  # its bounds are then read over the whole list, not over two of its rows
    assert calendar.bounds("created_at") == Listed.queryset.aggregate(first=Min("created_at"),
                                                                        last=Max("created_at"))
