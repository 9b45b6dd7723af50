"""core.compiled: a read compiled once answers exactly what the ORM answers for the same queryset,
on either database, whatever the values (and the length of a collection) it is called with."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models import Count, OuterRef, Q, Subquery, Value
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from core.compiled import CompiledRead, together
from environments.models import Deployment, Environment
from releases.models import Application, Implementer, Release, ReleaseIssue


def _deployments(release_id):
    return Deployment.objects.filter(release_id=release_id).order_by("id").values_list(
        "id", "environment__name", "state", "automatic", "requested_at", "finished_at", "sod_checks")


def _releases(application, within):
    return Release.objects.filter(application__name=application, application_id__in=within).order_by("pk").values(
        "id", "version", "application__name", "pull_request_reviewers", "registered_at")


def _keys_and_identities(release_id):
    keys = ReleaseIssue.objects.filter(release_id=release_id).order_by().values_list(Value("key"), "key")
    identities = Implementer.objects.filter(release_id=release_id).order_by().values_list(Value("who"), "identity")
    return keys.union(identities, all=True)


def _environments(application_id):
    last = Deployment.objects.filter(environment=OuterRef("pk")).order_by("-requested_at", "-id")
    return (Environment.objects.filter(application_id=application_id)
            .annotate(last_state=Subquery(last.values("state")[:1]),
                      open_count=Count("deployments", filter=Q(deployments__state__in=Deployment.OPEN_STATES)))
            .order_by("id").values("id", "last_state", "name", "open_count"))


DEPLOYMENTS = CompiledRead(_deployments, int)
RELEASES = CompiledRead(_releases, str, (int,))
KEYS_AND_IDENTITIES = CompiledRead(_keys_and_identities, int)
ENVIRONMENTS = CompiledRead(_environments, int)


@pytest.fixture
def history(world):
    first = world.release(implementers=["alice@example.com", "x@example.com"], issue_keys=["BIZPLAT-1", "BIZPLAT-2"])
    world.to_staging(first)
    second = world.release(implementers=[])
    world.deploy(second, world.qa, result=Deployment.State.FAILED)
    return world, first, second


def test_rows_are_the_orms_for_any_values(history):
    world, first, second = history
    for release in (first, second):
        assert DEPLOYMENTS.tuples(release.pk) == list(_deployments(release.pk))
        assert sorted(KEYS_AND_IDENTITIES.tuples(release.pk)) == sorted(_keys_and_identities(release.pk))
    assert DEPLOYMENTS.tuples(first.pk)[0][3] in (True, False)  # converted like the ORM's (SQLite answers 0/1)
    assert ENVIRONMENTS.dicts(world.app.pk) == list(_environments(world.app.pk))
    assert ENVIRONMENTS.dicts(world.app.pk + 1000) == []


def test_reads_run_together_answer_what_each_answers_alone_in_one_round_trip(history):
    world, first, second = history
    reads = (DEPLOYMENTS.later(first.pk), KEYS_AND_IDENTITIES.later(second.pk), ENVIRONMENTS.later(world.app.pk),
             RELEASES.later("MAC", [world.app.pk]), RELEASES.later("MAC", []), DEPLOYMENTS.later(-1))
    with CaptureQueriesContext(connection) as captured:
        together(*reads)
        deployments, keys, environments, releases, none, empty = reads
        answers = (deployments.tuples(), sorted(keys.tuples()), environments.dicts(), releases.dicts(),
                   none.dicts(), empty.tuples())
    assert answers == (
        list(_deployments(first.pk)), sorted(_keys_and_identities(second.pk)), list(_environments(world.app.pk)),
        list(_releases("MAC", [world.app.pk])), [], [],
    )
    # an empty collection reads nothing; the rest: one statement on PostgreSQL, one each elsewhere
    assert len(captured) == (1 if connection.vendor == "postgresql" else 5)
    with CaptureQueriesContext(connection) as captured:
        together(*reads)  # read already: nothing runs again
        assert deployments.tuples() == answers[0]
    assert len(captured) == 0


def test_a_read_that_may_not_be_needed_joins_a_round_trip_and_otherwise_waits_to_be_asked(history):
    world, first, second = history
    needed, maybe = DEPLOYMENTS.later(first.pk), KEYS_AND_IDENTITIES.later(first.pk)
    with CaptureQueriesContext(connection) as captured:
        together(needed, maybe=(maybe,))
    batched = connection.vendor == "postgresql"
    assert len(captured) == 1  # on PostgreSQL both in one round trip; elsewhere the needed one alone
    expected = sorted(_keys_and_identities(first.pk))
    with CaptureQueriesContext(connection) as captured:
        assert sorted(maybe.tuples()) == expected
    assert len(captured) == (0 if batched else 1)  # elsewhere read once asked
    assert needed.tuples() == list(_deployments(first.pk))

    alone = KEYS_AND_IDENTITIES.later(second.pk)
    with CaptureQueriesContext(connection) as captured:
        together(maybe=(alone,))  # nothing else goes to the database: nothing is read
    assert len(captured) == 0
    assert sorted(alone.tuples()) == sorted(_keys_and_identities(second.pk))


def test_a_collection_compiles_once_per_length_and_an_empty_one_reads_nothing(history):
    world, first, second = history
    for within in ([world.app.pk], [world.app.pk, world.app.pk + 1000], {world.app.pk + 1000}, ()):
        assert RELEASES.dicts("MAC", within) == list(_releases("MAC", within))
    with CaptureQueriesContext(connection) as captured:
        assert RELEASES.dicts("MAC", frozenset()) == []
    assert len(captured) == 0
    assert RELEASES.dicts("HAMS", [world.app.pk]) == []


def test_the_queryset_is_built_once_per_database_and_shape(history):
    world, first, second = history
    built = []
    read = CompiledRead(lambda release_id: built.append(release_id) or _deployments(release_id), int)
    assert [read.tuples(r.pk) for r in (first, second, first)] == [list(_deployments(r.pk))
                                                                   for r in (first, second, first)]
    assert len(built) == 1


def test_a_value_the_lookup_rewrites_is_refused(world):
    read = CompiledRead(lambda name: Release.objects.filter(version__startswith=name).values_list("id"), str)
    with pytest.raises(ValueError, match="Each argument"):
        read.tuples("1.")


def test_a_value_a_lookup_rewrites_is_refused_even_where_the_argument_is_also_used_as_it_is(world):
    read = CompiledRead(lambda name: Release.objects.filter(
        Q(version=name) | Q(version__icontains=name)).values_list("id"), str)  # the second is escaped
    with pytest.raises(ValueError, match="rewritten by a lookup"):
        read.tuples("1.0")


@pytest.mark.skipif(not connection.features.has_select_for_update, reason="SQLite takes no row locks")
def test_a_locking_read_is_refused_outside_a_transaction_after_it_was_compiled_inside_one(transactional_audit_db):
    qa = Environment.objects.create(application=Application.objects.create(name="MAC"), name="QA")
    read = CompiledRead(lambda pk: Environment.objects.select_for_update().filter(pk=pk).values_list("id"), int)
    with transaction.atomic():
        assert read.tuples(qa.pk) == [(qa.pk,)]
    with pytest.raises(TransactionManagementError, match="outside of a transaction"):
        read.tuples(qa.pk)  # the lock would be let go at once


def test_instances_are_the_models_rows_with_the_other_fields_deferred(world):
    read = CompiledRead(lambda name: Application.objects.filter(name=name).values("id", "name"), str)
    [application] = read.instances(Application, "MAC")
    assert (application.pk, application.name) == (world.app.pk, "MAC")
    assert application.get_deferred_fields() == {"issue_key_prefix", "issue_url_pattern", "description"}
    assert application.issue_key_prefix == "BIZPLAT"  # loaded when asked, as with only()
    backwards = CompiledRead(lambda name: Application.objects.filter(name=name).values("name", "id"), str)
    with pytest.raises(ValueError, match="in their order"):
        backwards.instances(Application, "MAC")


def test_a_datetime_argument_is_compared_as_the_orm_compares_it(history):
    world, first, second = history
    read = CompiledRead(lambda before: Deployment.objects.filter(requested_at__lt=before).order_by("id")
                        .values_list("id"), dt.datetime)
    moments = sorted(Deployment.objects.values_list("requested_at", flat=True))
    for moment in (moments[0], moments[-1], moments[-1] + dt.timedelta(microseconds=1)):
        assert read.tuples(moment) == list(Deployment.objects.filter(requested_at__lt=moment).order_by("id")
                                           .values_list("id"))
    with pytest.raises(ValueError, match="aware"):
        read.tuples(moments[0].replace(tzinfo=None))


class Refused(Exception):
    pass


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="statements are prepared on PostgreSQL only")
def test_on_postgresql_the_statement_is_prepared_once_per_session_and_outlives_a_rollback(transactional_audit_db):
    Application.objects.create(name="MAC", issue_key_prefix="BIZPLAT")
    read = CompiledRead(lambda name: Application.objects.filter(name=name).values_list("name"), str)
    connection.close()  # a new session
    with pytest.raises(Refused), transaction.atomic():
        assert read.tuples("MAC") == [("MAC",)]  # prepared in a transaction that rolls back
        raise Refused
    with CaptureQueriesContext(connection) as captured:
        assert read.tuples("MAC") == [("MAC",)]
        assert read.tuples("HAMS") == []
    assert [q["sql"].split("(")[0] for q in captured] == [captured[0]["sql"].split("(")[0]] * 2
    assert captured[0]["sql"].startswith("EXECUTE compiled_read_")
    connection.close()  # another session prepares it again
    assert read.tuples("MAC") == [("MAC",)]


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="statements are prepared on PostgreSQL only")
def test_in_a_broken_transaction_a_read_is_refused_as_the_orms(transactional_audit_db):
    read = CompiledRead(lambda name: Application.objects.filter(name=name).values_list("name"), str)
    connection.close()  # a new session: the statement is not prepared yet
    with pytest.raises(TransactionManagementError), transaction.atomic():
        with contextlib.suppress(DatabaseError), transaction.atomic(savepoint=False):
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")
        read.tuples("MAC")
    assert read.tuples("MAC") == []


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="statements are prepared on PostgreSQL only")
def test_on_postgresql_only_the_arguments_are_parameters_so_one_plan_serves_every_call(history):
    """The queryset's own values (here the open states, a Count filter) are constants of the prepared
    statement: PostgreSQL can keep one generic plan rather than plan again on every call."""
    world, first, second = history
    read = CompiledRead(_environments, int)
    for _ in range(7):  # PostgreSQL weighs a generic plan after five custom ones
        assert read.dicts(world.app.pk) == list(_environments(world.app.pk))
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement, parameter_types::text, generic_plans FROM pg_prepared_statements"
                       " WHERE statement LIKE %s", ["%environments_environment%open_count%"])
        (statement, types, generic_plans), = cursor.fetchall()
    assert types == "{bigint}" or types == "{integer}"  # the application only
    assert "'queued'" in statement and "'running'" in statement
    assert generic_plans > 0


@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="statements are prepared on PostgreSQL only")
def test_a_constant_is_written_into_the_prepared_statement_as_the_value_it_is(history):
    world, first, second = history
    tricky = "it's 50%s %% \\ done"
    read = CompiledRead(lambda app: Environment.objects.filter(application_id=app, name__startswith="Q").order_by(
        "id").values_list(Value(tricky), "name"), int)
    assert read.tuples(world.app.pk) == [(tricky, "QA")]
