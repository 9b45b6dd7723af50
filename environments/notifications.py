"""Telling the issue tracker, chat and monitoring what was deployed where.

Sent by queued tasks after the deployment's transaction commits; each HTTP attempt is recorded
as a NotificationDelivery. A failing receiver is retried with backoff and never fails or blocks
a deployment. Credentials are read from the channel row here, never passed in task arguments,
and never written to the delivery record or the log.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

import requests
from django.conf import settings

from environments.models import Deployment, NotificationChannel, NotificationDelivery

logger = logging.getLogger(__name__)
Kind = NotificationChannel.Kind


def summary(deployment: Deployment) -> str:
    release = deployment.release
    outcome = {"succeeded": "was deployed to", "failed": "failed to deploy to",
               "cancelled": "was cancelled on its way to", "interrupted": "was interrupted deploying to"}
    return (f"{release.application.name} {release.version} {outcome.get(deployment.state, deployment.state + ' in')} "
            f"{deployment.environment.name} (deployment #{deployment.pk}, sha256 {release.artifact_sha256[:12]}).")


def messages_for(channel: NotificationChannel, deployment: Deployment) -> list[tuple[str, dict]]:
    """(url, JSON body) pairs in the receiver's own API shape."""
    text = summary(deployment)
    base = channel.url.rstrip("/")
    succeeded = deployment.state == Deployment.State.SUCCEEDED
    if channel.kind == Kind.ISSUE_TRACKER:
        if not succeeded:
            return []
        keys = sorted(deployment.release.issues.values_list("key", flat=True))
        return [(f"{base}/rest/api/2/issue/{key}/comment", {"body": text}) for key in keys]
    if channel.kind == Kind.CHAT:
        return [(channel.url, {"text": text})]
    if channel.kind == Kind.MONITORING:
        if not succeeded:
            return []
        finished = deployment.finished_at or dt.datetime.now(dt.UTC)
        tags = [f"application:{deployment.release.application.name}", f"environment:{deployment.environment.name}",
                f"version:{deployment.release.version}"]
        return [(f"{base}/api/annotations", {"time": int(finished.timestamp() * 1000), "tags": tags, "text": text})]
    return []


def _auth(channel: NotificationChannel) -> dict:
    if not channel.credential:
        return {}
    if ":" in channel.credential:
        user, _, token = channel.credential.partition(":")
        return {"auth": (user, token)}
    return {"headers": {"Authorization": f"Bearer {channel.credential}"}}


def deliver(*, channel_id: int, deployment_id: int) -> bool:
    """Send every message of one channel for one deployment; True when all were accepted."""
    channel = NotificationChannel.objects.select_related("application").get(pk=channel_id)
    deployment = Deployment.objects.select_related("release__application", "environment").get(pk=deployment_id)
    all_ok = True
    for url, body in messages_for(channel, deployment):
        all_ok &= _post_with_retries(channel, deployment, url, body)
    return all_ok


def _post_with_retries(channel, deployment, url: str, body: dict) -> bool:
    pauses = list(settings.PORTAL_NOTIFY_BACKOFF)
    for attempt in range(1, len(pauses) + 2):
        status_code, error = None, ""
        try:
            response = requests.post(url, json=body, timeout=settings.PORTAL_NOTIFY_TIMEOUT, **_auth(channel))
            status_code = response.status_code
            if not response.ok:
                error = f"HTTP {response.status_code}: {response.text[:500]}"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
        NotificationDelivery.objects.create(
            channel=channel, deployment=deployment, attempt=attempt, target=url[:1000],
            status_code=status_code, error=error, delivered=not error,
        )
        if not error:
            return True
        logger.warning("notification %s for deployment %s, attempt %s failed: %s", channel.kind, deployment.pk,
                       attempt, error[:200])
        if attempt <= len(pauses):
            time.sleep(pauses[attempt - 1])
    return False
