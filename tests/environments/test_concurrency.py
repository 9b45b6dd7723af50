"""Concurrency on PostgreSQL: many writers at once never put two deployments on one environment,
never lose a request, and never fork the audit chain."""

from collections import Counter

import pytest
from django.db import connection

from audit import chain
from audit.models import AuditEvent
from environments import services
from environments.models import Deployment
from tests.concurrency import THREADS, run_at_once
from tests.conftest import person

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="select_for_update is a no-op on SQLite"),
]

def drain(environment) -> list[str]:
    """Finish whatever runs until the queue is empty; returns the final states in request order."""
    for _ in range(THREADS * 3):
        assert Deployment.objects.filter(environment=environment, state="running").count() <= 1
        running = Deployment.objects.filter(environment=environment, state="running").first()
        if running is None:
            break
        services.deployment_record_result(deployment_id=running.pk, state="succeeded")
    assert not Deployment.objects.filter(environment=environment, state__in=["queued", "running"]).exists()
    return list(Deployment.objects.filter(environment=environment).order_by("id").values_list("state", flat=True))


def test_parallel_requests_to_one_environment_wait_in_order(transactional_audit_db, world):
    releases = [world.release() for _ in range(THREADS)]

    outcomes = run_at_once(lambda i: services.deployment_request(
        actor=person(world.alice), release=releases[i], environment=world.qa).state)

    assert Counter(outcomes) == {"running": 1, "queued": THREADS - 1}, outcomes
    assert AuditEvent.objects.filter(action="deployment.request").count() == THREADS  # nothing refused, nothing lost
    assert drain(world.qa) == ["succeeded"] * THREADS
    assert chain.verify().ok


def test_parallel_requests_and_approvals_on_production(transactional_audit_db, world):
    releases = [world.release() for _ in range(THREADS)]
    for release in releases:
        world.to_staging(release)
    approvers = [world.carol, world.erin]

    def request_then_approve(i):
        deployment = services.deployment_request(actor=person(world.bob), release=releases[i],
                                                 environment=world.production)
        return services.deployment_approve(actor=person(approvers[i % 2]), deployment_id=deployment.pk).state

    outcomes = run_at_once(request_then_approve)

    assert Counter(outcomes) == {"running": 1, "queued": THREADS - 1}, outcomes
    assert Deployment.objects.filter(environment=world.production).count() == THREADS  # no request lost
    assert drain(world.production) == ["succeeded"] * THREADS
    result = chain.verify()
    assert result.ok, result.problem
    seqs = list(AuditEvent.objects.values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


def test_storm_of_finishing_cancelling_and_requesting(transactional_audit_db, world):
    """Threads finish the running deployment, cancel waiting ones and request new ones, all at once."""
    first = [world.release() for _ in range(THREADS // 2)]
    for release in first:
        services.deployment_request(actor=person(world.alice), release=release, environment=world.qa)
    later = [world.release() for _ in range(THREADS)]

    def work(i):
        kind = i % 4
        if kind == 0:
            running = Deployment.objects.filter(environment=world.qa, state="running").first()
            if running is None:
                return "idle"
            return services.deployment_record_result(deployment_id=running.pk, state="succeeded").state
        if kind == 1:
            waiting = Deployment.objects.filter(environment=world.qa, state="queued").order_by("-id").first()
            if waiting is None:
                return "none"
            return services.deployment_cancel(actor=person(world.alice), deployment_id=waiting.pk).state
        return services.deployment_request(actor=person(world.alice), release=later[i],
                                           environment=world.qa).state

    outcomes = run_at_once(work)

    assert not [o for o in outcomes if str(o).startswith("ERROR")], outcomes
    requested = THREADS // 2 + sum(1 for i in range(THREADS) if i % 4 in (2, 3))
    assert Deployment.objects.filter(environment=world.qa).count() == requested  # nothing lost
    states = Counter(drain(world.qa))
    assert set(states) <= {"succeeded", "cancelled"} and sum(states.values()) == requested, states
    assert chain.verify().ok


def test_storm_of_fifty_conflicting_calls_on_production(transactional_audit_db, world, make_user):
    """50 calls at once on one restricted environment: requests, approvals, rejections, cancels and
    results. At most one runs, no request is lost, approvers are distinct, the queue drains, the chain
    verifies."""
    approvers = [world.carol, world.erin, *(make_user(f"approver{i}", groups=[world.releasers]) for i in range(3))]
    releases = [world.release() for _ in range(20)]
    for release in releases:
        world.to_staging(release)
    pending = [services.deployment_request(actor=person(world.bob), release=r, environment=world.production)
               for r in releases[:10]]
    later = releases[10:]

    def work(i):
        kind = i % 5
        if kind == 0:
            return services.deployment_request(actor=person(world.bob), release=later[i // 5],
                                               environment=world.production).state
        if kind in (1, 2):  # two approvals race on the same request
            target = pending[(i // 5) % len(pending)]
            return services.deployment_approve(actor=person(approvers[i % len(approvers)]),
                                               deployment_id=target.pk).state
        if kind == 3:
            target = pending[(i // 5 + 5) % len(pending)]
            decide = services.deployment_reject if i % 2 else services.deployment_cancel
            actor = person(approvers[(i + 1) % len(approvers)]) if decide is services.deployment_reject \
                else person(world.bob)
            return decide(actor=actor, deployment_id=target.pk, comment="storm").state
        running = Deployment.objects.filter(environment=world.production, state="running").first()
        if running is None:
            return "idle"
        return services.deployment_record_result(deployment_id=running.pk, state="succeeded").state

    outcomes = run_at_once(work, count=50)

    assert not [o for o in outcomes if str(o).startswith("ERROR")], outcomes
    production = Deployment.objects.filter(environment=world.production)
    assert production.count() == 10 + len({i // 5 for i in range(50) if i % 5 == 0})  # nothing lost
    assert production.filter(state="running").count() <= 1
    for deployment in production:
        approvers_of = list(deployment.approvals.values_list("approver_id", flat=True))
        assert len(approvers_of) == len(set(approvers_of))  # distinct people
        assert world.bob.pk not in approvers_of
    for deployment in production.filter(state="awaiting_approval"):
        services.deployment_approve(actor=person(world.carol), deployment_id=deployment.pk)
    final = Counter(drain(world.production))
    assert set(final) <= {"succeeded", "cancelled", "rejected"}, final
    result = chain.verify()
    assert result.ok, result.problem


def test_eight_writers_appending_at_once_never_fork_the_chain(transactional_audit_db):
    """The chain lock serializes appends: every event is numbered once, linked to the one before."""
    from django.db import transaction

    from audit.actors import Actor

    writers, each = 8, 25
    actor = Actor.system(via="test")

    def append_many(i):
        for n in range(each):
            with transaction.atomic():
                chain.append(actor=actor, action="test.concurrent", data={"writer": i, "n": n})
        return "ok"

    outcomes = run_at_once(append_many, count=writers)

    assert outcomes == ["ok"] * writers, outcomes
    result = chain.verify()
    assert result.ok and result.count == writers * each, result.problem
    assert list(AuditEvent.objects.values_list("seq", flat=True)) == list(range(1, writers * each + 1))
    per_writer = Counter(AuditEvent.objects.values_list("data__writer", flat=True))
    assert per_writer == dict.fromkeys(range(writers), each)


def _pause_after(monkeypatch, action: str, seconds: float = 1.5):
    """Hold every transaction that appends `action` just after that append (the chain's lock held)."""
    import time

    original = chain.append

    def append(**kwargs):
        event = original(**kwargs)
        if kwargs.get("action") == action:
            time.sleep(seconds)
        return event

    monkeypatch.setattr(chain, "append", append)


def test_a_release_deploying_itself_and_a_finish_there_never_deadlock(transactional_audit_db, world, monkeypatch):
    """A registration that deploys itself to QA, and the end of the deployment running in QA, at once:
    each locks QA before it takes the chain's lock, so one waits for the other and both go through."""
    import time

    world.qa.auto_deploy = True
    world.qa.save(update_fields=["auto_deploy"])
    running = Deployment.objects.get(release=world.release("8.0.0"), environment=world.qa)  # deployed itself
    build = world.build()
    _pause_after(monkeypatch, "release.register")

    def work(i):
        if i == 0:
            world.release("8.1.0", build=build)
        else:
            time.sleep(0.5)  # while the registration holds the chain
            services.deployment_record_result(deployment_id=running.pk, state=Deployment.State.SUCCEEDED)
        return "ok"

    assert run_at_once(work, count=2) == ["ok", "ok"]
    assert chain.verify().ok


def test_a_success_going_on_to_staging_and_a_request_there_never_deadlock(transactional_audit_db, world, monkeypatch):
    """A success in QA goes on to Staging by itself, while someone asks for Staging: the success locks
    Staging before it takes the chain's lock, so the request waits for it (or it for the request)."""
    import time

    first, second = world.release("8.2.0"), world.release("8.3.0")
    world.deploy(second, world.qa)
    world.staging.auto_deploy = True
    world.staging.save(update_fields=["auto_deploy"])
    running = services.deployment_request(actor=world.ci, release=first, environment=world.qa)
    _pause_after(monkeypatch, "deployment.finish")

    def work(i):
        if i == 0:
            services.deployment_record_result(deployment_id=running.pk, state=Deployment.State.SUCCEEDED)
        else:
            time.sleep(0.5)  # while the success holds the chain
            services.deployment_request(actor=person(world.alice), release=second, environment=world.staging)
        return "ok"

    assert run_at_once(work, count=2) == ["ok", "ok"]
    assert chain.verify().ok
