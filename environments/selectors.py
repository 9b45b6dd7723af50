"""Reads of environments and deployments that the API and the admin share."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from django.db import connection
from django.db.models import Count, OuterRef, Prefetch, Q, Subquery
from django.utils import timezone

from audit.actors import Actor
from audit.models import AuditEvent
from core.compiled import CompiledRead, Pending, together
from core.decisions import Decision, NotFound
from core.times import iso_or_none as _time
from environments import policy
from environments.models import Approval, ControlChange, Deployment, DeploymentEvent, Environment, FreezeWindow
from releases.models import Application, Implementer, Release

State = Deployment.State
ON_THE_WAY = 8  # releases on their way shown per application (the count says how many there are)
MY_REQUESTS = 8
LOG_TAIL_LINES = 200


def environment_get(application: str, name: str) -> Environment:
    environment = Environment.objects.filter(application__name=application, name=name).first()
    if environment is None:
        raise NotFound(f"{application} has no environment {name!r}.")
    return environment


def deployment_exists(deployment_id: int) -> bool:
    return Deployment.objects.filter(pk=deployment_id).exists()


def deployment_get(deployment_id: int, *, within: frozenset[int] | None = None) -> Deployment:
    """One deployment with what its page, its API body and the policy read (no further queries);
    `within` limits it to these applications (what a reader may see)."""
    deployments = (
        Deployment.objects.select_related("release__application", "release__build", "environment__application",
                                          "environment__promotes_from", "requested_by", "reviewed_by")
        .prefetch_related("approvals__approver")
        .filter(pk=deployment_id)
    )
    if within is not None:
        deployments = deployments.filter(release__application_id__in=within)
    deployment = deployments.first()
    if deployment is None:
        raise NotFound(f"No deployment #{deployment_id}.")
    return deployment


def _open_deployments(environment_ids):
    return _open_deployments_among(Deployment.objects.filter(environment_id__in=environment_ids))


def _open_deployments_among(deployments):
    return (
        deployments.filter(state__in=Deployment.OPEN_STATES)
        .annotate(approved=Count("approvals", filter=Q(approvals__decision="approve")))
        .values("id", "environment_id", "state", "release_id", "release__version", "engine", "emergency", "approved",
                "required_approvals", "queued_at", "requested_at", "requested_by_label")
    )


def _last_deployment():
    """The id of the environment's (OuterRef "pk") last deployment."""
    return Deployment.objects.filter(environment=OuterRef("pk")).order_by("-requested_at", "-id").values("id")[:1]


def _environment_rows(application):
    last_success = Deployment.objects.filter(environment=OuterRef("pk"), state=Deployment.State.SUCCEEDED).order_by(
        "-finished_at", "-id"
    )
    return Environment.objects.filter(application__name=application).annotate(
        current_version=Subquery(last_success.values("release__version")[:1]),
    ).order_by("id").values("id", "application_id", "name", "restricted", "promotes_from__name", "current_version")


def _last_deployments(application):
    last = Environment.objects.filter(application__name=application).values(last=Subquery(_last_deployment()))
    return Deployment.objects.filter(pk__in=last).order_by().values(
        "id", "environment_id", "release__version", "state", "requested_at", "finished_at")


def _application_open_deployments(application):
    return _open_deployments_among(Deployment.objects.filter(environment__application__name=application))


# The API's "what is deployed where" runs these on every call: compiled once (core.compiled).
_OPEN_DEPLOYMENTS = CompiledRead(_open_deployments, (int,))
_APPLICATION_OPEN_DEPLOYMENTS = CompiledRead(_application_open_deployments, str)
_ENVIRONMENTS = CompiledRead(_environment_rows, str)
_LAST_DEPLOYMENTS = CompiledRead(_last_deployments, str)


def environment_queues(environment_ids: list[int], *, now=None, application_id: int | None = None
                       ) -> dict[int, list[dict]]:
    """Per environment, its open deployments in queue order: the running one, those waiting (with their
    position and what each waits for), then those awaiting approval. Two queries (three unless the
    caller names the application all the environments belong to)."""
    now = now or timezone.now()
    rows = _OPEN_DEPLOYMENTS.dicts(environment_ids)
    if application_id is None:
        environments = Environment.objects.filter(pk__in=environment_ids).only("id", "application_id")
    else:
        environments = [Environment(pk=pk, application_id=application_id) for pk in environment_ids]
    return _queues(environment_ids, rows, policy.active_freezes(environments, now))


def _queues(environment_ids, rows: list[dict], frozen: dict) -> dict[int, list[dict]]:
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
        queue.append({"id": row["id"], "release_id": row["release_id"], "version": row["release__version"],
                      "state": state, "position": position,
                      "waiting_for": waiting_for, "emergency": row["emergency"],
                      "requested_by": row["requested_by_label"], "approved": row["approved"],
                      "required_approvals": row["required_approvals"]})
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
        "cancel_requested_at": _time(deployment.cancel_requested_at),
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


def application_environments(application: str, *, alongside: tuple[Pending, ...] = ()) -> list[dict]:
    """What is deployed where in the named application: per environment, the version of the last
    succeeded deployment, the last deployment and the queue. Four reads of a few columns each,
    whatever the history, in one round trip with the reads `alongside` (e.g. the application's own,
    which says whether the reader may see it)."""
    now = timezone.now()
    environments, last_deployments, open_deployments, windows = reads = (
        _ENVIRONMENTS.later(application), _LAST_DEPLOYMENTS.later(application),
        _APPLICATION_OPEN_DEPLOYMENTS.later(application), policy.freeze_windows_now(application, now),
    )
    together(*alongside, *reads)
    environments = environments.dicts()
    frozen = policy.freezes_holding(windows.instances(FreezeWindow), [
        Environment(pk=e["id"], application_id=e["application_id"]) for e in environments], now)
    queues = _queues([e["id"] for e in environments], open_deployments.dicts(), frozen)
    last = {d["environment_id"]: d for d in last_deployments.dicts()}
    rows = []
    for env in environments:
        d = last.get(env["id"])
        rows.append({
            "name": env["name"], "restricted": env["restricted"],
            "promotes_from": env["promotes_from__name"],
            "current_version": env["current_version"],
            "last_deployment": None if d is None else {
                "id": d["id"], "version": d["release__version"], "state": d["state"],
                "requested_at": _time(d["requested_at"]), "finished_at": _time(d["finished_at"]),
            },
            "frozen": None if (freeze := frozen.get(env["id"])) is None else {
                "until": _time(freeze.ends_at), "reason": freeze.reason},
            "queue": queues[env["id"]],
        })
    return rows


def requests_in_the_chain(deployment_ids: list[int]) -> dict[int, tuple[int, str | None]]:
    """Each deployment's request as the audit chain holds it: its event's seq, and what it went past
    when asked for (an emergency past a freeze: `data.skipped`), for the exceptions report and an
    emergency's page. One query."""
    return {int(object_id): (seq, skipped) for object_id, seq, skipped in AuditEvent.objects.filter(
        action="deployment.request", object_type="environments.deployment",
        object_id__in=[str(pk) for pk in deployment_ids]).values_list("object_id", "seq", "data__skipped")}


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


# --- the coming freezes ----------------------------------------------------------------------------

CALENDAR_DAYS = 30


@dataclass(frozen=True)
class FreezeEntry:
    """One coming (or running) period of a freeze window, with the environments it holds."""

    starts_at: dt.datetime
    ends_at: dt.datetime
    reason: str
    application: str
    environments: tuple[str, ...]
    recurring: bool
    running: bool
    window_id: int
    zone: str  # the time zone the window is planned in

    @property
    def day(self) -> dt.date:
        """The day it starts on where it is planned (a month-end close from Berlin's midnight is on its
        day there, not on the evening before in UTC)."""
        return self.starts_at.astimezone(ZoneInfo(self.zone)).date()


def freeze_calendar(*, application: Application | str | None = None, days: int = CALENDAR_DAYS,
                    now: dt.datetime | None = None) -> list[dict]:
    """The freezes of the next `days` days and those holding now, per application (all, or one given
    by row or name): [{"application": name, "entries": [FreezeEntry, ...]}] in time order. A window
    for every environment of an application is one entry naming them all. Two queries."""
    now = now or timezone.now()
    environments = Environment.objects.select_related("application").order_by("application__name", "id")
    if isinstance(application, Application):
        environments = environments.filter(application=application)
    elif application:
        environments = environments.filter(application__name=application)
    found = policy.upcoming_freezes(list(environments), now, now + dt.timedelta(days=days))
    merged: dict[tuple, tuple] = {}
    for environment, occurrence in found:
        key = (environment.application.name, occurrence.window.pk, occurrence.starts_at)
        merged.setdefault(key, (occurrence, []))[1].append(environment.name)
    by_application: dict[str, list[FreezeEntry]] = {}
    for (name, window_id, _), (occurrence, names) in merged.items():
        by_application.setdefault(name, []).append(FreezeEntry(
            starts_at=occurrence.starts_at, ends_at=occurrence.ends_at, reason=occurrence.reason, application=name,
            environments=tuple(names), recurring=bool(occurrence.window.recurrence),
            running=occurrence.starts_at <= now, window_id=window_id, zone=occurrence.window.timezone,
        ))
    return [{"application": name, "entries": sorted(entries, key=lambda e: (e.day, e.starts_at, e.window_id))}
            for name, entries in sorted(by_application.items())]


# --- the pages: the release board, a release, a deployment ----------------------------------------

def in_promotion_order(environments) -> list[Environment]:
    """One application's environments, each after the one it is promoted from (siblings by id)."""
    environments = sorted(environments, key=lambda e: e.pk)
    children: dict[int | None, list[Environment]] = defaultdict(list)
    for environment in environments:
        children[environment.promotes_from_id].append(environment)
    ordered: list[Environment] = []
    pending = list(reversed(children[None]))
    while pending:
        environment = pending.pop()
        if environment in ordered:
            continue
        ordered.append(environment)
        pending.extend(reversed(children[environment.pk]))
    return ordered + [e for e in environments if e not in ordered]


def approved_prefetch() -> Prefetch:
    """A deployment's approvals (not rejections), with the approver, as `approved`."""
    return Prefetch("approvals", to_attr="approved",
                    queryset=Approval.objects.filter(decision=Approval.Decision.APPROVE).select_related("approver"))


def ran_before(deployment: Deployment) -> Deployment | None:
    """The deployment whose release ran in the environment when `deployment` started: the last success
    there before it (evidence.reports' replaced_version). One query."""
    return (Deployment.objects.filter(environment_id=deployment.environment_id, state=State.SUCCEEDED,
                                      finished_at__lt=deployment.started_at)
            .select_related("release").order_by("-finished_at", "-id").first())


def current_deployments(environment_ids) -> dict[int, Deployment]:
    """Per environment, the deployment whose release runs there now: its last succeeded one. Three queries."""
    last = Deployment.objects.filter(environment=OuterRef("pk"), state=State.SUCCEEDED).order_by("-finished_at", "-id")
    pairs = list(Environment.objects.filter(pk__in=list(environment_ids))
                 .annotate(current=Subquery(last.values("id")[:1])).values_list("pk", "current"))
    deployments = Deployment.objects.filter(pk__in=[c for _, c in pairs if c]).select_related(
        "release", "requested_by").prefetch_related(approved_prefetch())
    by_id = {d.pk: d for d in deployments}
    return {environment: by_id[current] for environment, current in pairs if current in by_id}


def step_label(state: str, entry: dict | None = None, approved: int = 0, required: int = 0) -> str:
    """How far a release got in one environment, in a few words."""
    if state == State.SUCCEEDED:
        return "done"
    if state == State.AWAITING_APPROVAL:
        return f"waiting, {approved} of {required} approval{'s' if required != 1 else ''}"
    if state == State.QUEUED:
        return f"queued, {entry['position']} in line" if entry and entry.get("position") else "queued"
    return State(state).label.lower()


def _union_of(querysets: list) -> list:
    """The values of several one-column querysets, each ordered and sliced on its own, in one query."""
    if not querysets:
        return []
    parts, params = [], []
    for n, queryset in enumerate(querysets):
        sql, part_params = queryset.query.sql_with_params()
        parts.append(f"SELECT * FROM ({sql}) AS part{n}")
        params.extend(part_params)
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(parts), params)
        return [value for (value,) in cursor.fetchall()]


def _on_their_way(applications, ordered: dict[int, list[Environment]], current: dict[int, Deployment],
                  entries: dict[int, dict], limit: int) -> tuple[dict[int, list[dict]], dict[int, int]]:
    """Per application, the releases on their way: those with an open deployment, and those registered
    after the release that runs at the end of the promotion path. The latest `limit` of each (open ones
    first), each with its step in every environment; and how many there are. Four queries."""
    open_ids = {e["release_id"] for e in entries.values()}
    where, newest = Q(pk__in=open_ids), []
    for application in applications:
        environments = ordered.get(application.pk, [])
        sources = {e.promotes_from_id for e in environments}
        ends = [e for e in environments if e.pk not in sources]
        after = min((current[e.pk].release_id if e.pk in current else 0) for e in ends) if ends else 0
        where |= Q(application_id=application.pk, pk__gt=after)
        newest.append(Release.objects.filter(application_id=application.pk, pk__gt=after).order_by("-id")
                      .values("pk")[:limit])
    counts = dict(Release.objects.filter(where).values("application_id").annotate(n=Count("id"))
                  .values_list("application_id", "n"))
    # The open ones and each application's newest `limit` (through the index, however many are on
    # their way), then the latest `limit` of each, open ones first.
    candidates = Release.objects.filter(pk__in={*open_ids, *_union_of(newest)}).select_related("application")
    chosen: dict[int, list[Release]] = defaultdict(list)
    for release in sorted(candidates, key=lambda r: (r.pk not in open_ids, -r.pk)):
        if len(chosen[release.application_id]) < limit:
            chosen[release.application_id].append(release)
    releases = sorted((r for rs in chosen.values() for r in rs), key=lambda r: (r.application_id, -r.pk))
    latest: dict[tuple[int, int], dict] = {}
    reached: set[tuple[int, int]] = set()  # where a release succeeded once, whatever came after
    rows = (Deployment.objects.filter(release__in=releases)
            .annotate(approved=Count("approvals", filter=Q(approvals__decision=Approval.Decision.APPROVE)))
            .values("id", "release_id", "environment_id", "state", "required_approvals", "approved").order_by("id"))
    for row in rows:
        latest[(row["release_id"], row["environment_id"])] = row
        if row["state"] == State.SUCCEEDED:
            reached.add((row["release_id"], row["environment_id"]))
    way: dict[int, list[dict]] = defaultdict(list)
    for release in releases:
        steps = []
        for environment in ordered.get(release.application_id, []):
            row = latest.get((release.pk, environment.pk))
            label = step_label(row["state"], entries.get(row["id"]), row["approved"],
                               row["required_approvals"]) if row else ""
            if row and row["state"] != State.SUCCEEDED and (release.pk, environment.pk) in reached:
                label = f"{label}; ran here before"  # a rollback replaced it, and a later attempt did not run
            now = current.get(environment.pk)  # older than this release: the environment was rolled back
            if row and row["state"] == State.SUCCEEDED and now and policy.is_rollback(now.release_id, release.pk):
                label = f"done; rolled back to {now.release.version}"
            steps.append({"environment": environment, "state": row["state"] if row else "",
                          "deployment_id": row["id"] if row else None, "label": label})
        way[release.application_id].append({"release": release, "steps": steps})
    return way, counts


def release_board(*, now=None, limit: int = ON_THE_WAY) -> list[dict]:
    """What is deployed where, per application: its environments in promotion order, each with the
    deployment that runs there now and its queue; then the releases on their way. A fixed number of
    queries, whatever the history."""
    applications = list(Application.objects.order_by("name"))
    environments = list(Environment.objects.all())
    ordered: dict[int, list[Environment]] = defaultdict(list)
    for environment in environments:
        ordered[environment.application_id].append(environment)
    ordered = {app_id: in_promotion_order(envs) for app_id, envs in ordered.items()}
    ids = [e.pk for e in environments]
    current = current_deployments(ids)
    queues = environment_queues(ids, now=now)
    entries = {entry["id"]: entry for queue in queues.values() for entry in queue}
    way, counts = _on_their_way(applications, ordered, current, entries, limit)
    frozen = policy.active_freezes(environments, now)
    return [{
        "application": application,
        "environments": [{"environment": e, "current": current.get(e.pk), "queue": queues[e.pk],
                          "freeze": frozen.get(e.pk)}
                         for e in ordered.get(application.pk, [])],
        "on_the_way": way.get(application.pk, []),
        "on_the_way_count": counts.get(application.pk, 0),
    } for application in applications]


def awaiting_decision_of(actor: Actor) -> list[Deployment]:
    """The requests `actor` may approve or reject now: the policy is asked for each one awaiting
    approval (so an implementer, the requester or a non-releaser never sees it)."""
    pending = list(
        Deployment.objects.filter(state=State.AWAITING_APPROVAL)
        .select_related("release__application", "release__build", "environment__application",
                        "environment__promotes_from", "requested_by")
        .prefetch_related("approvals__approver", "release__issues", "release__implementers")
        .order_by("requested_at", "id")
    )
    # What the policy reads of the person is read once for all of them: a fixed number of queries.
    grants = policy.environment_grants_among(actor.user, {d.environment_id for d in pending})
    identities = policy.person_identities(actor.user) if pending and actor.is_person else None
    mine = [d for d in pending if policy.decide_approval(
        actor=actor, deployment=d, approve=True, grants=grants[d.environment_id], identities=identities).allowed]
    # an approval that would take an environment back to an older release says so before the click
    current = current_deployments({d.environment_id for d in mine}) if mine else {}
    for d in mine:
        now = current.get(d.environment_id)
        d.rolls_back_from = now.release if policy.is_rollback(d.release_id, now and now.release_id) else None
    return mine


def proposals_waiting(actor: Actor) -> dict[str, int] | None:
    """For an administrator of environments (policy.check_may_administer): how many control changes wait
    for a second administrator, proposed by others (theirs to decide: the list's confirmation asks the
    policy of each) and by themselves (another's to decide). One query; None for anyone else."""
    if policy.check_may_administer(actor) is not None:
        return None
    return ControlChange.objects.filter(state=ControlChange.State.PROPOSED).aggregate(
        others=Count("id", filter=~Q(proposed_by=actor.user)), mine=Count("id", filter=Q(proposed_by=actor.user)))


def review_decisions(actor: Actor, exceptions: list[dict]) -> dict[int, Decision]:
    """Whether `actor` may review each open emergency (open_exceptions'), by deployment id: the policy
    asked for each, with what it reads of the person read once (none for who is not a person)."""
    emergencies = [x["deployment"] for x in exceptions]
    if not emergencies or not actor.is_person:
        return {}
    grants = policy.environment_grants_among(actor.user, {d.environment_id for d in emergencies})
    identities = policy.person_identities(actor.user)
    return {d.pk: policy.decide_review(actor=actor, deployment=d, grants=grants[d.environment_id],
                                       identities=identities) for d in emergencies}


def requests_of(user, *, limit: int = MY_REQUESTS) -> tuple[list[Deployment], int]:
    """A person's latest deployment requests (with their approvals counted), and how many are still open."""
    mine = Deployment.objects.filter(requested_by=user)
    latest = list(
        mine.select_related("release__application", "environment")
        .annotate(approved_count=Count("approvals", filter=Q(approvals__decision=Approval.Decision.APPROVE)))
        .order_by("-requested_at", "-id")[:limit]
    )
    return latest, mine.filter(state__in=Deployment.OPEN_STATES).count()


def release_page(release_id: int) -> dict:
    """A release with everything its page shows: build, pull request, issues, implementers, every
    deployment with its approvals, and where it stands in each environment of its path. Fixed queries."""
    release = (
        Release.objects.select_related("application", "build")
        .prefetch_related(
            "issues",
            Prefetch("implementers", queryset=Implementer.objects.select_related("user").order_by("identity")),
            Prefetch("deployments", queryset=Deployment.objects.select_related(
                "environment", "requested_by", "reviewed_by").prefetch_related("approvals__approver")
                .order_by("requested_at", "id")),
        ).filter(pk=release_id).first()
    )
    if release is None:
        raise NotFound(f"No release #{release_id}.")
    environments = in_promotion_order(
        Environment.objects.filter(application_id=release.application_id).select_related("application", "promotes_from")
    )
    current = current_deployments([e.pk for e in environments])
    queues = environment_queues([e.pk for e in environments])
    entries = {entry["id"]: entry for queue in queues.values() for entry in queue}
    deployments = list(release.deployments.all())
    standing = []
    for environment in environments:
        own = [d for d in deployments if d.environment_id == environment.pk]
        latest = own[-1] if own else None
        approved = sum(1 for a in latest.approvals.all() if a.decision == "approve") if latest else 0
        standing.append({
            "environment": environment, "current": current.get(environment.pk), "latest": latest,
            "label": step_label(latest.state, entries.get(latest.pk), approved, latest.required_approvals)
            if latest else "",
            "reached": any(d.state == State.SUCCEEDED for d in own),
        })
    for deployment in deployments:
        deployment.queue_entry = entries.get(deployment.pk)
    return {"release": release, "environments": environments, "standing": standing, "deployments": deployments}


def queue_sentence(deployment: Deployment, entry: dict | None) -> str:
    """Where an open deployment stands, in a sentence ("" once it ended)."""
    if entry is None:
        return ""
    if entry["state"] == State.RUNNING:
        return f"Running{'; ' + waiting_phrase(entry['waiting_for']) if entry['waiting_for'] else ''}."
    if entry["state"] == State.QUEUED:
        return f"{entry['position']} in line; {waiting_phrase(entry['waiting_for'])}."
    if entry["state"] == State.AWAITING_APPROVAL:  # its state says it awaits approval: how far it is
        return f"{entry['approved']} of {entry['required_approvals']} approvals given."
    return f"{waiting_phrase(entry['waiting_for']).capitalize()}."


def waiting_phrase(waiting_for: str) -> str:
    """What a deployment waits for (the API's `waiting_for`) in words: "waiting for approval (0 of 1)",
    "waiting behind #12", "waiting, frozen until 2026-12-04 18:00 UTC (quarter close)"."""
    if waiting_for.startswith("behind "):
        return f"waiting {waiting_for}"
    if waiting_for.startswith("frozen "):
        return f"waiting, {waiting_for}"
    return f"waiting for {waiting_for}"


def deployment_log_tail(deployment_id: int, *, lines: int = LOG_TAIL_LINES) -> tuple[list[str], bool]:
    """The latest `lines` lines of a deployment's output log, and whether earlier lines were left out."""
    chunks = list(DeploymentEvent.objects.filter(deployment_id=deployment_id).exclude(stdout="")
                  .order_by("-counter").values_list("stdout", flat=True)[: lines + 1])
    text = [line for chunk in reversed(chunks) for line in chunk.splitlines()]
    return text[-lines:], len(text) > lines


def deployment_log(deployment_id: int):
    """The whole output log, chunk by chunk, in order (streamed: a long log is never held in memory)."""
    events = DeploymentEvent.objects.filter(deployment_id=deployment_id).exclude(stdout="").order_by("counter")
    for stdout in events.values_list("stdout", flat=True).iterator(chunk_size=500):
        yield stdout + "\n"


def deployment_live(deployment: Deployment) -> dict:
    """What a deployment's page refreshes while it runs: state, place in the queue, progress, log tail."""
    entry = queue_entry(deployment)
    progress = deployment.progress or {}
    tail, cut = deployment_log_tail(deployment.pk)
    return {
        "id": deployment.pk, "state": deployment.state, "state_label": deployment.get_state_display(),
        "open": deployment.state in Deployment.OPEN_STATES, "place": queue_sentence(deployment, entry),
        "hosts_done": progress.get("hosts_done", 0), "hosts_total": progress.get("hosts_total", 0),
        "current_task": progress.get("current_task", ""), "current_host": progress.get("current_host", ""),
        "failed_host": progress.get("failed_host", ""), "hosts": progress.get("hosts", {}),
        "log": "\n".join(tail), "log_cut": cut, "result": deployment.result_detail,
        "finished_at": _time(deployment.finished_at),
    }


def open_exceptions(*, now: dt.datetime | None = None) -> list[dict]:
    """Emergency deployments not reviewed yet (rule 7), oldest first, with their age in days and
    whether the review is overdue. One query."""
    now = now or timezone.now()
    rows = (
        Deployment.objects.filter(emergency=True, reviewed_at__isnull=True)
        .exclude(state=State.AWAITING_APPROVAL)
        .select_related("release__application", "environment").prefetch_related("release__implementers")
        .order_by("requested_at", "id")
    )
    return [{"deployment": d, "age_days": (now - d.requested_at).days,
             "overdue": policy.review_overdue(d.requested_at, now=now)} for d in rows]
