"""State changes: each service writes exactly its audit event, in the same transaction."""

import pytest

from audit import chain
from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments import services
from environments.models import Deployment, Environment
from tests.conftest import SYSTEM, person

State = Deployment.State


def last_event():
    return AuditEvent.objects.order_by("-seq").first()


def test_request_approve_start_finish_are_audited(world):
    release = world.release()
    world.to_staging(release)
    deployment = services.deployment_request(actor=person(world.bob), release=release,
                                             environment=world.production)
    event = last_event()
    assert (event.action, event.actor_username, event.data["state"]) == ("deployment.request", "bob",
                                                                        "awaiting_approval")
    assert event.data["artifact_sha256"] == release.artifact_sha256
    services.deployment_approve(actor=person(world.carol), deployment_id=deployment.pk, comment="fine")
    approve, start = AuditEvent.objects.filter(object_id=str(deployment.pk)).order_by("-seq")[:2][::-1]
    assert (approve.action, approve.actor_username, approve.data["state"]) == ("deployment.approve", "carol",
                                                                              "queued")
    assert approve.data["sod_checks"] == ["approver_not_implementer", "approver_not_requester", "approver_distinct"]
    assert (start.action, start.actor_username, start.data["state"]) == ("deployment.start", "system", "running")
    services.deployment_start(deployment_id=deployment.pk, engine="worker-1:42")
    assert (last_event().action, last_event().data["engine"]) == ("deployment.claim", "worker-1:42")
    services.deployment_record_result(deployment_id=deployment.pk, state=State.SUCCEEDED, detail="3 hosts")
    event = last_event()
    assert (event.action, event.data["result"]) == ("deployment.finish", "succeeded")
    deployment.refresh_from_db()
    assert deployment.sod_checks == sorted(["requester_not_implementer", "approver_not_implementer",
                                            "approver_not_requester", "approver_distinct"])
    assert chain.verify().ok


def test_engine_claims_a_started_deployment_once(world):
    deployment = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    assert deployment.state == State.RUNNING  # QA was free: it started at once
    claimed = services.deployment_start(deployment_id=deployment.pk, engine="worker-1:42")
    assert (claimed.state, claimed.engine) == (State.RUNNING, "worker-1:42")
    assert services.deployment_start(deployment_id=deployment.pk, engine="worker-2:7") is None  # delivered twice
    assert AuditEvent.objects.filter(action="deployment.claim", object_id=str(deployment.pk)).count() == 1


def test_result_only_for_a_running_deployment(world):
    services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    waiting = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    assert waiting.state == State.QUEUED
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_record_result(deployment_id=waiting.pk, state=State.SUCCEEDED)
    assert info.value.refusal.code == "NOT_RUNNING"
    with pytest.raises(ValueError):
        services.deployment_record_result(deployment_id=waiting.pk, state=State.QUEUED)


def test_cancel_queued_and_waiting_and_flag_running(world):
    running = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    queued = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    services.deployment_cancel(actor=world.ci, deployment_id=queued.pk, comment="wrong build")
    queued.refresh_from_db()
    assert queued.state == State.CANCELLED and "wrong build" in queued.result_detail
    assert last_event().action == "deployment.cancel"
    services.deployment_start(deployment_id=running.pk)
    services.deployment_cancel(actor=person(world.alice), deployment_id=running.pk)
    running.refresh_from_db()
    assert running.state == State.RUNNING and running.cancel_requested_at is not None
    assert last_event().action == "deployment.cancel_request"
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_cancel(actor=world.ci, deployment_id=queued.pk)
    assert info.value.refusal.code == "NOT_CANCELLABLE"
    with pytest.raises(PolicyRefusal) as info:  # asked once: the second ask says so, and is on record
        services.deployment_cancel(actor=person(world.alice), deployment_id=running.pk)
    refusal = info.value.refusal
    assert refusal.code == "CANCEL_REQUESTED" and "its playbook is being stopped" in refusal.detail
    assert last_event().action == "deployment.cancel.refused"
    # the engine stops the run: the result says who stopped it, then how far the run got
    ended = services.deployment_record_result(deployment_id=running.pk, state=State.CANCELLED,
                                              detail="ansible-runner canceled, rc 254")
    assert ended.result_detail == "Cancelled by alice while it ran. The run stopped: ansible-runner canceled, rc 254"


def test_cancelled_before_an_engine_took_it_ends_without_running(world):
    started = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    services.deployment_cancel(actor=world.ci, deployment_id=started.pk)
    assert services.deployment_start(deployment_id=started.pk) is None
    started.refresh_from_db()
    assert started.state == State.CANCELLED and started.engine == ""


def test_only_requester_or_releaser_cancels_a_restricted_request(world):
    release = world.release()
    world.to_staging(release)
    deployment = services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_cancel(actor=person(world.dave), deployment_id=deployment.pk)
    assert info.value.refusal.code == "NOT_RELEASER"
    assert services.deployment_cancel(actor=person(world.carol), deployment_id=deployment.pk).state == State.CANCELLED
    event = last_event()
    assert (event.action, event.actor_username, event.object_id) == ("deployment.cancel", "carol", str(deployment.pk))


def test_grant_and_revoke_are_audited(world, make_user):
    admin, frank = make_user("admin", superuser=True), make_user("frank")
    services.environment_grant(actor=person(admin), environment=world.production, codename="approve_environment",
                               user=frank)
    assert (last_event().action, last_event().data["user"]) == ("environment.grant", "frank")
    services.environment_revoke(actor=person(admin), environment=world.production, codename="approve_environment",
                                user=frank)
    assert last_event().action == "environment.revoke"
    assert not frank.has_perm("environments.approve_environment", world.production)


def test_group_membership_change_is_audited(world, make_user):
    admin, frank = make_user("admin", superuser=True), make_user("frank")
    services.group_membership_change(actor=person(admin), group=world.releasers, user=frank, add=True)
    assert last_event().action == "group.add_member"
    services.group_membership_change(actor=person(admin), group=world.releasers, user=frank, add=False)
    assert last_event().action == "group.remove_member"
    assert not frank.groups.exists()
    with pytest.raises(PolicyRefusal) as info:  # removing someone needs the same right as adding
        services.group_membership_change(actor=person(world.dave), group=world.releasers, user=world.bob, add=False)
    assert info.value.refusal.code == "NOT_PERMITTED" and world.bob.groups.filter(pk=world.releasers.pk).exists()


def test_promotion_path_stays_in_one_application_without_cycles(world):
    from django.core.exceptions import ValidationError

    from releases.models import Application

    other_app = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    foreign = Environment(application=other_app, name="QA", promotes_from=world.staging)
    with pytest.raises(ValidationError, match="one application"):
        services.environment_save(actor=SYSTEM, environment=foreign)
    world.qa.promotes_from = world.production
    with pytest.raises(ValidationError, match="cycle"):
        services.environment_save(actor=SYSTEM, environment=world.qa)


def test_database_refuses_an_environment_that_promotes_from_itself(world):
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Environment.objects.filter(pk=world.qa.pk).update(promotes_from=world.qa.pk)
