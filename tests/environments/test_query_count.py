"""The policy decision costs a fixed number of queries, whatever the size of the history."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from core.decisions import Next
from environments import policy
from tests.conftest import person


def decide(world, release):
    with CaptureQueriesContext(connection) as captured:
        decision = policy.decide_request(actor=person(world.bob), release=release, environment=world.production)
    assert decision.allowed, decision.refusal
    return len(captured)


def approval_queries(world, deployment):
    with CaptureQueriesContext(connection) as captured:
        decision = policy.decide_approval(actor=person(world.carol), deployment=deployment, approve=True)
    assert decision.allowed and decision.next == Next.QUEUE
    return len(captured)


def test_policy_queries_do_not_grow_with_history(world):
    from environments import services

    def fresh_release():
        release = world.release(implementers=["alice@example.com", "x@example.com"])
        world.to_staging(release)
        release.refresh_from_db()
        return release

    small = fresh_release()
    small_count = decide(world, small)
    pending = services.deployment_request(actor=person(world.bob), release=small, environment=world.production)
    small_approval = approval_queries(world, pending)
    services.deployment_cancel(actor=person(world.bob), deployment_id=pending.pk)

    for _ in range(15):  # a longer history: releases, deployments, approvals, audit events
        other = fresh_release()
        world.deploy(other, world.production, actor=person(world.bob))
    large = fresh_release()
    assert decide(world, large) == small_count
    pending = services.deployment_request(actor=person(world.bob), release=large, environment=world.production)
    assert approval_queries(world, pending) == small_approval
    assert small_count <= 10
