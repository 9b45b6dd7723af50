"""Reads of environments and deployments that the API and the admin share."""

from __future__ import annotations

from django.db.models import OuterRef, Subquery
from django.http import Http404

from audit.chain import iso_or_none as _time
from environments.models import Deployment, Environment
from releases.models import Application, Release


def environment_get(application: str, name: str) -> Environment:
    environment = Environment.objects.filter(application__name=application, name=name).first()
    if environment is None:
        raise Http404(f"{application} has no environment {name!r}.")
    return environment


def deployment_get(deployment_id: int, *, within: frozenset[int] | None = None) -> Deployment:
    """One deployment; `within` limits it to these applications (what a reader may see)."""
    deployments = (
        Deployment.objects.select_related("release__application", "release__build", "environment", "requested_by")
        .prefetch_related("approvals__approver")
        .filter(pk=deployment_id)
    )
    if within is not None:
        deployments = deployments.filter(release__application_id__in=within)
    deployment = deployments.first()
    if deployment is None:
        raise Http404(f"No deployment #{deployment_id}.")
    return deployment


def deployment_as_dict(deployment: Deployment) -> dict:
    return {
        "id": deployment.pk,
        "application": deployment.release.application.name,
        "version": deployment.release.version,
        "environment": deployment.environment.name,
        "state": deployment.state,
        "requested_by": deployment.requested_by_label,
        "requested_at": _time(deployment.requested_at),
        "expires_at": _time(deployment.expires_at),
        "queued_at": _time(deployment.queued_at),
        "started_at": _time(deployment.started_at),
        "finished_at": _time(deployment.finished_at),
        "emergency": deployment.emergency,
        "emergency_reason": deployment.emergency_reason,
        "approvals": [
            {"approver": a.approver.get_username(), "decision": a.decision, "comment": a.comment,
             "decided_at": _time(a.decided_at)}
            for a in deployment.approvals.all()
        ],
        "required_approvals": deployment.required_approvals,
        "result": deployment.result_detail,
        "progress": deployment.progress,
    }


def application_environments(application: Application) -> list[dict]:
    """What is deployed where: per environment, the version of the last succeeded deployment."""
    last_success = Deployment.objects.filter(environment=OuterRef("pk"), state=Deployment.State.SUCCEEDED).order_by(
        "-finished_at", "-id"
    )
    last_any = Deployment.objects.filter(environment=OuterRef("pk")).order_by("-requested_at", "-id")
    environments = Environment.objects.filter(application=application).select_related("promotes_from").annotate(
        current_version=Subquery(last_success.values("release__version")[:1]),
        last_deployment_id=Subquery(last_any.values("id")[:1]),
    ).order_by("id")
    environments = list(environments)
    last = {
        d.pk: d for d in Deployment.objects.select_related("release", "environment").filter(
            pk__in=[e.last_deployment_id for e in environments if e.last_deployment_id]
        )
    }
    rows = []
    for env in environments:
        d = last.get(env.last_deployment_id)
        rows.append({
            "name": env.name, "restricted": env.restricted,
            "promotes_from": env.promotes_from.name if env.promotes_from_id else None,
            "current_version": env.current_version,
            "last_deployment": None if d is None else {
                "id": d.pk, "version": d.release.version, "state": d.state,
                "requested_at": _time(d.requested_at), "finished_at": _time(d.finished_at),
            },
        })
    return rows


def environments_reached(release_ids: list[int]) -> dict[int, list[str]]:
    """For each release, the names of the environments it was deployed to successfully (one query)."""
    reached: dict[int, list[str]] = {}
    rows = (
        Deployment.objects.filter(release_id__in=release_ids, state=Deployment.State.SUCCEEDED)
        .values_list("release_id", "environment__name").order_by("environment_id").distinct()
    )
    for release_id, name in rows:
        reached.setdefault(release_id, []).append(name)
    return reached


def next_environment(release: Release) -> Environment | None:
    """The next environment on the promotion path that this release has not reached yet."""
    reached = set(
        Deployment.objects.filter(release=release, state=Deployment.State.SUCCEEDED).values_list(
            "environment_id", flat=True
        )
    )
    for env in Environment.objects.filter(application_id=release.application_id).order_by("id"):
        if env.pk in reached:
            continue
        if env.promotes_from_id is None or env.promotes_from_id in reached:
            return env
    return None
