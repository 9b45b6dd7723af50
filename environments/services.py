"""Every state change of environments and deployments.

Each service is one transaction: it locks what it reads and then writes (environment first, then
the deployment), asks the policy, writes its audit event, and only then returns. A refusal is
written to the audit chain and committed before PolicyRefusal is raised.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.contrib.auth.models import Group
from django.db import IntegrityError, transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm

from audit import chain
from audit.actors import Actor
from audit.services import audit_refusal
from environments import policy
from environments.models import Approval, Deployment, Environment, NotificationChannel
from environments.policy import PolicyRefusal, Refusal
from releases.models import Release

State = Deployment.State


def _deployment_data(deployment: Deployment, **extra) -> dict:
    return {
        "deployment_id": deployment.pk,
        "application": deployment.environment.application.name,
        "environment": deployment.environment.name,
        "version": deployment.release.version,
        "artifact_sha256": deployment.release.artifact_sha256,
        "state": deployment.state,
        **extra,
    }


def _lock_environment(environment_id: int) -> Environment:
    return (
        Environment.objects.select_for_update(of=("self",))
        .select_related("application", "promotes_from")
        .get(pk=environment_id)
    )


def _expire(deployment: Deployment, now: dt.datetime) -> None:
    """An approval request past its expiry time ends `cancelled`."""
    _set_state(deployment, State.CANCELLED, finished_at=now, result_detail="The approval request expired.")
    chain.append(actor=Actor.system(), action="deployment.expire", obj=deployment, data=_deployment_data(deployment))


def _lock_deployment(deployment_id: int) -> Deployment:
    """Lock a deployment's environment, then the deployment (always in that order)."""
    environment_id = Deployment.objects.values_list("environment_id", flat=True).get(pk=deployment_id)
    environment = _lock_environment(environment_id)
    deployment = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("release__build", "release__application")
        .get(pk=deployment_id)
    )
    deployment.environment = environment
    return deployment


def _set_state(deployment: Deployment, state: str, **fields) -> None:
    deployment.state = state
    for name, value in fields.items():
        setattr(deployment, name, value)
    deployment.save(update_fields=["state", *fields])


def deployment_request(
    *, actor: Actor, release: Release, environment: Environment, emergency_reason: str = ""
) -> Deployment:
    """Ask for `release` to go to `environment`. Queued at once where no approval is needed
    (or for an emergency), otherwise awaiting approval until it expires."""
    emergency_reason = emergency_reason.strip()
    with transaction.atomic():
        environment = _lock_environment(environment.pk)
        release = Release.objects.select_related("build", "application").get(pk=release.pk)
        verdict = policy.decide_request(
            actor=actor, release=release, environment=environment, emergency_reason=emergency_reason
        )
        if verdict.refusal is None:
            now = timezone.now()
            queue_now = verdict.queue_now
            expiry = dt.timedelta(hours=settings.PORTAL_APPROVAL_EXPIRY_HOURS)
            try:
                with transaction.atomic():
                    deployment = Deployment.objects.create(
                        release=release, environment=environment,
                        state=State.QUEUED if queue_now else State.AWAITING_APPROVAL,
                        requested_by=actor.user if actor.is_person else None,
                        requested_by_label=actor.label, requested_via=actor.via,
                        expires_at=None if queue_now else now + expiry,
                        queued_at=now if queue_now else None,
                        promoted_from=verdict.promoted_from,
                        required_approvals=environment.required_approvals,
                        emergency=bool(emergency_reason), emergency_reason=emergency_reason,
                        sod_checks=verdict.sod_checks,
                    )
            except IntegrityError:
                # The partial unique index caught a concurrent queue (it backs up the lock).
                verdict.refusal = policy.check_not_busy(environment) or Refusal(
                    "ENVIRONMENT_BUSY", f"{environment} is busy; try again when it has finished."
                )
            else:
                chain.append(
                    actor=actor, action="deployment.request", obj=deployment,
                    data=_deployment_data(
                        deployment, emergency=deployment.emergency, emergency_reason=emergency_reason,
                        promoted_from=verdict.promoted_from.pk if verdict.promoted_from else None,
                        sod_checks=verdict.sod_checks,
                    ),
                )
                if queue_now:
                    _on_queued(deployment)
                return deployment
        audit_refusal(
            actor=actor, action="deployment.request", refusal=verdict.refusal, obj=environment,
            data={"release": str(release), "version": release.version, "environment": environment.name,
                  "emergency": bool(emergency_reason)},
        )
    raise PolicyRefusal(verdict.refusal)


def auto_deploy(*, release: Release, environment: Environment) -> Deployment | None:
    """The portal asks for a deployment by itself. A refusal is on record in the audit chain and does
    not fail the caller."""
    try:
        return deployment_request(actor=Actor.system(via="auto"), release=release, environment=environment)
    except PolicyRefusal:
        return None


def auto_deploy_next(*, release: Release, after: Environment | None = None) -> None:
    """A new release (after=None) goes to the auto-deploy environments that start a promotion path;
    a success in `after` goes on to the auto-deploy environments promoted from it."""
    targets = Environment.objects.filter(application_id=release.application_id, auto_deploy=True)
    targets = targets.filter(promotes_from=after) if after else targets.filter(promotes_from__isnull=True)
    for environment in targets.order_by("id"):
        auto_deploy(release=release, environment=environment)


def _on_finished(deployment: Deployment) -> None:
    from environments import tasks

    transaction.on_commit(lambda: tasks.enqueue_notifications(deployment.pk))


def _on_queued(deployment: Deployment) -> None:
    """Hand a queued deployment to the deploy engine once the transaction has committed."""
    from environments import tasks

    transaction.on_commit(lambda: tasks.enqueue_deployment(deployment.pk))


def _decide(*, actor: Actor, deployment_id: int, approve: bool, comment: str) -> Deployment:
    action = "deployment.approve" if approve else "deployment.reject"
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        refusal, checks = policy.decide_approval(actor=actor, deployment=deployment, approve=approve)
        if refusal is not None and refusal.code == "REQUEST_EXPIRED":
            _expire(deployment, timezone.now())
        approvals = 0
        if refusal is None and approve:
            approvals = deployment.approvals.filter(decision=Approval.Decision.APPROVE).count() + 1
            if approvals >= deployment.required_approvals:
                refusal = policy.decide_queue(deployment)
        if refusal is None:
            Approval.objects.create(
                deployment=deployment, approver=actor.user,
                decision=Approval.Decision.APPROVE if approve else Approval.Decision.REJECT, comment=comment,
            )
            now = timezone.now()
            sod = sorted({*deployment.sod_checks, *checks})
            if not approve:
                _set_state(deployment, State.REJECTED, finished_at=now, sod_checks=sod,
                           result_detail=f"Rejected by {actor.label}: {comment}".strip(" :"))
            elif approvals >= deployment.required_approvals:
                _set_state(deployment, State.QUEUED, queued_at=now, sod_checks=sod)
                _on_queued(deployment)
            else:
                _set_state(deployment, State.AWAITING_APPROVAL, sod_checks=sod)
            chain.append(actor=actor, action=action, obj=deployment,
                         data=_deployment_data(deployment, comment=comment, approvals=approvals, sod_checks=checks))
            return deployment
        audit_refusal(actor=actor, action=action, refusal=refusal, obj=deployment,
                      data=_deployment_data(deployment, comment=comment))
    raise PolicyRefusal(refusal)


def deployment_approve(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Record one approval; the last one required queues the deployment."""
    return _decide(actor=actor, deployment_id=deployment_id, approve=True, comment=comment)


def deployment_reject(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Record a rejection; any rejection ends the request."""
    return _decide(actor=actor, deployment_id=deployment_id, approve=False, comment=comment)


def deployment_cancel(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Cancel an open deployment. A queued or waiting one ends at once; a running one is flagged and
    the deploy engine stops its playbook and ends it `cancelled`."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        refusal = policy.decide_cancel(actor=actor, deployment=deployment)
        if refusal is None:
            detail = f"Cancelled by {actor.label}: {comment}".strip(" :")
            if deployment.state == State.RUNNING:
                deployment.cancel_requested_at = timezone.now()
                deployment.save(update_fields=["cancel_requested_at"])
                chain.append(actor=actor, action="deployment.cancel_request", obj=deployment,
                             data=_deployment_data(deployment, comment=comment))
            else:
                _set_state(deployment, State.CANCELLED, finished_at=timezone.now(), result_detail=detail)
                chain.append(actor=actor, action="deployment.cancel", obj=deployment,
                             data=_deployment_data(deployment, comment=comment))
            return deployment
        audit_refusal(actor=actor, action="deployment.cancel", refusal=refusal, obj=deployment,
                      data=_deployment_data(deployment, comment=comment))
    raise PolicyRefusal(refusal)


def deployment_start(*, deployment_id: int, actor: Actor | None = None) -> Deployment | None:
    """Claim a queued deployment for the deploy engine (queued -> running).

    Returns None when it is no longer queued: a task delivered twice never runs a deployment twice.
    """
    actor = actor or Actor.system(via="task")
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if deployment.state != State.QUEUED:
            return None
        now = timezone.now()
        _set_state(deployment, State.RUNNING, started_at=now, heartbeat_at=now)
        chain.append(actor=actor, action="deployment.start", obj=deployment, data=_deployment_data(deployment))
        return deployment


def deployment_record_playbook(*, deployment_id: int, playbook_commit: str) -> None:
    """Record which playbooks a running deployment uses: a change to a deploy script is a change too."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        deployment.playbook_commit = playbook_commit
        deployment.save(update_fields=["playbook_commit"])
        chain.append(actor=Actor.system(via="task"), action="deployment.playbook", obj=deployment,
                     data=_deployment_data(deployment, playbook_commit=playbook_commit))


FINISHED_BY_ENGINE = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.INTERRUPTED)


def deployment_record_result(
    *, deployment_id: int, state: str, detail: str = "", actor: Actor | None = None, extra: dict | None = None
) -> Deployment:
    """Record how a running deployment ended (succeeded, failed, cancelled or interrupted)."""
    if state not in FINISHED_BY_ENGINE:
        raise ValueError(f"A deployment cannot end as {state!r}.")
    actor = actor or Actor.system(via="task")
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if refusal := policy.decide_finish(deployment):
            audit_refusal(actor=actor, action="deployment.finish", refusal=refusal, obj=deployment,
                          data=_deployment_data(deployment, result=state))
        else:
            _set_state(deployment, state, finished_at=timezone.now(), result_detail=detail)
            chain.append(actor=actor, action="deployment.finish", obj=deployment,
                         data=_deployment_data(deployment, result=state, detail=detail, **(extra or {})))
            if state == State.SUCCEEDED:
                auto_deploy_next(release=deployment.release, after=deployment.environment)
            _on_finished(deployment)
            return deployment
    raise PolicyRefusal(refusal)


def deployment_review(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Review an emergency deployment afterwards; closes it as an exception."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        refusal = policy.decide_review(actor=actor, deployment=deployment)
        if refusal is None:
            deployment.reviewed_by = actor.user
            deployment.reviewed_at = timezone.now()
            deployment.review_comment = comment
            deployment.sod_checks = sorted({*deployment.sod_checks, "reviewer_not_implementer",
                                            "reviewer_not_requester"})
            deployment.save(update_fields=["reviewed_by", "reviewed_at", "review_comment", "sod_checks"])
            chain.append(actor=actor, action="deployment.review", obj=deployment,
                         data=_deployment_data(deployment, comment=comment))
            return deployment
        audit_refusal(actor=actor, action="deployment.review", refusal=refusal, obj=deployment,
                      data=_deployment_data(deployment, comment=comment))
    raise PolicyRefusal(refusal)


def deployment_expire_pending(*, now: dt.datetime | None = None) -> int:
    """Cancel approval requests past their expiry time. Returns how many expired."""
    now = now or timezone.now()
    expired = 0
    ids = Deployment.objects.filter(state=State.AWAITING_APPROVAL, expires_at__lte=now).values_list("id", flat=True)
    for deployment_id in list(ids):
        with transaction.atomic():
            deployment = _lock_deployment(deployment_id)
            if deployment.state != State.AWAITING_APPROVAL or deployment.expires_at > now:
                continue
            _expire(deployment, now)
            expired += 1
    return expired


def _grant_change(*, actor: Actor, environment: Environment, codename: str, user, group, grant: bool) -> None:
    if codename not in policy.GRANTABLE:
        raise ValueError(f"Unknown environment permission {codename!r}.")
    if (user is None) == (group is None):
        raise ValueError("Grant to exactly one user or one group.")
    action = "environment.grant" if grant else "environment.revoke"
    data = {"environment": str(environment), "permission": codename,
            "user": user.get_username() if user else None, "group": group.name if group else None}
    with transaction.atomic():
        environment = _lock_environment(environment.pk)
        refusal = policy.decide_grant(actor=actor, environment=environment, user=user, group=group)
        if refusal is None:
            (assign_perm if grant else remove_perm)(f"environments.{codename}", user or group, environment)
            chain.append(actor=actor, action=action, obj=environment, data=data)
            return
        audit_refusal(actor=actor, action=action, refusal=refusal, obj=environment, data=data)
    raise PolicyRefusal(refusal)


def environment_grant(*, actor: Actor, environment: Environment, codename: str, user=None, group=None) -> None:
    """Give a user or a group the right to deploy to / approve for one environment."""
    _grant_change(actor=actor, environment=environment, codename=codename, user=user, group=group, grant=True)


def environment_revoke(*, actor: Actor, environment: Environment, codename: str, user=None, group=None) -> None:
    _grant_change(actor=actor, environment=environment, codename=codename, user=user, group=group, grant=False)


def group_membership_change(*, actor: Actor, group: Group, user, add: bool) -> None:
    """Add a user to a group or remove them; joining a releasers group is receiving its grants."""
    action = "group.add_member" if add else "group.remove_member"
    data = {"group": group.name, "user": user.get_username()}
    with transaction.atomic():
        refusal = policy.decide_membership(actor=actor, group=group, user=user, add=add)
        if refusal is None:
            (user.groups.add if add else user.groups.remove)(group)
            chain.append(actor=actor, action=action, obj=group, data=data)
            return
        audit_refusal(actor=actor, action=action, refusal=refusal, obj=group, data=data)
    raise PolicyRefusal(refusal)


# What a deploy job executes: the playbook source and the hosts it runs on.
EXECUTABLE_SETTINGS = ("playbook_repo", "playbook_ref", "playbook", "inventory")


def _from_to(before, after, fields: tuple[str, ...]) -> dict:
    """{field: {"from", "to"}} for each field whose value differs (before None: a new row)."""
    return {
        name: {"from": None if before is None else getattr(before, name), "to": getattr(after, name)}
        for name in fields
        if before is None or getattr(before, name) != getattr(after, name)
    }


def environment_save(*, actor: Actor, environment: Environment, changed: list[str] | None = None) -> Environment:
    """Create or change an environment's settings (field history goes to django-auditlog). A change
    to what its deploy jobs execute is in the chain with both values."""
    with transaction.atomic():
        creating = environment._state.adding
        before = None if creating else _lock_environment(environment.pk)
        environment.full_clean()
        environment.save()
        chain.append(actor=actor, action="environment.create" if creating else "environment.change",
                     obj=environment, data={"changed": changed or [],
                                            "executable": _from_to(before, environment, EXECUTABLE_SETTINGS)})
    return environment


def notification_channel_save(*, actor: Actor, channel: NotificationChannel) -> NotificationChannel:
    """Create or change where an application's deployments are announced. Each change of target is in
    the chain with both values; the credential only as "set" or "changed", never its value."""
    with transaction.atomic():
        creating = channel._state.adding
        before = None if creating else NotificationChannel.objects.select_for_update().get(pk=channel.pk)
        channel.full_clean()
        channel.save()
        changes = _from_to(before, channel, ("kind", "url", "enabled"))
        if before is None or before.application_id != channel.application_id:
            changes["application"] = {"from": before and before.application.name, "to": channel.application.name}
        if before is None:
            changes["credential"] = "set" if channel.credential else "not set"
        elif before.credential != channel.credential:
            changes["credential"] = "changed"
        chain.append(actor=actor, action="notification_channel.create" if creating else "notification_channel.change",
                     obj=channel, data={"application": channel.application.name, "changes": changes})
    return channel
