"""Every state change of environments and deployments.

Each service is one transaction: it locks what it reads and then writes (environment first, then
the deployment), asks the policy, writes its audit event, and only then returns. A refusal is
written to the audit chain and committed before PolicyRefusal is raised.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Callable
from functools import partial

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django_q.tasks import async_task
from guardian.shortcuts import assign_perm, remove_perm

from audit import chain
from audit.actors import Actor
from audit.models import AuditEvent
from audit.services import audit_refusal, refused
from core.compiled import CompiledRead, Pending, model_fields, together
from core.decisions import Decision, Next, NotFound, PolicyRefusal, Refusal
from environments import policy
from environments.models import (
    Approval,
    ControlChange,
    Deployment,
    Environment,
    FreezeWindow,
    NotificationChannel,
)
from releases.models import Application, Release

logger = logging.getLogger(__name__)

State = Deployment.State
ENGINE = Actor.system(via="task")


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


# Every service locks an environment first: compiled once (core.compiled), the lock and the reads of
# its application and the environment it promotes from in one round trip (the lock runs first).
_LOCKED_ENVIRONMENT = CompiledRead(lambda pk: Environment.objects.select_for_update(of=("self",)).filter(
    pk=pk).values(*model_fields(Environment)), int)
_APPLICATION_OF_ENVIRONMENT = CompiledRead(lambda pk: Application.objects.filter(environments__pk=pk).values(
    *model_fields(Application)), int)
_SOURCE_OF_ENVIRONMENT = CompiledRead(lambda pk: Environment.objects.filter(promotes_to__pk=pk).values(
    *model_fields(Environment)), int)


def _lock_environment(environment_id: int) -> Environment:
    """The environment, locked until commit, with its application and the environment it promotes from."""
    reads = locked, application, source = (_LOCKED_ENVIRONMENT.later(environment_id),
                                           _APPLICATION_OF_ENVIRONMENT.later(environment_id),
                                           _SOURCE_OF_ENVIRONMENT.later(environment_id))
    together(*reads)
    found = locked.instances(Environment)
    if not found:
        raise Environment.DoesNotExist(f"No environment #{environment_id}.")
    environment = found[0]
    environment.application = application.instances(Application)[0]
    environment.promotes_from = next(iter(source.instances(Environment)), None)
    return environment


def _lock_deployment(deployment_id: int) -> Deployment:
    """Lock a deployment's environment, then the deployment (always in that order)."""
    environment_id = Deployment.objects.filter(pk=deployment_id).values_list("environment_id", flat=True).first()
    if environment_id is None:
        raise NotFound(f"No deployment #{deployment_id}.")
    environment = _lock_environment(environment_id)
    deployment = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("release__build", "release__application", "requested_by")
        .prefetch_related("approvals__approver")
        .get(pk=deployment_id)
    )
    deployment.environment = environment
    return deployment


def _set_state(deployment: Deployment, state: str, **fields) -> None:
    deployment.state = state
    for name, value in fields.items():
        setattr(deployment, name, value)
    deployment.save(update_fields=["state", *fields])


def _enqueue(task: str, *args, name: str) -> None:
    """Hand work to the worker once the transaction has committed (ids only; the task re-reads).

    What committed stays committed when the broker cannot take the task (Redis down): the caller's
    answer says what was done, and the error is logged. A deployment whose task was lost is handed over
    again by the reaper (reap_deployments, every minute: deployment_redeliver)."""

    def hand_over() -> None:
        try:
            async_task(f"environments.tasks.{task}", *args, task_name=name)
        except Exception:  # noqa: BLE001 - the broker's own errors, whatever the broker
            logger.exception("The task queue did not take %s %s; a running deployment's task is handed over "
                             "again by reap_deployments once the queue is back.", task, args)

    transaction.on_commit(hand_over)


def _expire(deployment: Deployment, now: dt.datetime) -> None:
    """An approval request past its expiry time ends `cancelled`."""
    _set_state(deployment, State.CANCELLED, finished_at=now, result_detail="The approval request expired.")
    chain.append(actor=Actor.system(), action="deployment.expire", obj=deployment, data=_deployment_data(deployment))


# --- the queue: one dispatcher ---------------------------------------------------------------------

def _queue_of(environment: Environment):
    """The deployments waiting for an environment, in the order they became ready (rule 6)."""
    return (
        Deployment.objects.filter(environment=environment, state=State.QUEUED)
        .select_related("release__build", "release__application", "requested_by")
        .prefetch_related("approvals__approver")
        .order_by("queued_at", "id")
    )


# Whether an environment runs a deployment: asked by every dispatch (core.compiled).
_RUNNING = CompiledRead(lambda environment_id: Deployment.objects.filter(
    environment_id=environment_id, state=State.RUNNING).order_by().values_list("id")[:1], int)


def _dispatch(environment: Environment, *, now: dt.datetime | None = None, running: Pending | None = None
              ) -> Deployment | None:
    """Start the front of a locked environment's queue if the environment is free (`running`: the
    _RUNNING read of it, when read already with others).

    The only place a deployment starts. The rules that depend on time are asked again here, in the
    transaction that starts it: a freeze holds a deployment in the queue, a refusal ends it `refused`
    and the queue moves on. The deploy engine is told after commit.
    """
    if (_RUNNING.later(environment.pk) if running is None else running).tuples():
        return None
    now = now or timezone.now()
    for deployment in _queue_of(environment):
        deployment.environment = environment
        decision = policy.decide_start(deployment, now=now)
        if decision.next == Next.HOLD:
            continue
        if not decision.allowed:
            refusal = decision.refusal
            _set_state(deployment, State.REFUSED, finished_at=now, result_detail=refusal.detail,
                       refusal_code=refusal.code)
            chain.append(actor=ENGINE, action="deployment.refused", obj=deployment, code=refusal.code,
                         data=_deployment_data(deployment, detail=refusal.detail))
            _notify(deployment)
            continue
        _set_state(deployment, State.RUNNING, started_at=now, heartbeat_at=now)
        chain.append(actor=ENGINE, action="deployment.start", obj=deployment, data=_deployment_data(deployment))
        _enqueue("run_deployment", deployment.pk, name=f"deployment-{deployment.pk}")
        return deployment
    return None


def deployment_dispatch(*, environment_id: int, now: dt.datetime | None = None) -> Deployment | None:
    """Start the next waiting deployment of an environment, if it is free and the rules allow."""
    with transaction.atomic():
        return _dispatch(_lock_environment(environment_id), now=now)


def deployment_dispatch_idle(*, now: dt.datetime | None = None) -> list[Deployment]:
    """Start the front of every queue whose environment is idle: after a freeze ends, or when a worker
    died between finishing one deployment and starting the next. Run on a schedule and at worker start."""
    running = Deployment.objects.filter(state=State.RUNNING).values("environment_id")
    waiting = (
        Deployment.objects.filter(state=State.QUEUED).exclude(environment_id__in=running)
        .values_list("environment_id", flat=True).distinct()
    )
    started = [deployment_dispatch(environment_id=e, now=now) for e in sorted(set(waiting))]
    return [d for d in started if d is not None]


def _waiting_automatic(environment_id, release_id):
    """An environment's automatic deployments of releases older than `release_id` still waiting in its
    queue without needing an approval."""
    return Deployment.objects.filter(environment_id=environment_id, state=State.QUEUED, automatic=True,
                                     required_approvals=0, release_id__lt=release_id)


# A new release's automatic deployment asks on every registration: compiled once (core.compiled).
_WAITING_AUTOMATIC = CompiledRead(lambda environment_id, release_id: _waiting_automatic(
    environment_id, release_id).select_for_update(of=("self",)).order_by("id").values(*model_fields(Deployment)),
    int, int)
_RELEASES_WAITING_AUTOMATIC = CompiledRead(lambda environment_id, release_id: Release.objects.filter(
    pk__in=_waiting_automatic(environment_id, release_id).values("release_id")).values(*model_fields(Release)),
    int, int)


def _supersede_older(deployment: Deployment, now: dt.datetime, alongside: tuple[Pending, ...] = ()) -> None:
    """Latest wins for automatic deployments: an older release's automatic deployment still waiting
    for the same environment ends `superseded`. One that a person requested or approved waits its turn.
    The reads `alongside` go in the same round trip (otherwise they run when first asked)."""
    if not deployment.automatic:
        return
    waiting_ones, their_releases, channels = (
        _WAITING_AUTOMATIC.later(deployment.environment_id, deployment.release_id),
        _RELEASES_WAITING_AUTOMATIC.later(deployment.environment_id, deployment.release_id),
        _ENABLED_CHANNELS.later(deployment.release.application_id))
    # The deployments locked first, then their releases; the channels are asked only if one is superseded.
    together(waiting_ones, their_releases, *alongside, maybe=(channels,))
    releases = {r.pk: r for r in their_releases.instances(Release)}
    for waiting in waiting_ones.instances(Deployment):
        waiting.environment, waiting.release = deployment.environment, releases[waiting.release_id]
        waiting.release.application = deployment.release.application
        _set_state(waiting, State.SUPERSEDED, finished_at=now, superseded_by=deployment,
                   result_detail=f"Superseded by #{deployment.pk} ({deployment.release.version}) while waiting.")
        chain.append(actor=ENGINE, action="deployment.supersede", obj=waiting,
                     data=_deployment_data(waiting, superseded_by=deployment.pk,
                                           superseded_by_version=deployment.release.version))
        _notify(waiting, channels)


_AFTER_DISPATCH = ("state", "started_at", "heartbeat_at", "finished_at", "result_detail", "refusal_code")
_DEPLOYMENT_AFTER_DISPATCH = CompiledRead(
    lambda deployment_id: Deployment.objects.filter(pk=deployment_id).values_list(*_AFTER_DISPATCH), int)


def _join_queue(deployment: Deployment, now: dt.datetime) -> None:
    running = _RUNNING.later(deployment.environment_id)
    _supersede_older(deployment, now, alongside=(running,))  # superseding never touches the running one
    if running.tuples():
        return  # the environment is busy: the deployment waits in the queue, as it was written
    _dispatch(deployment.environment, now=now, running=running)
    [row] = _DEPLOYMENT_AFTER_DISPATCH.tuples(deployment.pk)  # what the dispatcher made of it
    for name, value in zip(_AFTER_DISPATCH, row, strict=True):
        setattr(deployment, name, value)


# --- requests and decisions ------------------------------------------------------------------------

def deployment_request(
    *, actor: Actor, release: Release, environment: Environment, emergency_reason: str = "",
    automatic: bool = False,
) -> Deployment:
    """Ask for `release` to go to `environment`. Joins the environment's queue at once where no approval
    is needed (or for an emergency), otherwise awaits approval until it expires. A busy environment
    is no refusal: the deployment waits its turn (and the portal's own `automatic` one a frozen
    environment's thaw: see policy.decide_request)."""
    emergency_reason = policy.stated(emergency_reason)
    # No savepoint when called inside a caller's transaction (a new release deploying itself): a
    # refusal leaves this block normally and is raised after it, and any other error fails the caller.
    with transaction.atomic(savepoint=False):
        environment = _lock_environment(environment.pk)
        if not (Release.build.is_cached(release) and Release.application.is_cached(release)):
            # A release never changes after registration, nor does its (finished) build: a caller's
            # copy that holds both is as good as a fresh one.
            release = Release.objects.select_related("build", "application").get(pk=release.pk)
        decision = policy.decide_request(
            actor=actor, release=release, environment=environment, emergency_reason=emergency_reason,
            automatic=automatic,
        )
        if decision.allowed:
            now = timezone.now()
            queue_now = decision.next == Next.QUEUE
            expiry = dt.timedelta(hours=settings.PORTAL_APPROVAL_EXPIRY_HOURS)
            deployment = Deployment.objects.create(
                release=release, environment=environment, requested_at=now,
                state=State.QUEUED if queue_now else State.AWAITING_APPROVAL,
                requested_by=actor.user if actor.is_person else None,
                requested_by_label=actor.label, requested_via=actor.via, requested_token_id=actor.token_id,
                automatic=not actor.is_person,
                expires_at=None if queue_now else now + expiry,
                queued_at=now if queue_now else None,
                promoted_from=decision.promoted_from,
                required_approvals=environment.required_approvals,
                emergency=bool(emergency_reason), emergency_reason=emergency_reason,
                sod_checks=list(decision.checks),
            )
            chain.append(
                actor=actor, action="deployment.request", obj=deployment,
                data=_deployment_data(
                    deployment, emergency=deployment.emergency, emergency_reason=emergency_reason,
                    promoted_from=decision.promoted_from.pk if decision.promoted_from else None,
                    sod_checks=list(decision.checks), **({"skipped": decision.skips} if decision.skips else {}),
                ),
            )
            if queue_now:
                _join_queue(deployment, now)
            return deployment
        error = refused(
            actor=actor, action="deployment.request", refusal=decision.refusal, obj=environment,
            data={"release": str(release), "application": environment.application.name, "version": release.version,
                  "environment": environment.name, "emergency": bool(emergency_reason)},
        )
    raise error


def auto_deploy(*, release: Release, environment: Environment) -> Deployment | None:
    """The portal asks for a deployment by itself. A frozen environment takes it into its queue, where
    it waits for the freeze to end (nobody would be there to ask again). A refusal is on record in the
    audit chain and does not fail the caller."""
    try:
        return deployment_request(actor=Actor.system(via="auto"), release=release, environment=environment,
                                  automatic=True)
    except PolicyRefusal:
        return None


def _auto_deploy_targets(application_id, *after_id):
    targets = Environment.objects.select_for_update(of=("self",)).filter(application_id=application_id,
                                                                         auto_deploy=True)
    targets = targets.filter(promotes_from_id=after_id[0]) if after_id else targets.filter(promotes_from__isnull=True)
    return targets.order_by("id").values(*model_fields(Environment))


# Asked by every new release and every success: compiled once (core.compiled).
_FIRST_AUTO_DEPLOY_TARGETS = CompiledRead(_auto_deploy_targets, int)
_NEXT_AUTO_DEPLOY_TARGETS = CompiledRead(_auto_deploy_targets, int, int)


def lock_auto_deploy_targets(*, release: Release, after: Environment | None = None) -> list[Environment]:
    """Lock, until commit, the auto-deploy environments the release goes on to (see auto_deploy_next).

    Asked before the caller appends to the audit chain. The chain's lock, taken at a transaction's
    first append and held until its commit, comes after every environment a service locks: a service
    that locked an environment after appending (a release deploying itself, a success going on to the
    next environment) waited for that environment while holding the chain, and another service holding
    that environment waited for the chain: a deadlock, which PostgreSQL ends by failing one of them."""
    if after is None:
        return _FIRST_AUTO_DEPLOY_TARGETS.instances(Environment, release.application_id)
    return _NEXT_AUTO_DEPLOY_TARGETS.instances(Environment, release.application_id, after.pk)


def release_registering(*, release: Release) -> Callable[[], None]:
    """A new release goes on to the auto-deploy environments that start its promotion path: locked now,
    before the registration's audit event (see lock_auto_deploy_targets), deployed to once it is written."""
    return partial(auto_deploy_next, release=release, targets=lock_auto_deploy_targets(release=release))


def auto_deploy_next(*, release: Release, after: Environment | None = None,
                     targets: list[Environment] | None = None) -> None:
    """A new release (after=None) goes to the auto-deploy environments that start a promotion path;
    a success in `after` goes on to the auto-deploy environments promoted from it (`targets`: those,
    locked already by lock_auto_deploy_targets)."""
    if targets is None:
        targets = lock_auto_deploy_targets(release=release, after=after)
    for environment in targets:
        auto_deploy(release=release, environment=environment)


# Asked at every end of a deployment (and every superseded one): compiled once (core.compiled).
_ENABLED_CHANNELS = CompiledRead(lambda application_id: NotificationChannel.objects.filter(
    application_id=application_id, enabled=True).order_by("id").values_list("id"), int)


def _notify(deployment: Deployment, channels: Pending | None = None) -> None:
    """Tell the application's channels how a deployment ended, after commit (one task per channel);
    `channels`: the _ENABLED_CHANNELS read of its application, when read already with others."""
    if channels is None:
        channels = _ENABLED_CHANNELS.later(deployment.release.application_id)
    for (channel_id,) in channels.tuples():
        _enqueue("send_notification", channel_id, deployment.pk, name=f"notify-{channel_id}-{deployment.pk}")


def _decide(*, actor: Actor, deployment_id: int, approve: bool, comment: str) -> Deployment:
    action = "deployment.approve" if approve else "deployment.reject"
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        decision = policy.decide_approval(actor=actor, deployment=deployment, approve=approve)
        if decision.next == Next.EXPIRE:
            _expire(deployment, timezone.now())
        if decision.allowed:
            approvals = policy.approvals_given(deployment) + (1 if approve else 0)
            Approval.objects.create(
                deployment=deployment, approver=actor.user,
                decision=Approval.Decision.APPROVE if approve else Approval.Decision.REJECT, comment=comment,
            )
            deployment._prefetched_objects_cache.pop("approvals", None)  # the new one is in the database
            now = timezone.now()
            sod = sorted({*deployment.sod_checks, *decision.checks})
            if decision.next == Next.END:
                _set_state(deployment, State.REJECTED, finished_at=now, sod_checks=sod,
                           result_detail=f"Rejected by {actor.label}: {comment}".strip(" :"))
            elif decision.next == Next.QUEUE:
                _set_state(deployment, State.QUEUED, queued_at=now, sod_checks=sod)
            else:
                _set_state(deployment, State.AWAITING_APPROVAL, sod_checks=sod)
            chain.append(actor=actor, action=action, obj=deployment,
                         data=_deployment_data(deployment, comment=comment, approvals=approvals,
                                               sod_checks=list(decision.checks)))
            if decision.next == Next.QUEUE:
                _join_queue(deployment, now)
            return deployment
        error = refused(actor=actor, action=action, refusal=decision.refusal, obj=deployment,
                        data=_deployment_data(deployment, comment=comment))
    raise error


def deployment_approve(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Record one approval; the last one required puts the deployment in its environment's queue."""
    return _decide(actor=actor, deployment_id=deployment_id, approve=True, comment=comment)


def deployment_reject(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Record a rejection; any rejection ends the request."""
    return _decide(actor=actor, deployment_id=deployment_id, approve=False, comment=comment)


def deployment_cancel(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Cancel an open deployment. A waiting one ends at once; a running one is flagged and the deploy
    engine stops its playbook and ends it `cancelled`."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        decision = policy.decide_cancel(actor=actor, deployment=deployment)
        if decision.allowed:
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
        error = refused(actor=actor, action="deployment.cancel", refusal=decision.refusal, obj=deployment,
                        data=_deployment_data(deployment, comment=comment))
    raise error


def deployment_refuse_token_requests(*, actor: Actor, token_id: int) -> list[int]:
    """A revoked token's waiting requests end `refused`: nothing it asked for starts afterwards."""
    refusal = policy.token_revoked_refusal()
    ended = []
    ids = Deployment.objects.filter(
        requested_token_id=token_id, state__in=(State.AWAITING_APPROVAL, State.QUEUED)
    ).values_list("id", flat=True)
    for deployment_id in list(ids):
        with transaction.atomic():
            deployment = _lock_deployment(deployment_id)
            if deployment.state not in (State.AWAITING_APPROVAL, State.QUEUED):
                continue
            _set_state(deployment, State.REFUSED, finished_at=timezone.now(), result_detail=refusal.detail,
                       refusal_code=refusal.code)
            chain.append(actor=actor, action="deployment.refused", obj=deployment, code=refusal.code,
                         data=_deployment_data(deployment, detail=refusal.detail))
            ended.append(deployment_id)
    return ended


# --- the deploy engine's side ----------------------------------------------------------------------

def this_engine() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def deployment_start(*, deployment_id: int, engine: str | None = None, actor: Actor | None = None) -> Deployment | None:
    """The deploy engine claims a started deployment to run its playbook.

    Returns None when it is not running or another engine has it already: a task delivered twice
    never runs a deployment twice. A deployment cancelled before any engine took it ends here.
    """
    actor = actor or ENGINE
    engine = engine or this_engine()
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if deployment.state != State.RUNNING or deployment.engine:
            return None
        now = timezone.now()
        if deployment.cancel_requested_at is not None:
            _finish(deployment, actor=actor, state=State.CANCELLED, detail="Cancelled before the playbook started.")
            return None
        deployment.engine, deployment.heartbeat_at = engine, now
        deployment.save(update_fields=["engine", "heartbeat_at"])
        chain.append(actor=actor, action="deployment.claim", obj=deployment,
                     data=_deployment_data(deployment, engine=engine))
        return deployment


def deployment_redeliver(*, deployment_id: int, stale_before: dt.datetime) -> bool:
    """A started deployment that no engine took up (its task was lost with a worker) is handed to the
    deploy engine again. Safe: the engine's claim is atomic, so it still runs once."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        if deployment.state != State.RUNNING or deployment.engine or deployment.heartbeat_at >= stale_before:
            return False
        deployment.heartbeat_at = timezone.now()
        deployment.save(update_fields=["heartbeat_at"])
        chain.append(actor=ENGINE, action="deployment.redeliver", obj=deployment, data=_deployment_data(deployment))
        _enqueue("run_deployment", deployment.pk, name=f"deployment-{deployment.pk}")
        return True


def deployment_record_playbook(*, deployment_id: int, playbook_commit: str) -> None:
    """Record which playbooks a running deployment uses: a change to a deploy script is a change too."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        deployment.playbook_commit = playbook_commit
        deployment.save(update_fields=["playbook_commit"])
        chain.append(actor=ENGINE, action="deployment.playbook", obj=deployment,
                     data=_deployment_data(deployment, playbook_commit=playbook_commit))


FINISHED_BY_ENGINE = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.INTERRUPTED)


def _finish(deployment: Deployment, *, actor: Actor, state: str, detail: str = "", extra: dict | None = None):
    """A running deployment ends: record it, go on along the promotion path, tell the channels, and
    start the next deployment waiting for the environment."""
    _set_state(deployment, state, finished_at=timezone.now(), result_detail=detail)
    succeeded = state == State.SUCCEEDED
    targets = lock_auto_deploy_targets(release=deployment.release, after=deployment.environment) if succeeded else []
    chain.append(actor=actor, action="deployment.finish", obj=deployment,
                 data=_deployment_data(deployment, result=state, detail=detail, **(extra or {})))
    if succeeded:
        auto_deploy_next(release=deployment.release, after=deployment.environment, targets=targets)
    _notify(deployment)
    _dispatch(deployment.environment)


def deployment_record_result(
    *, deployment_id: int, state: str, detail: str = "", actor: Actor | None = None, extra: dict | None = None
) -> Deployment:
    """Record how a running deployment ended (succeeded, failed, cancelled or interrupted); the next
    deployment waiting for the environment starts in the same transaction."""
    if state not in FINISHED_BY_ENGINE:
        raise ValueError(f"A deployment cannot end as {state!r}.")
    actor = actor or ENGINE
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        decision = policy.decide_finish(deployment)
        if decision.allowed:
            if state == State.CANCELLED and deployment.cancel_requested_at is not None:
                detail = f"{_cancelled_by(deployment)}. The run stopped: {detail}"
            _finish(deployment, actor=actor, state=state, detail=detail, extra=extra)
            return deployment
        error = refused(actor=actor, action="deployment.finish", refusal=decision.refusal, obj=deployment,
                        data=_deployment_data(deployment, result=state))
    raise error


def _cancelled_by(deployment: Deployment) -> str:
    """Who asked to stop a running deployment, and why, as the chain holds it."""
    asked = AuditEvent.objects.filter(action="deployment.cancel_request", object_type="environments.deployment",
                                      object_id=str(deployment.pk)).order_by("seq").last()
    if asked is None:
        return "Cancelled while it ran"
    return f"Cancelled by {asked.actor_username} while it ran: {asked.data.get('comment') or ''}".strip(" :")


def deployment_review(*, actor: Actor, deployment_id: int, comment: str = "") -> Deployment:
    """Review an emergency deployment afterwards; closes it as an exception."""
    with transaction.atomic():
        deployment = _lock_deployment(deployment_id)
        decision = policy.decide_review(actor=actor, deployment=deployment)
        if decision.allowed:
            deployment.reviewed_by = actor.user
            deployment.reviewed_at = timezone.now()
            deployment.review_comment = comment
            deployment.sod_checks = sorted({*deployment.sod_checks, *decision.checks})
            deployment.save(update_fields=["reviewed_by", "reviewed_at", "review_comment", "sod_checks"])
            chain.append(actor=actor, action="deployment.review", obj=deployment,
                         data=_deployment_data(deployment, comment=comment))
            return deployment
        error = refused(actor=actor, action="deployment.review", refusal=decision.refusal, obj=deployment,
                        data=_deployment_data(deployment, comment=comment))
    raise error


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


def _grant_change(*, actor: Actor, environment: Environment, codename: str, user, group, grant: bool) -> bool:
    if codename not in policy.GRANTABLE:
        raise ValueError(f"Unknown environment permission {codename!r}.")
    if (user is None) == (group is None):
        raise ValueError("Grant to exactly one user or one group.")
    action = "environment.grant" if grant else "environment.revoke"
    # the ids say whose right it is whatever the names become (evidence.reconcile)
    data = {"environment": str(environment), "permission": codename,
            "user": user.get_username() if user else None, "group": group.name if group else None,
            "user_id": user.pk if user else None, "group_id": group.pk if group else None}
    with transaction.atomic():
        environment = _lock_environment(environment.pk)
        decision = policy.decide_grant(actor=actor, environment=environment, user=user, group=group, grant=grant)
        if decision.allowed:
            by_group, direct = policy.grants_on(environment)
            held = (direct.filter(user=user) if user else by_group.filter(group=group)).filter(
                permission__codename=codename).exists()
            if held == grant:
                return False  # held already, or never held: nothing changes, so nothing is recorded
            (assign_perm if grant else remove_perm)(f"environments.{codename}", user or group, environment)
            chain.append(actor=actor, action=action, obj=environment, data=data)
            return True
        error = refused(actor=actor, action=action, refusal=decision.refusal, obj=environment, data=data)
    raise error


def environment_grant(*, actor: Actor, environment: Environment, codename: str, user=None, group=None) -> bool:
    """Give a user or a group the right to deploy to / approve for one environment. False: they held
    it already (nothing changed, nothing recorded)."""
    return _grant_change(actor=actor, environment=environment, codename=codename, user=user, group=group, grant=True)


def environment_revoke(*, actor: Actor, environment: Environment, codename: str, user=None, group=None) -> bool:
    """Take that right back. False: they did not hold it explicitly (nothing changed, nothing recorded)."""
    return _grant_change(actor=actor, environment=environment, codename=codename, user=user, group=group,
                         grant=False)


def group_membership_change(*, actor: Actor, group: Group, user, add: bool) -> None:
    """Add a user to a group or remove them; joining a releasers group is receiving its grants."""
    action = "group.add_member" if add else "group.remove_member"
    data = {"group": group.name, "user": user.get_username(), "user_id": user.pk}
    with transaction.atomic():
        decision = policy.decide_membership(actor=actor, group=group, user=user, add=add)
        if decision.allowed:
            (user.groups.add if add else user.groups.remove)(group)
            chain.append(actor=actor, action=action, obj=group, data=data)
            return
        error = refused(actor=actor, action=action, refusal=decision.refusal, obj=group, data=data)
    raise error


def _from_to(before, after, fields: tuple[str, ...]) -> dict:
    """{field: {"from", "to"}} for each field whose value differs (before None: a new row)."""
    return {
        name: {"from": None if before is None else getattr(before, name), "to": getattr(after, name)}
        for name in fields
        if before is None or getattr(before, name) != getattr(after, name)
    }


SETTINGS_FIELDS = ("name", "promotes_from", "restricted", "auto_deploy", "required_approvals", "requires_code_review",
                   "playbook", "inventory", "playbook_repo", "playbook_ref")


def settings_of(environment: Environment) -> dict:
    """The settings the chain records an environment by (its events' `changed`, a control change's `now`)."""
    return {name: getattr(environment, f"{name}_id" if name == "promotes_from" else name) for name in SETTINGS_FIELDS}


def environment_save(
    *, actor: Actor, environment: Environment, changed: list[str] | None = None, reason: str = ""
) -> Environment | ControlChange:
    """Create or change an environment's settings; the chain records each changed field from and to.

    A person's change that makes a restricted environment less strict (restricted off, fewer
    approvals, code review off, auto-deploy on, another promotion path or name, another playbook or
    inventory) is not applied: it becomes a ControlChange proposal, returned, that a different
    administrator must approve. Stricter changes apply at once.
    """
    reason = reason.strip()
    with transaction.atomic():
        creating = environment._state.adding
        before = None if creating else _lock_environment(environment.pk)
        if before is not None and before.application_id != environment.application_id:
            raise ValidationError("An environment stays with its application (its path, freezes and history are "
                                  "that application's): create one in the other application instead.")
        environment.full_clean()
        if actor.is_person and (weaker := policy.weakened_controls(before, environment)):
            if refusal := policy.check_may_administer(actor):
                error = refused(actor=actor, action="control_change.propose", refusal=refusal, obj=before,
                                data={"changes": weaker})
            elif not reason:
                raise ValidationError("A change that weakens a control needs a reason, and a second administrator.")
            else:
                change = ControlChange.objects.create(application_id=before.application_id, environment=before,
                                                      changes=weaker, reason=reason, proposed_by=actor.user)
                chain.append(actor=actor, action="control_change.propose", obj=change,
                             data={"environment": str(before), "changes": weaker, "reason": reason})
                return change
        else:
            old = {} if before is None else settings_of(before)
            new = settings_of(environment)
            environment.save()
            diff = {k: [old.get(k), v] for k, v in new.items() if creating or old.get(k) != v}
            data = {"changed": diff, "executable": _from_to(before, environment, policy.EXECUTABLE_SETTINGS)}
            chain.append(actor=actor, action="environment.create" if creating else "environment.change",
                         obj=environment, data={**data, "reason": reason} if reason else data)
            return environment
    raise error


def _apply_control_change(change: ControlChange, environment: Environment | None, now: dt.datetime) -> dict:
    if change.freeze_window_id is None:
        for name, (_old, new) in change.changes.items():
            if name in SETTINGS_FIELDS:
                setattr(environment, f"{name}_id" if name == "promotes_from" else name, new)
        environment.full_clean()
        environment.save(update_fields=[f for f in SETTINGS_FIELDS if f in change.changes])
        return settings_of(environment)
    window = FreezeWindow.objects.select_for_update().get(pk=change.freeze_window_id)
    if "removed" in change.changes:
        window.ends_at = max(now, window.starts_at + dt.timedelta(microseconds=1))
    else:
        _set_freeze_fields(window, {name: new for name, (_old, new) in change.changes.items()})
    window.full_clean()
    window.save()
    return policy.freeze_fields(window)


def _set_freeze_fields(window: FreezeWindow, values: dict) -> None:
    for name, value in values.items():
        if name in ("starts_at", "ends_at") and isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        elif name == "duration" and value is not None:
            value = dt.timedelta(seconds=value)
        setattr(window, name, value)


def _current_of(change: ControlChange, environment: Environment | None) -> dict:
    if change.freeze_window_id is None:
        current = settings_of(environment)
        if "path" in change.changes:  # where the proposed source leads now
            current["path"] = policy.promotion_path(environment.application_id, change.changes["promotes_from"][1])
        return current
    window = FreezeWindow.objects.filter(pk=change.freeze_window_id).first()
    return {"removed": None} if window is None else {**policy.freeze_fields(window), "removed": True}


def _control_decision(*, actor: Actor, change_id: int, approve: bool, comment: str) -> ControlChange:
    action = "control_change.approve" if approve else "control_change.reject"
    with transaction.atomic():
        change = ControlChange.objects.select_related("proposed_by", "application").filter(pk=change_id).first()
        if change is None:
            raise NotFound(f"No control change #{change_id}.")
        locked = {e.pk: e for e in _lock_application(change.application_id)}  # pk order, like every lock here
        environment = locked.get(change.environment_id)
        if environment is not None:
            environment = _lock_environment(environment.pk)  # with its relations, already locked
        change = ControlChange.objects.select_for_update().select_related("proposed_by", "application").get(
            pk=change_id)
        decision = policy.decide_control_change(actor=actor, change=change, current=_current_of(change, environment),
                                                approve=approve)
        data = {"environment": str(environment or change.application), "changes": change.changes,
                "reason": change.reason, "proposed_by": change.proposed_by.get_username(), "comment": comment}
        if decision.allowed:
            now = timezone.now()
            change.state = ControlChange.State.APPLIED if approve else ControlChange.State.REJECTED
            change.decided_by, change.decided_at, change.decision_comment = actor.user, now, comment
            change.save(update_fields=["state", "decided_by", "decided_at", "decision_comment"])
            if approve:
                data["now"] = _apply_control_change(change, environment, now)
            chain.append(actor=actor, action=action, obj=change, data=data)
            return change
        error = refused(actor=actor, action=action, refusal=decision.refusal, obj=change, data=data)
    raise error


def control_change_decision(*, actor: Actor, change: ControlChange, approve: bool) -> Decision:
    """What approving or rejecting `change` would meet now, read without a lock: what a page offers is
    what the service will decide (it asks again, under its locks)."""
    environment = Environment.objects.filter(pk=change.environment_id).first() if change.environment_id else None
    return policy.decide_control_change(actor=actor, change=change, current=_current_of(change, environment),
                                        approve=approve)


def control_change_approve(*, actor: Actor, change_id: int, comment: str = "") -> ControlChange:
    """A different administrator approves a weaker control: it takes effect now."""
    return _control_decision(actor=actor, change_id=change_id, approve=True, comment=comment)


def control_change_reject(*, actor: Actor, change_id: int, comment: str = "") -> ControlChange:
    return _control_decision(actor=actor, change_id=change_id, approve=False, comment=comment)


def _lock_application(application_id: int) -> list[Environment]:
    """Lock every environment of an application (in pk order): what a freeze of all of them touches."""
    return list(Environment.objects.select_for_update(of=("self",)).filter(application_id=application_id)
                .order_by("id"))


def _lock_freeze_target(window: FreezeWindow) -> str:
    if window.environment_id is not None:
        return str(_lock_environment(window.environment_id))
    _lock_application(window.application_id)
    return f"{window.application} (all environments)"


def freeze_window_save(*, actor: Actor, window: FreezeWindow, reason: str = "") -> FreezeWindow | ControlChange:
    """Create or change a freeze window, one-off or recurring (stricter: at once). Changing one so
    that it ends sooner while it holds needs a reason and, for a person, a second administrator:
    a ControlChange proposal is returned."""
    reason = reason.strip()
    with transaction.atomic():
        target = _lock_freeze_target(window)
        before = None if window._state.adding else FreezeWindow.objects.select_for_update().get(pk=window.pk)
        window.full_clean()
        weaker = {} if before is None else policy.freeze_weakened(before, window)
        result = _weaken_freeze(actor=actor, target=target, window=before, weaker=weaker, reason=reason) if weaker \
            else None
        if result is None:
            old = {} if before is None else policy.freeze_fields(before)
            window.save()
            new = policy.freeze_fields(window)
            diff = {k: [old.get(k), v] for k, v in new.items() if before is None or old.get(k) != v}
            chain.append(actor=actor, action="freeze.create" if before is None else "freeze.change", obj=window,
                         data={"target": target, "changed": diff, "reason": reason})
            return window
        if not isinstance(result, Refusal):
            return result
    raise PolicyRefusal(result)


def freeze_window_end(*, actor: Actor, window: FreezeWindow, reason: str = "") -> FreezeWindow | ControlChange:
    """Remove a freeze window. One that does not hold now goes at once; one that holds ends only with
    a stated reason and, for a person, a second administrator's approval."""
    reason = reason.strip()
    with transaction.atomic():
        target = _lock_freeze_target(window)
        window = FreezeWindow.objects.select_for_update().get(pk=window.pk)
        weaker = policy.freeze_weakened(window)
        result = _weaken_freeze(actor=actor, target=target, window=window, weaker=weaker, reason=reason) if weaker \
            else None
        if result is None:
            data = {"target": target, **policy.freeze_fields(window), "reason": reason or window.reason}
            about = chain.naming(window)
            window.delete()  # before the event: the rows it deletes are locked before the chain's lock
            chain.append(actor=actor, action="freeze.remove", **about, data=data)
            return window
        if not isinstance(result, Refusal):
            return result
    raise PolicyRefusal(result)


def _weaken_freeze(*, actor: Actor, target: str, window: FreezeWindow, weaker: dict, reason: str):
    """A holding freeze shortened or ended: the portal's own commands apply it (on record); a person's
    becomes a proposal. Returns the window, the proposal, or the refusal (audited, raised after commit)."""
    if not reason:
        raise ValidationError("Shortening or ending a freeze window while it holds needs a stated reason.")
    if not actor.is_person:
        if "removed" in weaker:
            window.ends_at = max(timezone.now(), window.starts_at + dt.timedelta(microseconds=1))
        else:
            _set_freeze_fields(window, {name: new for name, (_old, new) in weaker.items()})
        window.save()
        chain.append(actor=actor, action="freeze.change", obj=window,
                     data={"target": target, "changed": weaker, "reason": reason})
        return window
    if refusal := policy.check_may_administer(actor):
        audit_refusal(actor=actor, action="control_change.propose", refusal=refusal, obj=window,
                      data={"changes": weaker})
        return refusal
    change = ControlChange.objects.create(
        application_id=window.application_id or window.environment.application_id,
        environment_id=window.environment_id, freeze_window=window, changes=weaker, reason=reason,
        proposed_by=actor.user)
    chain.append(actor=actor, action="control_change.propose", obj=change,
                 data={"target": target, "freeze_window": window.pk, "changes": weaker, "reason": reason})
    return change


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
