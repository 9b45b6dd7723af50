"""Queued work of the environments app (django-q2). Tasks get ids only, re-read their rows, and
refuse to act unless the row is in the state they expect."""

from __future__ import annotations

import logging

from django_q.tasks import async_task

logger = logging.getLogger(__name__)


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
