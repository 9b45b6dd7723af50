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


def test_code_review_check_costs_the_same_for_one_reviewer_or_many(world):
    from releases.models import VcsAlias
    from releases.services import PullRequest

    world.production.requires_code_review = True
    world.production.save(update_fields=["requires_code_review"])
    VcsAlias.objects.create(user=world.alice, identity="alice-gh")

    def review_queries(*reviewers):
        release = world.release(pull_request=PullRequest("https://vcs/pr/1", "alice-gh", reviewers))
        implementers = policy.implementers_of(release)
        release.refresh_from_db()
        with CaptureQueriesContext(connection) as captured:
            assert policy.check_code_review(release, world.production, implementers) is None
        return len(captured)

    many = [f"reviewer{i}@example.com" for i in range(20)] + ["ALICE", "erin", "carol@example.com", "bob"]
    assert review_queries("erin") == review_queries(*many) <= 4
