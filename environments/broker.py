"""The task queue's gate: the worker runs nothing but the portal's own tasks.

The cluster's broker (settings Q_CLUSTER["broker_class"]) is one of the two below, which check each
task as it comes off the queue and drop, with an audit event, any task that is not on PORTAL_TASKS.
"""

from __future__ import annotations

import logging

from django_q.brokers.orm import ORM
from django_q.brokers.redis_broker import Redis
from django_q.signing import BadSignature, SignedPackage

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
