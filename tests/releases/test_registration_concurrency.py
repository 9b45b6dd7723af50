"""Registrations on PostgreSQL at once: builds run side by side (they take no lock on their
application), releases of one application one after the other (their order is the order they reach
QA in); a build number or a release version reported by two CI runs at once is still one build or one
release."""

import hashlib
import threading
import time
from collections import Counter

import pytest
from django.db import connection, connections, transaction

from audit import chain
from audit.models import AuditEvent
from environments.models import Deployment
from releases import services
from releases.models import Build, BuildIssue, Release
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


def register_release(world, version, *, artifact="a", build=None):
    return services.release_register(
        actor=world.ci, application="MAC", version=version, build=build or world.the_build.number,
        artifact_url=f"file:///artifacts/{artifact}.tar.gz",
        artifact_sha256=hashlib.sha256(artifact.encode()).hexdigest(),
        issue_keys=["BIZPLAT-9"], implementers=["alice@example.com"],
    )


@pytest.fixture
def built(world):
    world.the_build = world.build()
    return world


def test_the_same_release_registered_at_once_is_one_release(transactional_audit_db, built):
    """Half the clients send one artifact, half another: the first one in wins, its repeats answer it
    unchanged, the others are refused as a conflict."""
    outcomes = run_at_once(lambda i: register_release(built, "5.0", artifact="ab"[i % 2])[1])

    release = Release.objects.get(application=built.app, version="5.0")
    winner = "a" if release.artifact_url.endswith("/a.tar.gz") else "b"
    same = sum(1 for i in range(len(outcomes)) if "ab"[i % 2] == winner)
    assert Counter(outcomes) == {True: 1, False: same - 1, "RELEASE_CONFLICT": len(outcomes) - same}, outcomes
    assert AuditEvent.objects.filter(action="release.register").count() == 1
    assert AuditEvent.objects.filter(action="release.register.refused", code="RELEASE_CONFLICT").count() == (
        len(outcomes) - same)
    assert chain.verify().ok


def test_releases_of_one_application_register_at_once_and_wait_in_line_in_qa(transactional_audit_db, built):
    built.qa.auto_deploy = True
    built.qa.save(update_fields=["auto_deploy"])

    outcomes = run_at_once(lambda i: register_release(built, f"6.{i}", artifact=f"r{i}")[1])

    assert outcomes == [True] * len(outcomes)
    in_qa = Counter(Deployment.objects.filter(environment=built.qa).values_list("state", flat=True))
    # one runs; of the others, the newest waits and every earlier waiting one is superseded by the next:
    # QA ends with the newest release, whatever order the registrations were sent in
    assert in_qa == {"running": 1, "queued": 1, "superseded": len(outcomes) - 2}, in_qa
    assert chain.verify().ok


def test_a_release_registered_while_the_same_version_is_being_inserted_is_its_repeat(transactional_audit_db, built):
    inserted, release = threading.Event(), threading.Event()
    answers = {}

    def first():
        try:
            with transaction.atomic():
                answers["first"] = register_release(built, "7.0")
                inserted.set()
                release.wait(30)
        finally:
            connections.close_all()

    def second():
        try:
            answers["second"] = register_release(built, "7.0")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inserted.wait(30)
    threads[1].start()
    waiting_on_a_lock(1)  # the second waits for the first's application lock
    release.set()
    for t in threads:
        t.join(60)

    (first_release, created), (again, created_again) = answers["first"], answers["second"]
    assert (created, created_again) == (True, False) and again.pk == first_release.pk
    assert Release.objects.filter(application=built.app, version="7.0").count() == 1
    assert chain.verify().ok
