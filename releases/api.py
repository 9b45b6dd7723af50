from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status
from pydantic import AfterValidator, BaseModel

from portal.api_common import REFUSALS, Name, Text, actor_of, readable
from releases import selectors, services

router = Router(tags=["builds and releases"])

NonNegative = Annotated[int, Field(ge=0, le=2_147_483_647)]
IssueKey = Annotated[Text(64, 3), AfterValidator(lambda v: _issue_key(v))]


def _issue_key(value: str) -> str:
    head, _, number = value.rpartition("-")
    if not head or not number.isdigit() or not head.replace("_", "").isalnum():
        raise ValueError("must look like PROJECT-123")
    return value.upper()


class Tests(BaseModel):
    passed: NonNegative = 0
    failed: NonNegative = 0
    skipped: NonNegative = 0


class BuildIn(BaseModel):
    application: Name
    number: Text(64, 1)
    commit: Text(64, 1)
    branch: Text(255, 1)
    url: Text(1000) = ""
    status: Literal["in_progress", "successful", "failed"]
    tests: Tests = Tests()


class BuildOut(Schema):
    application: str
    number: str
    commit: str
    branch: str
    url: str
    status: str
    tests: Tests
    created_at: str
    updated_at: str


class PullRequestIn(BaseModel):
    url: Text(1000, 1)
    author: Text(254, 1)
    reviewers: list[Text(254, 1)] = Field(default_factory=list, max_length=100)
    approved_at: datetime | None = None


class ReleaseIn(BaseModel):
    application: Name
    version: Text(100, 1)
    build: Text(64, 1)
    artifact_url: Text(1000, 1)
    artifact_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    issue_keys: list[IssueKey] = Field(default_factory=list, max_length=500)
    implementers: list[Text(254, 1)] = Field(default_factory=list, max_length=500)
    pull_request: PullRequestIn | None = None


class DeploymentSummary(Schema):
    id: int
    environment: str
    state: str
    requested_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None


class ReleaseOut(Schema):
    application: str
    version: str
    build: str
    artifact_url: str
    artifact_sha256: str
    issue_keys: list[str]
    implementers: list[str]
    pull_request: dict | None
    registered_by: str
    registered_at: str
    deployments: list[DeploymentSummary]


class ChangeOut(Schema):
    issue_key: str
    builds: list[BuildOut]
    releases: list[ReleaseOut]
    environments_reached: list[dict]


@router.post("/builds", response={200: BuildOut, 201: BuildOut, **REFUSALS}, summary="Register or update a build")
def register_build(request: HttpRequest, body: BuildIn):
    build, created = services.build_register(
        actor=actor_of(request), application=body.application, number=body.number, commit=body.commit,
        branch=body.branch, url=body.url, status=body.status,
        tests=services.TestCounts(body.tests.passed, body.tests.failed, body.tests.skipped),
    )
    return Status(201 if created else 200, selectors.build_as_dict(build))


@router.get("/builds/{application}/{number}", response={200: BuildOut, **REFUSALS}, summary="One build")
def get_build(request: HttpRequest, application: Name, number: Text(64, 1)):
    return selectors.build_as_dict(selectors.build_get(application, number, within=readable(request)))


@router.post("/releases", response={200: ReleaseOut, 201: ReleaseOut, **REFUSALS}, summary="Register a release")
def register_release(request: HttpRequest, body: ReleaseIn):
    pr = body.pull_request
    approved_at = pr.approved_at.isoformat() if pr and pr.approved_at else None
    release, created = services.release_register(
        actor=actor_of(request), application=body.application, version=body.version, build=body.build,
        artifact_url=body.artifact_url, artifact_sha256=body.artifact_sha256,
        issue_keys=body.issue_keys, implementers=body.implementers,
        pull_request=None if pr is None else services.PullRequest(pr.url, pr.author, tuple(pr.reviewers), approved_at),
    )
    return Status(201 if created else 200, selectors.release_as_dict(
        selectors.release_get(release.application.name, release.version)
    ))


@router.get("/releases/{application}/{version}", response={200: ReleaseOut, **REFUSALS},
            summary="A release and its deployments")
def get_release(request: HttpRequest, application: Name, version: Text(100, 1)):
    return selectors.release_as_dict(selectors.release_get(application, version, within=readable(request)))


@router.get("/changes/{issue_key}", response={200: ChangeOut, **REFUSALS},
            summary="One change from concept to deployment")
def get_change(request: HttpRequest, issue_key: Text(64, 1)):
    return selectors.change_detail(issue_key, within=readable(request))
