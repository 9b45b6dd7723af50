"""Reads of builds, releases and changes that the API and the admin share."""

from __future__ import annotations

from django.db.models import Prefetch, Q

from core.decisions import NotFound
from core.times import iso_or_none as _time
from environments.models import Deployment
from releases.models import Application, Build, Release


def application_get(name: str, *, within: frozenset[int] | None = None) -> Application:
    """The application named `name`; `within` limits it to these ids (what a reader may see)."""
    application = _within(Application.objects.filter(name=name), within, "pk").first()
    if application is None:
        raise NotFound(f"No application named {name!r}.")
    return application


def build_as_dict(build: Build) -> dict:
    return {
        "application": build.application.name, "number": build.number, "commit": build.commit,
        "branch": build.branch, "url": build.url, "status": build.status,
        "tests": {"passed": build.tests_passed, "failed": build.tests_failed, "skipped": build.tests_skipped},
        "created_at": _time(build.created_at), "updated_at": _time(build.updated_at),
    }


def _within(queryset, within: frozenset[int] | None, field: str = "application_id"):
    """Only the rows of the applications a reader may see (`within` None: all of them)."""
    return queryset if within is None else queryset.filter(**{f"{field}__in": within})


def build_get(application: str, number: str, *, within: frozenset[int] | None = None) -> Build:
    builds = Build.objects.select_related("application").filter(application__name=application, number=number)
    build = _within(builds, within).first()
    if build is None:
        raise NotFound(f"{application} has no build {number!r}.")
    return build


def deployment_summary(deployment: Deployment) -> dict:
    return {
        "id": deployment.pk, "environment": deployment.environment.name, "state": deployment.state,
        "requested_at": _time(deployment.requested_at), "queued_at": _time(deployment.queued_at),
        "started_at": _time(deployment.started_at), "finished_at": _time(deployment.finished_at),
    }


def release_as_dict(release: Release) -> dict:
    """`release` should come from releases_with_details() so this runs no further queries."""
    return {
        "application": release.application.name, "version": release.version, "build": release.build.number,
        "artifact_url": release.artifact_url, "artifact_sha256": release.artifact_sha256,
        "issue_keys": sorted(i.key for i in release.issues.all()),
        "implementers": sorted(i.identity for i in release.implementers.all()),
        "pull_request": {
            "url": release.pull_request_url, "author": release.pull_request_author,
            "reviewers": release.pull_request_reviewers, "approved_at": _time(release.pull_request_approved_at),
        } if release.pull_request_url else None,
        "registered_by": release.registered_by, "registered_at": _time(release.registered_at),
        "deployments": [deployment_summary(d) for d in release.deployments.all()],
    }


def releases_with_details():
    return Release.objects.select_related("application", "build").prefetch_related(
        "issues", "implementers",
        Prefetch("deployments", queryset=Deployment.objects.select_related("environment").order_by("id")),
    )


def release_get(application: str, version: str, *, details: bool = True,
                within: frozenset[int] | None = None) -> Release:
    """One release; `details` prefetches what release_as_dict shows; `within` limits the applications."""
    releases = releases_with_details() if details else Release.objects.select_related("application")
    release = _within(releases.filter(application__name=application, version=version), within).first()
    if release is None:
        raise NotFound(f"{application} has no release {version!r}.")
    return release


def change_detail(issue_key: str, *, within: frozenset[int] | None = None) -> dict:
    """One change from concept to deployment: the builds of branches named after it and the builds
    of the releases carrying it, those releases, and the environments they reached (of the
    applications in `within`, None: all). A fixed number of queries, whatever the history."""
    key = issue_key.strip().upper()
    releases = list(_within(releases_with_details().filter(issues__key=key), within).order_by("registered_at", "id"))
    builds = list(
        _within(Build.objects.select_related("application"), within)
        .filter(Q(issues__key=key) | Q(releases__in=releases))
        .distinct().order_by("created_at", "id")
    )
    if not releases and not builds:
        raise NotFound(f"No build or release carries {key}.")
    reached: dict[str, dict] = {}
    for release in releases:
        for d in release.deployments.all():
            if d.state == Deployment.State.SUCCEEDED:
                name = f"{release.application.name}/{d.environment.name}"
                reached[name] = {"application": release.application.name, "environment": d.environment.name,
                                 "version": release.version, "deployment_id": d.pk, "finished_at": _time(d.finished_at)}
    return {
        "issue_key": key,
        "builds": [build_as_dict(b) for b in builds],
        "releases": [release_as_dict(r) for r in releases],
        "environments_reached": sorted(reached.values(), key=lambda r: (r["finished_at"] or "", r["environment"])),
    }
