"""Queued work of the environments app (django-q2). Tasks get ids only, re-read their rows, and
refuse to act unless the row is in the state they expect. The services enqueue them by name after
commit; the reaper and the queue's clock run on a schedule. environments/broker.py makes sure the
worker runs nothing else."""

from __future__ import annotations

import logging

from environments import deploy, notifications, services

logger = logging.getLogger(__name__)


def run_deployment(deployment_id: int) -> str | None:
    """Run a started deployment's playbook (does nothing if another engine has it)."""
    return deploy.execute(deployment_id)


def reap_stale_deployments() -> list[int]:
    """Every minute: end `interrupted` the deployments whose worker died, then start the front of
    every idle environment's queue (a freeze that ended, a worker killed between two deployments)."""
    reaped = deploy.reap_stale()
    if reaped:
        logger.warning("deployments ended interrupted (stale heartbeat): %s", reaped)
    started = services.deployment_dispatch_idle()
    if started:
        logger.info("started waiting deployments: %s", [d.pk for d in started])
    return reaped


def expire_pending_approvals() -> int:
    return services.deployment_expire_pending()


def send_notification(channel_id: int, deployment_id: int) -> bool:
    return notifications.deliver(channel_id=channel_id, deployment_id=deployment_id)
