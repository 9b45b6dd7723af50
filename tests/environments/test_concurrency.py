"""Concurrency on PostgreSQL: many writers at once never put two deployments on one environment,
never lose a request, and never fork the audit chain."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from audit import chain
from audit.models import AuditEvent
from environments import services
from environments.models import Deployment
from environments.policy import PolicyRefusal
from tests.conftest import person

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="select_for_update is a no-op on SQLite"),
]

THREADS = 20


def run_at_once(work, count=THREADS):
    """Run work(i) in `count` threads released together; returns each outcome (code or 'ok')."""
    barrier = threading.Barrier(count)
    outcomes: list = [None] * count

    def worker(i):
        try:
            barrier.wait()
            outcomes[i] = work(i)
        except PolicyRefusal as exc:
            outcomes[i] = exc.refusal.code
        except Exception as exc:  # anything else is a lost request
            outcomes[i] = f"ERROR {type(exc).__name__}: {exc}"
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return outcomes


def test_parallel_requests_to_one_environment(transactional_audit_db, world):
    releases = [world.release() for _ in range(THREADS)]

    outcomes = run_at_once(lambda i: services.deployment_request(
        actor=world.ci, release=releases[i], environment=world.qa).state)

    assert Counter(outcomes) == {"queued": 1, "ENVIRONMENT_BUSY": THREADS - 1}, outcomes
    assert Deployment.objects.filter(environment=world.qa, state__in=["queued", "running"]).count() == 1
    refusals = AuditEvent.objects.filter(action="deployment.request.refused", code="ENVIRONMENT_BUSY").count()
    requests = AuditEvent.objects.filter(action="deployment.request").count()
    assert refusals + requests == THREADS  # every attempt is on record
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

    assert Counter(outcomes) == {"queued": 1, "ENVIRONMENT_BUSY": THREADS - 1}, outcomes
    production = Deployment.objects.filter(environment=world.production)
    assert production.count() == THREADS  # no request lost
    assert production.filter(state="queued").count() == 1
    assert production.filter(state="awaiting_approval").count() == THREADS - 1
    result = chain.verify()
    assert result.ok, result.problem
    seqs = list(AuditEvent.objects.values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))


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
