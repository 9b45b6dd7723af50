"""Every rule of DESIGN.md, allowed and refused, through the services that all entry points use."""

import datetime as dt
import hashlib

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments import policy, selectors, services
from environments.models import Deployment, FreezeWindow
from releases.models import VcsAlias
from releases.services import PullRequest
from tests.conftest import SYSTEM, ci_actor, person

State = Deployment.State


def refused(code, call, *args, **kwargs):
    with pytest.raises(PolicyRefusal) as info:
        call(*args, **kwargs)
    assert info.value.refusal.code == code, info.value.refusal
    event = AuditEvent.objects.order_by("-seq").first()
    assert event.code == code and event.action.endswith(".refused")
    assert event.data["detail"] == info.value.refusal.detail
    return info.value.refusal


def request(world, release, env, user=None, **kw):
    actor = person(user) if user is not None else world.ci
    return services.deployment_request(actor=actor, release=release, environment=env, **kw)


# rule 1: promotion path
def test_release_must_reach_previous_environment_first(world):
    release = world.release()
    refusal = refused("PROMOTION_PATH", request, world, release, world.staging)
    assert refusal.status == 409 and "QA" in refusal.detail
    world.deploy(release, world.qa)
    assert request(world, release, world.staging).state == State.RUNNING


def test_failed_deployment_to_previous_environment_does_not_open_the_path(world):
    release = world.release()
    world.deploy(release, world.qa, result=State.FAILED)
    refused("PROMOTION_PATH", request, world, release, world.staging)


def test_production_request_records_the_staging_deployment_it_was_promoted_from(world):
    release = world.release()
    staging = world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    assert deployment.promoted_from_id == staging.pk
    promoted_from = Deployment.objects.select_related("release").get(pk=deployment.promoted_from_id)
    assert (promoted_from.environment_id, promoted_from.state) == (world.staging.pk, State.SUCCEEDED)
    assert promoted_from.release_id == deployment.release_id  # the same Release row: the same artifact
    request_event = AuditEvent.objects.get(action="deployment.request", object_id=str(deployment.pk))
    assert request_event.data["artifact_sha256"] == hashlib.sha256(release.version.encode()).hexdigest()
    assert request_event.data["promoted_from"] == staging.pk


# rule 2: build gate
def test_failed_build_cannot_be_released(world):
    build = world.build(status="failed")
    with pytest.raises(PolicyRefusal) as info:
        world.release(build=build)
    assert info.value.refusal.code == "BUILD_NOT_SUCCESSFUL"
    assert info.value.refusal.status == 422


# rule 3: separation of duties
def test_implementer_cannot_request_production(world):
    world.alice.user_permissions.clear()
    world.releasers.user_set.add(world.alice)
    release = world.release(implementers=["alice@example.com"])
    world.to_staging(release)
    refused("SOD_IMPLEMENTER_REQUESTER", request, world, release, world.production, world.alice)


@pytest.mark.parametrize("identity", ["carol@example.com", "CAROL@Example.COM", "c.smith-vcs"])
def test_implementer_cannot_approve_matched_by_email_any_case_or_alias(world, identity):
    VcsAlias.objects.create(user=world.carol, identity="C.Smith-VCS")
    release = world.release(implementers=[identity])
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    refused("SOD_IMPLEMENTER_APPROVER", services.deployment_approve, actor=person(world.carol),
            deployment_id=deployment.pk)
    assert services.deployment_approve(actor=person(world.erin), deployment_id=deployment.pk).state == State.RUNNING


def test_implementer_matched_by_user_link(world):
    release = world.release(implementers=["carol"])  # a VCS login equal to the user name
    assert release.implementers.get().user_id == world.carol.pk
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    refused("SOD_IMPLEMENTER_APPROVER", services.deployment_approve, actor=person(world.carol),
            deployment_id=deployment.pk)


def test_implementer_identity_matching_no_user_still_counts(world, make_user):
    release = world.release(implementers=["newcomer@example.com"])
    assert release.implementers.get().user_id is None
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    newcomer = make_user("newcomer", email="Newcomer@Example.com", groups=[world.releasers])
    refused("SOD_IMPLEMENTER_APPROVER", services.deployment_approve, actor=person(newcomer),
            deployment_id=deployment.pk)


def test_requester_cannot_approve_own_request(world):
    release = world.release()
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    refused("SOD_REQUESTER_APPROVER", services.deployment_approve, actor=person(world.bob),
            deployment_id=deployment.pk)


def test_each_approval_comes_from_a_distinct_person(world):
    world.production.required_approvals = 2
    world.production.save(update_fields=["required_approvals"])
    release = world.release()
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    assert services.deployment_approve(actor=person(world.carol), deployment_id=deployment.pk).state == (
        State.AWAITING_APPROVAL
    )
    refused("SOD_DISTINCT_APPROVERS", services.deployment_approve, actor=person(world.carol),
            deployment_id=deployment.pk)
    assert services.deployment_approve(actor=person(world.erin), deployment_id=deployment.pk).state == State.RUNNING
    assert deployment.approvals.count() == 2


def test_release_without_implementers_cannot_go_to_restricted(world):
    release = world.release(implementers=[])
    world.to_staging(release)  # non-restricted environments take it
    refused("NO_IMPLEMENTERS", request, world, release, world.production, world.bob)


# rule 4: releasers only
def test_only_releasers_may_request_and_approve(world):
    release = world.release()
    world.to_staging(release)
    refused("NOT_RELEASER", request, world, release, world.production, world.dave)
    deployment = request(world, release, world.production, world.bob)
    refusal = refused("NOT_RELEASER", services.deployment_approve, actor=person(world.dave),
                      deployment_id=deployment.pk)
    assert refusal.status == 403


def test_superuser_gets_no_bypass_on_restricted(world, make_user):
    root = make_user("root", superuser=True)
    release = world.release()
    world.to_staging(release)
    refused("NOT_RELEASER", request, world, release, world.production, root)
    deployment = request(world, release, world.production, world.bob)
    refused("NOT_RELEASER", services.deployment_approve, actor=person(root), deployment_id=deployment.pk)


def test_direct_user_grant_counts(world, make_user):
    frank = make_user("frank")
    services.environment_grant(actor=person(make_user("admin", superuser=True)), environment=world.production,
                               codename="deploy_environment", user=frank)
    release = world.release()
    world.to_staging(release)
    assert request(world, release, world.production, frank).state == State.AWAITING_APPROVAL


def test_nobody_grants_rights_to_themselves_or_their_group(world, make_user):
    admin = make_user("admin", superuser=True)
    refused("SELF_GRANT", services.environment_grant, actor=person(admin), environment=world.production,
            codename="approve_environment", user=admin)
    world.releasers.user_set.add(admin)
    refused("SELF_GRANT", services.environment_grant, actor=person(admin), environment=world.production,
            codename="approve_environment", group=world.releasers)
    refused("SELF_GRANT", services.group_membership_change, actor=person(admin), group=world.releasers,
            user=admin, add=True)
    refused("NOT_PERMITTED", services.environment_grant, actor=person(world.bob), environment=world.production,
            codename="approve_environment", user=world.dave)


# rule 5: approvals, rejection, expiry, CI tokens
def test_ci_token_never_acts_on_restricted(world):
    release = world.release()
    world.to_staging(release)
    refusal = refused("CI_TOKEN_RESTRICTED", request, world, release, world.production)
    assert refusal.status == 403
    deployment = request(world, release, world.production, world.bob)
    refused("CI_TOKEN_RESTRICTED", services.deployment_approve, actor=world.ci, deployment_id=deployment.pk)
    refused("CI_TOKEN_RESTRICTED", services.deployment_cancel, actor=world.ci, deployment_id=deployment.pk)


def test_ci_token_limited_to_its_applications(world):
    from releases.models import Application

    other = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    release = world.release()
    refused("TOKEN_SCOPE", services.deployment_request, actor=ci_actor(other), release=release,
            environment=world.qa)


def test_any_rejection_ends_the_request(world):
    world.production.required_approvals = 2
    world.production.save(update_fields=["required_approvals"])
    release = world.release()
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    services.deployment_approve(actor=person(world.carol), deployment_id=deployment.pk)
    rejected = services.deployment_reject(actor=person(world.erin), deployment_id=deployment.pk, comment="no")
    assert rejected.state == State.REJECTED
    refused("NOT_AWAITING_APPROVAL", services.deployment_approve, actor=person(world.erin),
            deployment_id=deployment.pk)


def test_pending_request_expires(world):
    release = world.release()
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob)
    Deployment.objects.filter(pk=deployment.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    refused("REQUEST_EXPIRED", services.deployment_approve, actor=person(world.carol), deployment_id=deployment.pk)
    deployment.refresh_from_db()
    assert deployment.state == State.CANCELLED


def test_expire_pending_cancels_only_expired_requests(world):
    release, other = world.release(), world.release()
    world.to_staging(release)
    world.to_staging(other)
    old = request(world, release, world.production, world.bob)
    fresh = request(world, other, world.production, world.bob)
    Deployment.objects.filter(pk=old.pk).update(expires_at=timezone.now() - dt.timedelta(minutes=1))
    assert services.deployment_expire_pending() == 1
    old.refresh_from_db()
    fresh.refresh_from_db()
    assert (old.state, fresh.state) == (State.CANCELLED, State.AWAITING_APPROVAL)
    assert AuditEvent.objects.filter(action="deployment.expire", object_id=str(old.pk)).exists()


# rule 6: one at a time, in order
def test_busy_environment_takes_requests_in_order(world):
    first, second, third = world.release(), world.release(), world.release()
    a = request(world, first, world.qa, world.alice)
    b = request(world, second, world.qa, world.alice)
    c = request(world, third, world.qa, world.alice)
    assert (a.state, b.state, c.state) == (State.RUNNING, State.QUEUED, State.QUEUED)
    queue = selectors.environment_queues([world.qa.pk])[world.qa.pk]
    assert [(e["id"], e["position"], e["waiting_for"]) for e in queue] == [
        (a.pk, 0, "a deploy worker to take it up"), (b.pk, 1, f"behind #{a.pk}"), (c.pk, 2, f"behind #{b.pk}")]
    services.deployment_record_result(deployment_id=a.pk, state=State.FAILED)  # any end starts the next
    b.refresh_from_db()
    c.refresh_from_db()
    assert (b.state, c.state) == (State.RUNNING, State.QUEUED)
    services.deployment_cancel(actor=person(world.alice), deployment_id=c.pk)
    services.deployment_record_result(deployment_id=b.pk, state=State.SUCCEEDED)
    assert not AuditEvent.objects.filter(code="ENVIRONMENT_BUSY").exists()
    assert list(Deployment.objects.filter(environment=world.qa).values_list("state", flat=True).order_by("id")) == [
        State.FAILED, State.SUCCEEDED, State.CANCELLED]


def test_latest_automatic_deployment_wins_and_goes_on_by_itself(world):
    for environment in (world.qa, world.staging):
        environment.auto_deploy = True
        environment.save(update_fields=["auto_deploy"])
    r1, r2, r3 = world.release("9.0.0"), world.release("9.1.0"), world.release("9.2.0")
    d1, d2, d3 = (Deployment.objects.get(release=r, environment=world.qa) for r in (r1, r2, r3))
    assert (d1.state, d2.state, d3.state) == (State.RUNNING, State.SUPERSEDED, State.QUEUED)
    assert d2.superseded_by_id == d3.pk
    supersede = AuditEvent.objects.get(action="deployment.supersede", object_id=str(d2.pk))
    assert supersede.data["superseded_by"] == d3.pk and supersede.data["superseded_by_version"] == "9.2.0"
    services.deployment_record_result(deployment_id=d1.pk, state=State.SUCCEEDED)
    d3.refresh_from_db()
    assert d3.state == State.RUNNING  # r1 meanwhile went on to Staging by itself
    services.deployment_record_result(deployment_id=d3.pk, state=State.SUCCEEDED)
    staging = Deployment.objects.get(release=r3, environment=world.staging)
    assert staging.state == State.QUEUED  # behind r1 in Staging: a newer release, not superseded by an older
    services.deployment_record_result(
        deployment_id=Deployment.objects.get(release=r1, environment=world.staging).pk, state=State.SUCCEEDED)
    staging.refresh_from_db()
    assert staging.state == State.RUNNING
    assert not AuditEvent.objects.filter(code="ENVIRONMENT_BUSY").exists()
    # a superseded release can still be requested by hand
    assert request(world, r2, world.qa, world.alice).state == State.RUNNING


def test_a_release_registered_during_a_freeze_waits_in_the_queue_and_goes_when_it_ends(world):
    """Nobody is there to ask again for the portal's own automatic deployment: a frozen environment takes
    it into its queue (a newer release's supersedes it there), it never runs in the freeze, and it starts
    when the freeze ends. A request by CI or a person during the freeze is still refused."""
    for environment in (world.qa, world.staging):
        environment.auto_deploy = True
        environment.save(update_fields=["auto_deploy"])
    now = timezone.now()
    window = FreezeWindow.objects.create(environment=world.qa, starts_at=now - dt.timedelta(minutes=5),
                                         ends_at=now + dt.timedelta(hours=2), reason="ledger migration")
    first, second = world.release("7.0.0"), world.release("7.1.0")
    older, newer = (Deployment.objects.get(release=r, environment=world.qa) for r in (first, second))
    assert (older.state, newer.state) == (State.SUPERSEDED, State.QUEUED)
    assert selectors.queue_entry(newer)["waiting_for"] == "frozen until " + (
        f"{window.ends_at:%Y-%m-%d %H:%M} UTC (ledger migration)")
    with pytest.raises(PolicyRefusal) as refused:
        services.deployment_request(actor=world.ci, release=first, environment=world.qa)
    assert refused.value.refusal.code == "FREEZE_WINDOW"
    assert services.deployment_dispatch_idle(now=now + dt.timedelta(hours=1)) == []
    assert [d.pk for d in services.deployment_dispatch_idle(now=window.ends_at + dt.timedelta(minutes=1))] == [
        newer.pk]
    services.deployment_record_result(deployment_id=newer.pk, state=State.SUCCEEDED)
    assert Deployment.objects.get(release=second, environment=world.staging).state == State.RUNNING


def test_an_older_release_redeployed_to_qa_does_not_take_staging_back_by_itself(world):
    """Someone redeploys an older release to QA; its success does not promote it over the newer release
    Staging runs (refused NEWER_RELEASE_THERE, on record). A person may still ask for it."""
    world.staging.auto_deploy = True
    world.staging.save(update_fields=["auto_deploy"])
    older, newer = world.release("6.0.0"), world.release("6.1.0")
    world.deploy(newer, world.qa)  # goes on to Staging by itself
    staging = Deployment.objects.get(release=newer, environment=world.staging)
    services.deployment_start(deployment_id=staging.pk)
    services.deployment_record_result(deployment_id=staging.pk, state=State.SUCCEEDED)
    world.deploy(older, world.qa)
    assert not Deployment.objects.filter(release=older, environment=world.staging).exists()
    refusal = AuditEvent.objects.get(action="deployment.request.refused", code="NEWER_RELEASE_THERE")
    assert refusal.data["detail"] == ("MAC Staging runs 6.1.0, registered after 6.0.0: the portal does not take an "
                                      "environment back to an older release by itself (a person may request it).")
    assert request(world, older, world.staging, world.alice).state == State.RUNNING


def test_an_older_release_does_not_follow_a_newer_one_on_its_way_to_staging(world):
    """A newer release runs in Staging (or waits there) when an older one succeeds in QA again: the older
    one's automatic promotion is refused too, so it never queues behind the newer one and replaces it."""
    world.staging.auto_deploy = True
    world.staging.save(update_fields=["auto_deploy"])
    older, newer = world.release("6.2.0"), world.release("6.3.0")
    world.deploy(newer, world.qa)  # goes on to Staging by itself, and runs there
    assert Deployment.objects.get(release=newer, environment=world.staging).state == State.RUNNING
    world.deploy(older, world.qa)
    assert not Deployment.objects.filter(release=older, environment=world.staging).exists()
    refusal = AuditEvent.objects.get(action="deployment.request.refused", code="NEWER_RELEASE_THERE")
    assert refusal.data["detail"].startswith("MAC Staging runs 6.3.0, registered after 6.2.0")


def test_a_deployment_a_person_asked_for_is_never_superseded(world):
    first, second = world.release(), world.release()
    running = request(world, first, world.qa, world.alice)
    mine = request(world, second, world.qa, world.alice)
    world.qa.auto_deploy = True
    world.qa.save(update_fields=["auto_deploy"])
    newest = Deployment.objects.get(release=world.release(), environment=world.qa)
    mine.refresh_from_db()
    assert (mine.state, newest.state) == (State.QUEUED, State.QUEUED)
    services.deployment_record_result(deployment_id=running.pk, state=State.SUCCEEDED)
    mine.refresh_from_db()
    assert mine.state == State.RUNNING


def _busy_production(world):
    """Production running one release, and a second one requested by bob, awaiting approval."""
    first, second = world.release(), world.release()
    world.to_staging(first)
    world.to_staging(second)
    a = request(world, first, world.production, world.bob)
    services.deployment_approve(actor=person(world.carol), deployment_id=a.pk)
    b = request(world, second, world.production, world.bob)
    return a, b


def test_final_approval_on_a_busy_environment_is_accepted_and_waits(world):
    a, b = _busy_production(world)
    approved = services.deployment_approve(actor=person(world.carol), deployment_id=b.pk, comment="ok")
    assert approved.state == State.QUEUED and approved.approvals.count() == 1
    assert selectors.queue_entry(approved)["waiting_for"] == f"behind #{a.pk}"
    services.deployment_record_result(deployment_id=a.pk, state=State.SUCCEEDED)
    approved.refresh_from_db()
    assert approved.state == State.RUNNING and approved.approvals.count() == 1  # not asked again
    assert AuditEvent.objects.filter(action="deployment.start", object_id=str(b.pk)).count() == 1


def test_waiting_deployment_holds_during_a_freeze_and_starts_when_it_ends(world):
    a, b = _busy_production(world)
    services.deployment_approve(actor=person(world.carol), deployment_id=b.pk)
    now = timezone.now()
    window = FreezeWindow.objects.create(environment=world.production, starts_at=now,
                                         ends_at=now + dt.timedelta(hours=2), reason="quarter close")
    services.deployment_record_result(deployment_id=a.pk, state=State.SUCCEEDED)
    b.refresh_from_db()
    assert b.state == State.QUEUED
    assert selectors.queue_entry(b)["waiting_for"].startswith("frozen until ")
    assert services.deployment_dispatch_idle(now=now + dt.timedelta(hours=1)) == []
    started = services.deployment_dispatch_idle(now=window.ends_at + dt.timedelta(minutes=1))
    assert [d.pk for d in started] == [b.pk]
    b.refresh_from_db()
    assert b.state == State.RUNNING


def test_waiting_deployment_whose_request_expired_is_refused_and_the_queue_moves_on(world):
    a, b = _busy_production(world)
    services.deployment_approve(actor=person(world.carol), deployment_id=b.pk)
    third = world.release()
    world.to_staging(third)
    c = request(world, third, world.production, world.bob)
    services.deployment_approve(actor=person(world.erin), deployment_id=c.pk)
    Deployment.objects.filter(pk=b.pk).update(expires_at=timezone.now() - dt.timedelta(minutes=1))
    services.deployment_record_result(deployment_id=a.pk, state=State.SUCCEEDED)
    b.refresh_from_db()
    c.refresh_from_db()
    assert (b.state, b.refusal_code, c.state) == (State.REFUSED, "REQUEST_EXPIRED", State.RUNNING)
    event = AuditEvent.objects.get(action="deployment.refused", object_id=str(b.pk))
    assert event.code == "REQUEST_EXPIRED" and event.data["detail"] == b.result_detail


def test_rights_revoked_while_waiting_refuse_the_start(world):
    a, b = _busy_production(world)
    services.deployment_approve(actor=person(world.carol), deployment_id=b.pk)
    services.group_membership_change(actor=SYSTEM, group=world.releasers, user=world.bob, add=False)
    services.deployment_record_result(deployment_id=a.pk, state=State.SUCCEEDED)
    b.refresh_from_db()
    assert (b.state, b.refusal_code) == (State.REFUSED, "NOT_RELEASER")
    assert "bob no longer holds the right to deploy" in b.result_detail


def test_database_refuses_two_running_deployments(world):
    from django.db import IntegrityError, transaction

    first, second = world.release(), world.release()
    assert request(world, first, world.qa).state == State.RUNNING
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.create(release=second, environment=world.qa, state=State.RUNNING,
                                  requested_by_label="x", requested_via="test")


# rule 7: freeze windows and emergencies
@pytest.fixture
def frozen_production(world):
    now = timezone.now()
    return FreezeWindow.objects.create(environment=world.production, starts_at=now - dt.timedelta(hours=1),
                                       ends_at=now + dt.timedelta(hours=1), reason="quarter close")


def test_freeze_window_refuses_normal_deployment(world, frozen_production):
    release = world.release()
    world.to_staging(release)
    refusal = refused("FREEZE_WINDOW", request, world, release, world.production, world.bob)
    assert "quarter close" in refusal.detail


def test_emergency_skips_freeze_and_approval_but_not_separation_of_duties(world, frozen_production):
    release = world.release(implementers=["bob@example.com"])
    world.to_staging(release)
    refused("SOD_IMPLEMENTER_REQUESTER", request, world, release, world.production, world.bob,
            emergency_reason="payments down")
    deployment = request(world, release, world.production, world.carol, emergency_reason="payments down")
    assert deployment.state == State.RUNNING and deployment.emergency


@pytest.mark.parametrize("reason", ["\u200b", " \u2060\t", "\ufeff\u200d", "\u2800", "\u3164\uffa0",
                                    "\u034f\ufe0f", "\ue000"])
def test_a_reason_that_shows_nothing_makes_no_emergency(world, frozen_production, reason):
    """Rule 7 asks for a reason a person can read: an invisible one is none, and a frozen environment
    refuses the request as it refuses any other."""
    release = world.release()
    world.to_staging(release)
    refused("FREEZE_WINDOW", request, world, release, world.production, world.carol, emergency_reason=reason)
    frozen_production.delete()
    deployment = request(world, release, world.production, world.carol, emergency_reason=reason)
    assert (deployment.state, deployment.emergency, deployment.emergency_reason) == (
        State.AWAITING_APPROVAL, False, "")


def test_emergency_needs_a_releaser(world, make_user):
    release = world.release()
    world.deploy(release, world.qa)
    refused("EMERGENCY_NOT_RELEASER", request, world, release, world.staging, world.alice,
            emergency_reason="hotfix")


def test_emergency_is_reviewed_afterwards_by_another_eligible_person(world, frozen_production):
    release = world.release(implementers=["erin@example.com"])
    world.to_staging(release)
    deployment = request(world, release, world.production, world.bob, emergency_reason="payments down")
    refused("SOD_REQUESTER_REVIEWER", services.deployment_review, actor=person(world.bob),
            deployment_id=deployment.pk)
    refused("SOD_IMPLEMENTER_REVIEWER", services.deployment_review, actor=person(world.erin),
            deployment_id=deployment.pk)
    refused("NOT_RELEASER", services.deployment_review, actor=person(world.dave), deployment_id=deployment.pk)
    reviewed = services.deployment_review(actor=person(world.carol), deployment_id=deployment.pk, comment="ok")
    assert reviewed.reviewed_by == world.carol
    refused("ALREADY_REVIEWED", services.deployment_review, actor=person(world.carol), deployment_id=deployment.pk)


# rule 9: reviewed change
def test_environment_requiring_code_review(world):
    world.production.requires_code_review = True
    world.production.save(update_fields=["requires_code_review"])
    self_reviewed = world.release(pull_request=PullRequest("https://vcs/pr/1", "alice@example.com",
                                                           ("alice@example.com",)))
    reviewed = world.release(pull_request=PullRequest("https://vcs/pr/2", "alice@example.com", ("erin",)))
    for release in (self_reviewed, reviewed):
        world.to_staging(release)
    refused("NO_CODE_REVIEW", request, world, self_reviewed, world.production, world.bob)
    assert request(world, reviewed, world.production, world.bob).state == State.AWAITING_APPROVAL


NO_REVIEW_SENTENCE = ("MAC Production requires a reviewed change: the pull request of MAC {version} needs a reviewer "
                      "who is neither its author nor an implementer.")


@pytest.fixture
def review_required(world):
    world.production.requires_code_review = True
    world.production.save(update_fields=["requires_code_review"])
    VcsAlias.objects.create(user=world.alice, identity="alice-gh")
    return world


def reviewed_by(world, author, *reviewers, implementers=("dev2@example.com",)):
    release = world.release(pull_request=PullRequest("https://vcs/pr/9", author, reviewers),
                            implementers=implementers)
    world.to_staging(release)
    return release


def refused_review(world, release):
    refusal = refused("NO_CODE_REVIEW", request, world, release, world.production, world.bob)
    assert refusal.status == 409 and refusal.detail == NO_REVIEW_SENTENCE.format(version=release.version)
    event = AuditEvent.objects.order_by("-seq").first()
    assert event.action == "deployment.request.refused" and event.actor_username == "bob"
    assert not Deployment.objects.filter(release=release, environment=world.production).exists()


def test_author_reviewing_under_her_vcs_alias_is_no_review(review_required):
    refused_review(review_required, reviewed_by(review_required, "alice@example.com", "alice-gh"))


def test_author_reviewing_under_her_user_name_in_capitals_is_no_review(review_required):
    refused_review(review_required, reviewed_by(review_required, "alice-gh", "ALICE"))


def test_author_reviewing_under_her_email_in_other_case_is_no_review(review_required, make_user):
    make_user("frank", email="Frank.Miller@Example.COM")
    refused_review(review_required, reviewed_by(review_required, "frank", "frank.miller@EXAMPLE.com"))


def test_implementer_reviewing_under_another_identity_is_no_review(review_required):
    w = review_required
    refused_review(w, reviewed_by(w, "erin", "alice-gh", implementers=("alice@example.com",)))
    refused_review(w, reviewed_by(w, "erin", "Alice", implementers=("alice-gh",)))


def test_an_independent_reviewer_passes_among_self_reviews(review_required):
    w = review_required
    release = reviewed_by(w, "alice@example.com", "ALICE", "alice-gh", "Erin@Example.com",
                          implementers=("alice@example.com",))
    assert request(w, release, w.production, w.bob).state == State.AWAITING_APPROVAL
    outsider = reviewed_by(w, "alice@example.com", "reviewer-without-account", implementers=("alice@example.com",))
    assert request(w, outsider, w.production, w.bob).state == State.AWAITING_APPROVAL


def test_non_restricted_environment_needs_a_deploy_permission(world):
    release = world.release()
    refused("NOT_PERMITTED", request, world, release, world.qa, world.dave)
    assert request(world, release, world.qa, world.alice).state == State.RUNNING


def test_a_rollback_is_a_release_registered_before_the_one_that_runs():
    """One rule for every page and report that says "rollback" (and for NEWER_RELEASE_THERE's order)."""
    assert [policy.is_rollback(5, running) for running in (7, 5, 3, None)] == [True, False, False, False]


def test_who_could_review_reads_a_fixed_number_of_queries_whatever_the_releasers(world, make_user):
    """The deployment page asks who could review an emergency: four queries for three releasers or eight."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    release = world.release(implementers=["erin@example.com"])

    def counted():
        with CaptureQueriesContext(connection) as captured:
            names = policy.possible_reviewers(release, world.production, world.bob.pk)
        return names, len(captured)

    few, few_queries = counted()
    assert few == ["carol"]  # bob asked, erin implemented it
    for n in range(5):
        make_user(f"releaser{n}", groups=[world.releasers])
    many, many_queries = counted()
    assert many == ["carol", *(f"releaser{n}" for n in range(5))]
    assert few_queries == many_queries == 4
