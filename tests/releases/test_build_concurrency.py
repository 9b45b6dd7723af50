"""Build registrations on PostgreSQL run side by side: they take no lock on their application, and a
build number reported by two CI runs at once is still one build."""

import threading
import time
from collections import Counter

import pytest
from django.db import connection, connections, transaction

from audit import chain
from audit.models import AuditEvent
from releases import services
from releases.models import Build, BuildIssue
from releases.selectors import application_get
from tests.environments.test_concurrency import run_at_once

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite runs one writer at a time"),
]


def register(world, number, status="successful", branch="feature/BIZPLAT-9-x"):
    return services.build_register(actor=world.ci, application="MAC", number=number, commit="abc123",
                                   branch=branch, status=status)


def test_builds_of_one_application_register_at_once(transactional_audit_db, world):
    outcomes = run_at_once(lambda i: register(world, f"b{i}")[1])

    assert outcomes == [True] * len(outcomes)
    assert Build.objects.filter(application=world.app).count() == len(outcomes)
    assert BuildIssue.objects.filter(key="BIZPLAT-9").count() == len(outcomes)
    assert AuditEvent.objects.filter(action="build.register").count() == len(outcomes)
    assert chain.verify().ok


def test_the_same_build_reported_at_once_is_one_build(transactional_audit_db, world):
    outcomes = run_at_once(lambda i: register(world, "42")[1])

    assert Counter(outcomes) == {True: 1, False: len(outcomes) - 1}, outcomes
    assert Build.objects.filter(application=world.app, number="42").count() == 1
    assert BuildIssue.objects.filter(build__number="42").count() == 1
    assert AuditEvent.objects.filter(action__startswith="build.").count() == 1  # the repeats change nothing
    assert chain.verify().ok


def waiting_on_a_lock(count: int, seconds: float = 30) -> None:
    """Until `count` other sessions of this database wait for a lock."""
    deadline = time.monotonic() + seconds
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'")
            if cursor.fetchone()[0] >= count:
                return
            time.sleep(0.02)
    raise AssertionError(f"{count} session(s) never waited for a lock")


def test_a_build_reported_while_the_same_number_is_being_inserted_is_its_update(transactional_audit_db, world):
    """The second report finds no build, waits for the first one's insert to commit, and is then
    answered from that build: here an update of it (in progress -> successful)."""
    inserted, release = threading.Event(), threading.Event()
    answers = {}

    def first():
        try:
            with transaction.atomic():
                answers["first"] = register(world, "77", status="in_progress")
                inserted.set()
                release.wait(30)
        finally:
            connections.close_all()

    def second():
        try:
            answers["second"] = register(world, "77", status="successful")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inserted.wait(30)
    threads[1].start()
    waiting_on_a_lock(1)  # the second's insert waits for the first's uncommitted row
    release.set()
    for t in threads:
        t.join(60)

    (build, created), (again, created_again) = answers["first"], answers["second"]
    assert (created, created_again) == (True, False)
    assert again.pk == build.pk and again.status == "successful"
    assert list(AuditEvent.objects.filter(object_id=str(build.pk), action__startswith="build.")
                .order_by("seq").values_list("action", flat=True)) == ["build.register", "build.update"]
    assert chain.verify().ok


def test_a_build_registration_does_not_wait_for_its_applications_lock(transactional_audit_db, world):
    """A release registration holds the application's row (as an administrator's change of it does):
    builds of it still register meanwhile."""
    locked, release = threading.Event(), threading.Event()

    def hold_the_application():
        try:
            with transaction.atomic():
                application_get(world.app.name, lock=True)  # as release_register does
                locked.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_application)
    holder.start()
    try:
        assert locked.wait(30)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '5s'")  # a wait for the row would fail the test, not hang it
        build, created = register(world, "88")
        assert created and Build.objects.filter(pk=build.pk).exists()
    finally:
        release.set()
        holder.join(60)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
