"""Queued work of the environments app (django-q2). Tasks get ids only, re-read their rows, and
refuse to act unless the row is in the state they expect.

The worker runs nothing else: the cluster's broker (settings Q_CLUSTER["broker_class"]) is one of
the two below, which check each task as it comes off the queue and drop, with an audit event, any
task that is not on PORTAL_TASKS.
"""

from __future__ import annotations

import logging

from django_q.brokers.orm import ORM
from django_q.brokers.redis_broker import Redis
from django_q.signing import BadSignature, SignedPackage
from django_q.tasks import async_task

from audit.actors import Actor
from audit.services import audit_refusal
from environments import policy

logger = logging.getLogger(__name__)

# Every function the worker may run: what the portal enqueues, and the schedules that migration
# 0003_schedules creates.
PORTAL_TASKS = frozenset({
    "environments.tasks.run_deployment",
    "environments.tasks.send_notification",
    "environments.tasks.reap_stale_deployments",
    "environments.tasks.expire_pending_approvals",
})


class PortalTasksOnly:
    """django-q2 broker mixin: a task leaves the queue for a worker only if it is one of the
    portal's own (policy.check_portal_task). A refused task is audited as `task.refused`, removed
    from the queue and never run.

    The check sits in the broker because django-q2 1.11 has no hook that can stop a task: the
    `pre_execute` signal is sent after the function has been resolved and cannot veto it, while the
    broker (a documented setting, `broker_class`) is where the cluster's pusher takes every task,
    whoever put it there: the scheduler, a resubmit, or a row written straight into the queue.
    """

    def dequeue(self):
        return [(ack_id, package) for ack_id, package in super().dequeue() or [] if self._admit(ack_id, package)]

    def _admit(self, ack_id, package) -> bool:
        try:
            task = SignedPackage.loads(package)
        except (TypeError, BadSignature):
            return True  # the pusher refuses and fails a package it cannot verify
        refusal = policy.check_portal_task(task.get("func"), task.get("hook"), PORTAL_TASKS)
        if refusal is None:
            return True
        audit_refusal(actor=Actor.system(via="task"), action="task", refusal=refusal, data={
            "func": policy.task_function_name(task.get("func")), "hook": str(task.get("hook") or ""),
            "task_id": str(task.get("id", "")), "task_name": str(task.get("name", "")),
            "group": str(task.get("group") or ""),
        })
        logger.error("task %s refused: %s", task.get("id"), refusal.detail)
        self.fail(ack_id)
        return False


class PortalOrmBroker(PortalTasksOnly, ORM):
    """The ORM broker (the portal's own database), running only the portal's tasks."""


class PortalRedisBroker(PortalTasksOnly, Redis):
    """The Redis broker, running only the portal's tasks."""


def enqueue_deployment(deployment_id: int) -> None:
    """Called after commit when a deployment becomes queued."""
    async_task("environments.tasks.run_deployment", deployment_id, task_name=f"deployment-{deployment_id}")


def run_deployment(deployment_id: int) -> str | None:
    from environments import deploy

    return deploy.execute(deployment_id)


def reap_stale_deployments() -> list[int]:
    from environments import deploy

    reaped = deploy.reap_stale()
    if reaped:
        logger.warning("deployments ended interrupted (stale heartbeat): %s", reaped)
    return reaped


def expire_pending_approvals() -> int:
    from environments import services

    return services.deployment_expire_pending()


def enqueue_notifications(deployment_id: int) -> None:
    """Called after commit when a deployment ends: one task per enabled channel."""
    from environments.models import Deployment, NotificationChannel

    application_id = Deployment.objects.values_list("release__application_id", flat=True).get(pk=deployment_id)
    for channel_id in NotificationChannel.objects.filter(application_id=application_id, enabled=True).values_list(
        "id", flat=True
    ):
        async_task("environments.tasks.send_notification", channel_id, deployment_id,
                   task_name=f"notify-{channel_id}-{deployment_id}")


def send_notification(channel_id: int, deployment_id: int) -> bool:
    from environments import notifications

    return notifications.deliver(channel_id=channel_id, deployment_id=deployment_id)
