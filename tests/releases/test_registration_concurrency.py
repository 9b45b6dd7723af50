"""Registrations on PostgreSQL at once: builds run side by side (they take no lock on their
application), releases of one application one after the other (their order is the order they reach
QA in); a build number or a release version reported by two CI runs at once is still one build or one
release."""

import hashlib
import json
import threading
import time
from collections import Counter

import pytest
from django.db import connection, connections, transaction

from audit import chain
from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments.models import Deployment
from releases import services
from releases.models import Application, Build, BuildIssue, Release
from releases.selectors import application_get
from tests.concurrency import held_open_while_another_waits
from tests.conftest import SYSTEM
from tests.environments.test_concurrency import run_at_once

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite runs one writer at a time"),
]


def register(world, number, status="successful", branch="feature/BIZPLAT-9-x", commit="abc123"):
    return services.build_register(actor=world.ci, application="MAC", number=number, commit=commit,
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


def test_a_build_reported_while_the_same_number_is_being_inserted_is_its_update(transactional_audit_db, world):
    """The second report finds no build, waits for the first one's insert to commit, and is then
    answered from that build: here an update of it (in progress -> successful)."""
    (build, created), (again, created_again) = held_open_while_another_waits(
        lambda: register(world, "77", status="in_progress"), lambda: register(world, "77", status="successful"))

    assert (created, created_again) == (True, False)
    assert again.pk == build.pk and again.status == "successful"
    assert list(AuditEvent.objects.filter(object_id=str(build.pk), action__startswith="build.")
                .order_by("seq").values_list("action", flat=True)) == ["build.register", "build.update"]
    assert chain.verify().ok


def test_saving_an_application_while_one_of_its_builds_registers_does_not_deadlock(transactional_audit_db, world):
    """The build's foreign key is checked before it asks for the chain's lock, so the application's
    save waits for the build, not the build's commit for the save (which would wait for the chain)."""
    def save():
        app = Application.objects.get(pk=world.app.pk)
        app.description = "Renamed team"
        return services.application_save(actor=SYSTEM, application=app)

    (build, created), saved = held_open_while_another_waits(lambda: register(world, "90"), save)

    assert created and Build.objects.filter(pk=build.pk).exists()
    assert Application.objects.get(pk=world.app.pk).description == "Renamed team", saved
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
    (first_release, created), (again, created_again) = held_open_while_another_waits(
        lambda: register_release(built, "7.0"), lambda: register_release(built, "7.0"))  # the second waits

    assert (created, created_again) == (True, False) and again.pk == first_release.pk
    assert Release.objects.filter(application=built.app, version="7.0").count() == 1
    assert chain.verify().ok


def test_a_release_and_a_report_on_its_build_do_not_deadlock(transactional_audit_db, built):
    """The release's foreign key to its build is checked before the chain's lock, and the report (a
    finished build reported failed: refused) locks the build without excluding that check."""
    (release, created), refusal = held_open_while_another_waits(
        lambda: register_release(built, "8.0"),
        lambda: register(built, built.the_build.number, status="failed", branch=built.the_build.branch,
                         commit=built.the_build.commit))

    assert created and Release.objects.filter(pk=release.pk).exists()
    assert isinstance(refusal, PolicyRefusal) and refusal.refusal.code == "BUILD_FINISHED", refusal
    assert chain.verify().ok


def test_an_unknown_token_takes_no_lock_on_a_build(transactional_audit_db, world, client):
    """The token is known before any row is locked: a request with an unknown one does not wait for a
    build that an update holds (and so cannot hold up its updates either)."""
    build = world.build()
    locked, watching, stop = threading.Event(), threading.Event(), threading.Event()
    seen_waiting = []

    def hold_the_build():
        try:
            with transaction.atomic():
                Build.objects.select_for_update().get(pk=build.pk)
                locked.set()
                stop.wait(30)
        finally:
            connections.close_all()

    def watch():
        try:
            with connection.cursor() as cursor:
                while not stop.is_set():
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock'")
                    seen_waiting.append(cursor.fetchone()[0])
                    watching.set()
                    time.sleep(0.01)
        finally:
            connections.close_all()

    holder, watcher = threading.Thread(target=hold_the_build), threading.Thread(target=watch)
    holder.start()
    try:
        assert locked.wait(30)
        watcher.start()
        assert watching.wait(30)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")  # a request that waited would wait this long
        response = client.post("/api/v1/builds", json.dumps({
            "application": "MAC", "number": build.number, "commit": build.commit, "branch": build.branch,
            "status": "failed"}), content_type="application/json", HTTP_AUTHORIZATION="Bearer rp_not-a-token")
    finally:
        stop.set()
        holder.join(60)
        watcher.join(60)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert response.status_code == 401, response.content
    assert seen_waiting and max(seen_waiting) == 0
