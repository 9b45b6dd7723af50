"""Queued work of the environments app (django-q2)."""

import logging

logger = logging.getLogger(__name__)


def enqueue_deployment(deployment_id: int) -> None:
    """Called after commit when a deployment becomes queued. The deploy engine picks it up from here."""
    logger.info("deployment %s queued", deployment_id)
