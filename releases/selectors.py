"""Reads of builds, releases and changes that the API and the admin share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection
from django.db.models import Prefetch, Value
from django.db.transaction import TransactionManagementError

from core.compiled import CompiledRead, Pending, model_fields, together
from core.decisions import NotFound
from core.times import iso_or_none as _time
from environments import policy
from environments import selectors as env_selectors
from environments.models import Deployment, Environment
from releases.models import Application, Build, BuildIssue, Implementer, Release, ReleaseIssue


def _applications(name, within=None, *, lock: bool):
    # FOR NO KEY UPDATE: it serializes the lockers (a release registration) without holding back the
    # foreign-key checks of rows that point at the application (a build being registered meanwhile).
    applications = Application.objects.select_for_update(no_key=True) if lock else Application.objects
    return _within(applications.filter(name=name), within, "pk").order_by("name").values(
        *model_fields(Application))[:1]


# Every API call that names an application reads it (and every release registration locks it): compiled
# once per variant (core.compiled), by (lock, limited to some applications).
_APPLICATION = {
    (lock, limited): CompiledRead(functools.partial(_applications, lock=lock), str, *([(int,)] if limited else []))
    for lock in (False, True) for limited in (False, True)
}


def application_get(name: str, *, within: frozenset[int] | None = None, lock: bool = False) -> Application:
    """The application named `name`; `within` limits it to these ids (what a reader may see); `lock`
    holds its row until the caller's transaction ends."""
    return application_of(application_read(name, within=within, lock=lock), name)


def application_read(name: str, *, within: frozenset[int] | None = None, lock: bool = False) -> Pending:
    """application_get's read, to be run with others (core.compiled.together); application_of answers."""
    if lock and connection.get_autocommit():
        raise TransactionManagementError("application_get(lock=True) holds the row until the transaction ends.")
    read = _APPLICATION[lock, within is not None]
    return read.later(name) if within is None else read.later(name, within)


def application_of(read: Pending, name: str, *, within: frozenset[int] | None = None) -> Application:
    """The application application_read found; `within`: only if it is one of these."""
    found = [a for a in read.instances(Application) if within is None or a.pk in within]
    if not found:
        raise no_application(name)
    return found[0]


def no_application(name: str) -> NotFound:
    return NotFound(f"No application named {name!r}.")


_BUILD_COLUMNS = ("number", "commit", "branch", "url", "status", "tests_passed", "tests_failed", "tests_skipped",
                  "created_at", "updated_at")


def the_release_of_version(version: str) -> int | None:
    """The one release with exactly this version (whatever its application), or None: none, or one in
    each of several applications."""
    found = list(Release.objects.filter(version=version).order_by().values_list("pk", flat=True)[:2])
    return found[0] if len(found) == 1 else None


def build_as_dict(build: Build) -> dict:
    return _build_dict({"application": build.application.name,
                        **{name: getattr(build, name) for name in _BUILD_COLUMNS}})


def _build_dict(b: dict) -> dict:
    return {
        "application": b["application"], "number": b["number"], "commit": b["commit"],
        "branch": b["branch"], "url": b["url"], "status": b["status"],
        "tests": {"passed": b["tests_passed"], "failed": b["tests_failed"], "skipped": b["tests_skipped"]},
        "created_at": _time(b["created_at"]), "updated_at": _time(b["updated_at"]),
    }


# The applications a reader may see (None: all), or a function that answers it once asked.
Within = frozenset[int] | None | Callable[[], frozenset[int] | None]


def _within(queryset, within: frozenset[int] | None, field: str = "application_id"):
    """Only the rows of the applications a reader may see (`within` None: all of them)."""
    return queryset if within is None else queryset.filter(**{f"{field}__in": within})


# GET /api/v1/builds/{application}/{number}: compiled once (core.compiled).
_BUILD_ROW = CompiledRead(lambda application, number: Build.objects.filter(
    application__name=application, number=number).order_by().values(
    "application_id", "application__name", *_BUILD_COLUMNS)[:1], str, str)


def build_detail(application: str, number: str, *, within: Within = None, alongside: tuple[Pending, ...] = ()
                 ) -> dict:
    """build_as_dict of one build, read with its application's name in one round trip with the reads
    `alongside`; `within` as for release_detail."""
    read = _BUILD_ROW.later(application, number)
    together(*alongside, read)
    row = _row_within(read, within, f"{application} has no build {number!r}.")
    return _build_dict({**row, "application": row["application__name"]})


def _row_within(read: Pending, within: Within, missing: str) -> dict:
    """The row `read` found, if it is of an application the reader may see (`within`); else NotFound."""
    rows = read.dicts()
    within = within() if callable(within) else within
    if not rows or (within is not None and rows[0]["application_id"] not in within):
        raise NotFound(missing)
    return rows[0]


def deployment_summary(deployment: Deployment) -> dict:
    return _deployment_summary(deployment.pk, deployment.environment.name, deployment.state, deployment.requested_at,
                               deployment.queued_at, deployment.started_at, deployment.finished_at)


def _deployment_summary(pk, environment, state, requested_at, queued_at, started_at, finished_at) -> dict:
    return {
        "id": pk, "environment": environment, "state": state,
        "requested_at": _time(requested_at), "queued_at": _time(queued_at),
        "started_at": _time(started_at), "finished_at": _time(finished_at),
    }


def _release_dict(r: dict, issue_keys, implementers, deployments: list[dict]) -> dict:
    return {
        "application": r["application"], "version": r["version"], "build": r["build"],
        "artifact_url": r["artifact_url"], "artifact_sha256": r["artifact_sha256"],
        "issue_keys": sorted(issue_keys),
        "implementers": sorted(implementers),
        "pull_request": {
            "url": r["pull_request_url"], "author": r["pull_request_author"],
            "reviewers": r["pull_request_reviewers"], "approved_at": _time(r["pull_request_approved_at"]),
        } if r["pull_request_url"] else None,
        "registered_by": r["registered_by"], "registered_at": _time(r["registered_at"]),
        "deployments": deployments,
    }


_RELEASE_COLUMNS = ("version", "artifact_url", "artifact_sha256", "pull_request_url", "pull_request_author",
                    "pull_request_reviewers", "pull_request_approved_at", "registered_by", "registered_at")


def release_as_dict(release: Release) -> dict:
    """`release` should come from releases_with_details() so this runs no further queries."""
    row = {name: getattr(release, name) for name in _RELEASE_COLUMNS}
    return _release_dict(
        {**row, "application": release.application.name, "build": release.build.number},
        (i.key for i in release.issues.all()), (i.identity for i in release.implementers.all()),
        [deployment_summary(d) for d in release.deployments.all()],
    )


def _release_rows(application, version):
    return Release.objects.filter(application__name=application, version=version).order_by("pk").values(
        "id", "application_id", "application__name", "build__number", *_RELEASE_COLUMNS)[:1]


def _issues_and_implementers(application, version):
    release = {"release__application__name": application, "release__version": version}
    issues = ReleaseIssue.objects.filter(**release).order_by().values_list(Value("issue"), "key")
    implementers = Implementer.objects.filter(**release).order_by().values_list(Value("implementer"), "identity")
    return issues.union(implementers, all=True)


def _deployment_rows(application, version):
    return Deployment.objects.filter(release__application__name=application, release__version=version).order_by(
        "id").values_list("id", "environment__name", "state", "requested_at", "queued_at", "started_at", "finished_at")


# GET /api/v1/releases/{application}/{version} runs these on every call: compiled once (core.compiled).
_RELEASE_ROW = CompiledRead(_release_rows, str, str)
_ISSUES_AND_IMPLEMENTERS = CompiledRead(_issues_and_implementers, str, str)
_DEPLOYMENTS = CompiledRead(_deployment_rows, str, str)


def release_detail(application: str, version: str, *, within: Within = None, alongside: tuple[Pending, ...] = ()
                   ) -> dict:
    """release_as_dict of one release in three reads of the columns it shows, in one round trip with
    the reads `alongside`: the release with its application's name and build's number, its issue keys
    and implementers together, its deployments. `within`: the applications the reader may see (None:
    all), or what says so once the reads are in (e.g. from the reader's token read alongside)."""
    read = _RELEASE_ROW.later(application, version)
    details = _details_read(application, version)
    together(*alongside, read, *details)
    row = _row_within(read, within, f"{application} has no release {version!r}.")
    row.update(application=row.pop("application__name"), build=row.pop("build__number"))
    return _release_detail_of_row(row, details)


def release_detail_of(release: Release) -> dict:
    """release_detail of a release in hand (its application and build loaded, e.g. one just
    registered): two reads in one round trip, its issue keys and implementers together, and its
    deployments."""
    row = {name: getattr(release, name) for name in _RELEASE_COLUMNS}
    row.update(id=release.pk, application=release.application.name, build=release.build.number)
    return _release_detail_of_row(row, _details_read(row["application"], row["version"]))


def _details_read(application: str, version: str) -> tuple[Pending, Pending]:
    return _ISSUES_AND_IMPLEMENTERS.later(application, version), _DEPLOYMENTS.later(application, version)


def _release_detail_of_row(row: dict, details: tuple[Pending, Pending]) -> dict:
    together(*details)
    issues_and_implementers, deployments = details
    named: dict[str, list[str]] = {"issue": [], "implementer": []}
    for kind, value in issues_and_implementers.tuples():
        named[kind].append(value)
    deployments = deployments.tuples()
    return _release_dict(row, named["issue"], named["implementer"], [_deployment_summary(*d) for d in deployments])


def releases_with_details(*, approvals: bool = False):
    deployments = Deployment.objects.select_related("environment").order_by("id")
    if approvals:
        deployments = deployments.select_related("reviewed_by").prefetch_related("approvals__approver")
    return Release.objects.select_related("application", "build").prefetch_related(
        "issues", "implementers", Prefetch("deployments", queryset=deployments),
    )


def release_get(application: str, version: str, *, details: bool = True,
                within: frozenset[int] | None = None) -> Release:
    """One release; `details` prefetches what release_as_dict shows; `within` limits the applications."""
    releases = releases_with_details() if details else Release.objects.select_related("application")
    release = _within(releases.filter(application__name=application, version=version), within).first()
    if release is None:
        raise NotFound(f"{application} has no release {version!r}.")
    return release


@dataclass
class ChangeJourney:
    """One change (an issue key) from concept to deployment: the builds of its branch and of the
    releases carrying it, those releases with their deployments, the environments it reached, and
    where it is now. The journey page and `GET /api/v1/changes/{issue_key}` show the same."""

    key: str
    builds: list[Build]
    releases: list[Release]
    reached: list[dict]
    now: list[dict]
    summary: str

    def as_dict(self) -> dict:
        return {
            "issue_key": self.key,
            "builds": [build_as_dict(b) for b in self.builds],
            "releases": [release_as_dict(r) for r in self.releases],
            "environments_reached": self.reached,
            "now": self.now,
            "summary": self.summary,
        }


def _reached(releases: list[Release]) -> list[dict]:
    """Per environment, the latest succeeded deployment of a release carrying the change."""
    reached: dict[str, dict] = {}
    for release in releases:
        for d in release.deployments.all():
            if d.state == Deployment.State.SUCCEEDED:
                reached[f"{release.application.name}/{d.environment.name}"] = {
                    "application": release.application.name, "environment": d.environment.name,
                    "version": release.version, "deployment_id": d.pk, "requested_by": d.requested_by_label,
                    "approved_by": [a.approver.get_username() for a in d.approvals.all() if a.decision == "approve"],
                    "finished_at": _time(d.finished_at),
                    "emergency": d.emergency, "emergency_reason": d.emergency_reason,
                    "reviewed_by": d.reviewed_by.get_username() if d.reviewed_by else None,
                    "reviewed_at": _time(d.reviewed_at),
                }
    return sorted(reached.values(), key=lambda r: (r["finished_at"] or "", r["environment"]))


def _where_now(releases: list[Release]) -> list[dict]:
    """Per environment of the applications concerned (in promotion order): whether a release carrying
    the change runs there now, waits for it, reached it before, or has not reached it."""
    carrying = {r.pk: r for r in releases}
    environments = Environment.objects.filter(application_id__in={r.application_id for r in releases}).select_related(
        "application")
    ordered = [e for app_id in sorted({r.application_id for r in releases})
               for e in env_selectors.in_promotion_order([e for e in environments if e.application_id == app_id])]
    current = env_selectors.current_deployments([e.pk for e in ordered])
    queues = env_selectors.environment_queues([e.pk for e in ordered])
    rows = []
    for environment in ordered:
        running = current.get(environment.pk)
        mine = [e for e in queues[environment.pk] if e["release_id"] in carrying]
        row = {"application": environment.application.name, "environment": environment.name,
               "current_version": running.release.version if running else None}
        if running is not None and running.release_id in carrying:
            row.update(state="deployed", version=running.release.version, deployment_id=running.pk,
                       since=_time(running.finished_at), waiting_for="")
        elif mine:
            entry = mine[0]
            row.update(state=entry["state"], version=entry["version"], deployment_id=entry["id"], since=None,
                       waiting_for=entry["waiting_for"])
        else:
            reached = [r.pk for r in releases for d in r.deployments.all()
                       if d.environment_id == environment.pk and d.state == Deployment.State.SUCCEEDED]
            row.update(state="replaced" if reached else "not_reached", version=None, deployment_id=None, since=None,
                       waiting_for="",
                       # what runs there now is older than what carried the change there: a rollback
                       rolled_back=bool(reached and running) and policy.is_rollback(running.release_id, max(reached)))
        rows.append(row)
    return rows


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _summary(key: str, builds: list[Build], releases: list[Release], now: list[dict]) -> str:
    """Where the change is, in a sentence."""
    if not releases:
        return f"{key} is built on its branch; no release carries it yet."
    parts = []
    deployed = [n for n in now if n["state"] == "deployed"]
    for version in dict.fromkeys(n["version"] for n in deployed):
        names = [n["environment"] for n in deployed if n["version"] == version]
        parts.append(f"runs in {_names(names)} ({version})")
    for n in now:
        if n["state"] == Deployment.State.AWAITING_APPROVAL:
            parts.append(f"waits for {n['waiting_for']} in {n['environment']} ({n['version']})")
        elif n["state"] == Deployment.State.QUEUED:
            parts.append(f"is queued for {n['environment']} ({n['version']}), "
                         f"{env_selectors.waiting_phrase(n['waiting_for'])}")
        elif n["state"] == Deployment.State.RUNNING:
            parts.append(f"is being deployed to {n['environment']} ({n['version']})")
    replaced = [n["environment"] for n in now if n["state"] == "replaced" and not n.get("rolled_back")]
    if replaced:
        parts.append(f"ran in {_names(replaced)}, where later releases replaced it")
    for n in now:
        if n["state"] == "replaced" and n.get("rolled_back"):
            parts.append(f"ran in {n['environment']}, which was rolled back to {n['current_version']}")
    later = [n["environment"] for n in now if n["state"] == "not_reached"]
    if later:
        parts.append(f"has not reached {_names(later)} yet")
    return f"{key} " + "; ".join(parts) + "." if parts else f"{key} is released."


def change_journey(issue_key: str, *, within: frozenset[int] | None = None) -> ChangeJourney:
    """One change from concept to deployment: the builds of branches named after it and the builds of
    the releases carrying it, those releases, the environments they reached and where it is now (of
    the applications in `within`, None: all). A fixed number of queries, whatever the history."""
    key = issue_key.strip().upper()
    releases = list(_within(releases_with_details(approvals=True).filter(issues__key=key), within)
                    .order_by("registered_at", "id"))
    # One subquery that reads two indexes (the builds naming the key in their branch, the releases'
    # builds); an OR across the joins would read every build.
    named = BuildIssue.objects.filter(key=key).order_by().values("build_id").union(
        Build.objects.filter(pk__in={r.build_id for r in releases}).order_by().values("pk"))
    builds = list(_within(Build.objects.select_related("application"), within).filter(pk__in=named)
                  .order_by("created_at", "id"))
    if not releases and not builds:
        raise NotFound(f"No build or release carries {key}.")
    now = _where_now(releases) if releases else []
    return ChangeJourney(key, builds, releases, _reached(releases), now, _summary(key, builds, releases, now))


def change_detail(issue_key: str, *, within: frozenset[int] | None = None) -> dict:
    """The journey of one change, as the API answers it."""
    return change_journey(issue_key, within=within).as_dict()
