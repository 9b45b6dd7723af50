"""Reads of environments and deployments that the API and the admin share."""

from __future__ import annotations

from django.db.models import Count, OuterRef, Prefetch, Q, Subquery
from django.utils import timezone

from core.decisions import NotFound
from core.times import iso_or_none as _time
from environments import policy
from environments.models import Deployment, Environment
from releases.models import Application, Release


def environment_get(application: str, name: str) -> Environment:
    environment = Environment.objects.filter(application__name=application, name=name).first()
    if environment is None:
        raise NotFound(f"{application} has no environment {name!r}.")
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
        raise NotFound(f"No deployment #{deployment_id}.")
    return deployment


def environment_queues(environment_ids: list[int], *, now=None, application_id: int | None = None
                       ) -> dict[int, list[dict]]:
    """Per environment, its open deployments in queue order: the running one, those waiting (with their
    position and what each waits for), then those awaiting approval. Two queries (three unless the
    caller names the application all the environments belong to)."""
    now = now or timezone.now()
    rows = (
        Deployment.objects.filter(environment_id__in=environment_ids, state__in=Deployment.OPEN_STATES)
        .annotate(approved=Count("approvals", filter=Q(approvals__decision="approve")))
        .values("id", "environment_id", "state", "release__version", "engine", "emergency", "approved",
                "required_approvals", "queued_at", "requested_at", "requested_by_label")
    )
    if application_id is None:
        environments = Environment.objects.filter(pk__in=environment_ids).only("id", "application_id")
    else:
        environments = [Environment(pk=pk, application_id=application_id) for pk in environment_ids]
    frozen = policy.active_freezes(environments, now)
    order = {Deployment.State.RUNNING: 0, Deployment.State.QUEUED: 1, Deployment.State.AWAITING_APPROVAL: 2}
    queues: dict[int, list[dict]] = {e: [] for e in environment_ids}
    for row in sorted(rows, key=lambda r: (order[r["state"]], r["queued_at"] or r["requested_at"], r["id"])):
        queue = queues[row["environment_id"]]
        state, position, waiting_for = row["state"], None, ""
        if state == Deployment.State.RUNNING:
            position = 0
            waiting_for = "" if row["engine"] else "a deploy worker to take it up"
        elif state == Deployment.State.QUEUED:
            ahead = [q for q in queue if q["state"] in (Deployment.State.RUNNING, Deployment.State.QUEUED)]
            position = 1 + sum(1 for q in ahead if q["state"] == Deployment.State.QUEUED)
            freeze = frozen.get(row["environment_id"])
            if freeze is not None and not row["emergency"]:
                waiting_for = policy.waiting_for_freeze(freeze)
            elif ahead:
                waiting_for = f"behind #{ahead[-1]['id']}"
            else:
                waiting_for = "its start"
        else:
            waiting_for = f"approval ({row['approved']} of {row['required_approvals']})"
        queue.append({"id": row["id"], "version": row["release__version"], "state": state, "position": position,
                      "waiting_for": waiting_for, "emergency": row["emergency"],
                      "requested_by": row["requested_by_label"]})
    return queues


def queue_entry(deployment: Deployment) -> dict | None:
    """Where one open deployment stands in its environment's queue."""
    if deployment.state not in Deployment.OPEN_STATES:
        return None
    entries = environment_queues([deployment.environment_id]).get(deployment.environment_id, [])
    return next((e for e in entries if e["id"] == deployment.pk), None)


def deployment_as_dict(deployment: Deployment) -> dict:
    entry = queue_entry(deployment) or {}
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
        "refusal_code": deployment.refusal_code,
        "superseded_by": deployment.superseded_by_id,
        "position": entry.get("position"),
        "waiting_for": entry.get("waiting_for", ""),
        "progress": deployment.progress,
    }


def application_environments(application: Application) -> list[dict]:
    """What is deployed where: per environment, the version of the last succeeded deployment, the last
    deployment and the queue. Four queries of a few columns each, whatever the history."""
    last_success = Deployment.objects.filter(environment=OuterRef("pk"), state=Deployment.State.SUCCEEDED).order_by(
        "-finished_at", "-id"
    )
    last_any = Deployment.objects.filter(environment=OuterRef("pk")).order_by("-requested_at", "-id")
    environments = list(
        Environment.objects.filter(application=application).annotate(
            current_version=Subquery(last_success.values("release__version")[:1]),
            last_deployment_id=Subquery(last_any.values("id")[:1]),
        ).order_by("id").values("id", "name", "restricted", "promotes_from__name", "current_version",
                                "last_deployment_id")
    )
    queues = environment_queues([e["id"] for e in environments], application_id=application.pk)
    wanted = [e["last_deployment_id"] for e in environments if e["last_deployment_id"]]
    last = {
        d["id"]: d for d in Deployment.objects.filter(pk__in=wanted).order_by().values(
            "id", "release__version", "state", "requested_at", "finished_at")
    } if wanted else {}
    rows = []
    for env in environments:
        d = last.get(env["last_deployment_id"])
        rows.append({
            "name": env["name"], "restricted": env["restricted"],
            "promotes_from": env["promotes_from__name"],
            "current_version": env["current_version"],
            "last_deployment": None if d is None else {
                "id": d["id"], "version": d["release__version"], "state": d["state"],
                "requested_at": _time(d["requested_at"]), "finished_at": _time(d["finished_at"]),
            },
            "queue": queues[env["id"]],
        })
    return rows


def succeeded_deployments_prefetch() -> Prefetch:
    """For a list of releases: their succeeded deployments with the environment (one query)."""
    return Prefetch(
        "deployments", to_attr="succeeded_deployments",
        queryset=Deployment.objects.filter(state=Deployment.State.SUCCEEDED).select_related("environment")
        .order_by("environment_id"),
    )


def environments_reached_by(release: Release) -> list[str]:
    """The environments a release was deployed to successfully, in path order (prefetched or not)."""
    deployments = getattr(release, "succeeded_deployments", None)
    if deployments is None:
        deployments = release.deployments.filter(state=Deployment.State.SUCCEEDED).select_related("environment")
    return list(dict.fromkeys(d.environment.name for d in sorted(deployments, key=lambda d: d.environment_id)))
