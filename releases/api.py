from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Literal

from django.http import HttpRequest
from ninja import Field, Router, Status
from pydantic import AfterValidator, BaseModel, BeforeValidator, StringConstraints

from core.decisions import PolicyRefusal
from edge.api import (
    REFUSALS,
    SPACE,
    ApplicationName,
    DateTime,
    Identity,
    Name,
    Text,
    actor_of,
    example,
    matching,
    readable,
    sent,
)
from environments import policy
from releases import selectors, services
from releases.models import BUILD_NUMBER_MAX, ISSUE_KEY_MAX, ISSUE_KEY_PATTERN

router = Router(tags=["builds and releases"])

def _json_number(value):
    """A count is a JSON number (5, or 5.0: JSON Schema's integer); a string or true is not one."""
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number, not a string or true/false")
    return value


NonNegative = Annotated[int, BeforeValidator(_json_number), Field(ge=0, le=2_147_483_647)]
# An issue key as sent: whitespace around it (a key pasted with a trailing space) is stripped.
ISSUE_KEY_AS_SENT = rf"^[{SPACE}]*{ISSUE_KEY_PATTERN[1:-1]}[{SPACE}]*$"
IssueKey = Annotated[
    str, StringConstraints(max_length=ISSUE_KEY_MAX), matching(ISSUE_KEY_AS_SENT, "must look like PROJECT-123"),
    AfterValidator(lambda key: key.strip().upper()),
    Field(description="A change ticket, PROJECT-123 (ASCII letters, digits, underscore); stored upper-case, "
                      "whitespace around it stripped.",
          json_schema_extra={"pattern": ISSUE_KEY_AS_SENT}),
]


BUILD_EXAMPLE = {
    "application": "MAC", "number": "101", "commit": "a1b2c3d4", "branch": "feature/BIZPLAT-64951-fix",
    "url": "https://ci.example.com/mac/101", "status": "successful", "tests": {"passed": 12, "failed": 0, "skipped": 1},
}
RELEASE_EXAMPLE = {
    "application": "MAC", "version": "3.1.0", "build": "101",
    "artifact_url": "https://artifacts.example.com/mac-3.1.0.tar.gz", "artifact_sha256": "ab" * 32,
    "issue_keys": ["BIZPLAT-64951"], "implementers": ["alice@example.com"],
    "pull_request": {"url": "https://vcs.example.com/mac/pull/9", "author": "alice@example.com",
                     "reviewers": ["erin@example.com"], "approved_at": "2026-11-29T10:00:00Z"},
}
# Where the deploy playbooks can fetch an artifact from: a URL they download, or a file on the worker.
ARTIFACT_URL = r"^((https?|ftp|file)://|/)[^\x00]*$"
ArtifactUrl = Annotated[
    str, StringConstraints(min_length=1, max_length=1000),
    matching(ARTIFACT_URL, "must be an http://, https://, ftp:// or file:// URL, or an absolute path on the worker"),
    AfterValidator(str.strip),
    Field(description="Where the deploy playbook fetches the artifact: an http://, https://, ftp:// or file:// "
                      "URL, or an absolute path on the deploy worker. Trailing whitespace is stripped.",
          json_schema_extra={"pattern": ARTIFACT_URL}),
]
BuildNumber = Annotated[Text(BUILD_NUMBER_MAX, 1), example("101")]
Version = Annotated[Text(100, 1), example("3.1.0")]


class Tests(BaseModel):
    model_config = sent()

    passed: NonNegative = 0
    failed: NonNegative = 0
    skipped: NonNegative = 0


class BuildIn(BaseModel):
    model_config = sent(BUILD_EXAMPLE)

    application: Name
    number: Text(BUILD_NUMBER_MAX, 1)
    commit: Text(64, 1)
    branch: Text(255, 1)
    url: Text(1000) = ""
    status: Literal["in_progress", "successful", "failed"]
    tests: Tests | None = Field(None, description="The test counts; left out, a build's counts stay as they are "
                                "(a new build's are 0).")


class BuildOut(BaseModel):
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
    model_config = sent()

    url: Text(1000, 1)
    author: Identity("Who opened the pull request.")
    reviewers: list[Identity("Who reviewed it; a reviewer who is the author or an implementer under any identity "
                             "does not count as a review.")] = Field(default_factory=list, max_length=100)
    approved_at: DateTime | None = None


class ReleaseIn(BaseModel):
    model_config = sent(RELEASE_EXAMPLE)

    application: Name
    version: Text(100, 1)
    build: Text(BUILD_NUMBER_MAX, 1)
    artifact_url: ArtifactUrl
    artifact_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="Stored lower-case.")]
    issue_keys: list[IssueKey] = Field(default_factory=list, max_length=500)
    implementers: list[Identity("Who wrote or committed the change (commit authors, committers, pull request "
                                "author).")] = Field(default_factory=list, max_length=500)
    pull_request: PullRequestIn | None = None


class DeploymentSummary(BaseModel):
    id: int
    environment: str
    state: str
    requested_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None


class PullRequestOut(BaseModel):
    url: str
    author: str
    reviewers: list[str]
    approved_at: str | None


class ReleaseOut(BaseModel):
    application: str
    version: str
    build: str
    artifact_url: str
    artifact_sha256: str
    issue_keys: list[str]
    implementers: list[str]
    pull_request: PullRequestOut | None
    registered_by: str
    registered_at: str
    deployments: list[DeploymentSummary]


class EnvironmentReached(BaseModel):
    application: str
    environment: str
    version: str
    deployment_id: int
    requested_by: str
    approved_by: list[str] = Field(description="Who approved that deployment (restricted environments).")
    finished_at: str | None
    emergency: bool = Field(description="An emergency deployment: it skipped the freeze and the approval wait, "
                                        "and stays an open exception until someone else reviews it.")
    emergency_reason: str
    reviewed_by: str | None = Field(description="Who reviewed the emergency afterwards (None: not yet).")
    reviewed_at: str | None


class ChangeNow(BaseModel):
    application: str
    environment: str
    state: str = Field(description="deployed (a release carrying the change runs there now), awaiting_approval, "
                                   "queued or running (on its way there), replaced (it was there; another release "
                                   "runs there now) or not_reached.")
    version: str | None = Field(description="The release carrying the change that is there or on its way.")
    deployment_id: int | None
    since: str | None = Field(description="When it was deployed there (state deployed).")
    waiting_for: str = Field(description="What an open deployment waits for, e.g. 'approval (0 of 1)'.")
    current_version: str | None = Field(description="The version that runs in the environment now.")


class ChangeOut(BaseModel):
    issue_key: str
    builds: list[BuildOut]
    releases: list[ReleaseOut]
    environments_reached: list[EnvironmentReached]
    now: list[ChangeNow] = Field(description="Where the change is now, per environment in promotion order.")
    summary: str = Field(description="Where the change is now, in a sentence.")


@contextmanager
def unseen_as_missing(application: str):
    """A CI token's registration for an application outside its scope answers as one for an application
    that does not exist (404), so the token learns no application's name; the service's TOKEN_SCOPE
    refusal is in the audit chain all the same."""
    try:
        yield
    except PolicyRefusal as refused:
        if refused.refusal.code == policy.TOKEN_SCOPE:
            raise selectors.no_application(application) from None
        raise


@router.post("/builds", response={200: BuildOut, 201: BuildOut, **REFUSALS}, summary="Register or update a build",
             description="201 for a new build, 200 for a build in progress updated (its status, URL or tests) or the "
             "same report again; a finished build never changes (409 BUILD_FINISHED), and the same number for another "
             "commit or branch is another CI run (409 BUILD_CONFLICT). A CI token registers only for its applications "
             "(another application answers 404, as one that does not exist).")
def register_build(request: HttpRequest, body: BuildIn):
    with unseen_as_missing(body.application):
        build, created = services.build_register(
            actor=lambda: actor_of(request), alongside=(request.auth.lookup,), application=body.application,
            number=body.number, commit=body.commit, branch=body.branch, url=body.url, status=body.status,
            tests=None if body.tests is None else services.TestCounts(body.tests.passed, body.tests.failed,
                                                                      body.tests.skipped),
        )
    return Status(201 if created else 200, selectors.build_as_dict(build))


@router.get("/builds/{application}/{path:number}", response={200: BuildOut, **REFUSALS}, summary="One build")
def get_build(request: HttpRequest, application: ApplicationName, number: BuildNumber):
    return selectors.build_detail(application, number, within=lambda: readable(request),
                                  alongside=(request.auth.lookup,))


@router.post("/releases", response={200: ReleaseOut, 201: ReleaseOut, **REFUSALS}, summary="Register a release",
             description="Registers an immutable release cut from a build of the application. The build must be "
             "registered first (422 UNKNOWN_BUILD) and successful (422 BUILD_NOT_SUCCESSFUL). The same "
             "registration again answers 200 unchanged; the same version with other content answers 409 "
             "RELEASE_CONFLICT. A CI token registers only for its applications (another application answers "
             "404, as one that does not exist).")
def register_release(request: HttpRequest, body: ReleaseIn):
    pr = body.pull_request
    approved_at = pr.approved_at.isoformat() if pr and pr.approved_at else None
    with unseen_as_missing(body.application):
        release, created = services.release_register(
            actor=actor_of(request), application=body.application, version=body.version, build=body.build,
            artifact_url=body.artifact_url, artifact_sha256=body.artifact_sha256,
            issue_keys=body.issue_keys, implementers=body.implementers,
            pull_request=None if pr is None else services.PullRequest(pr.url, pr.author, tuple(pr.reviewers),
                                                                      approved_at),
        )
    return Status(201 if created else 200, selectors.release_detail_of(release))


@router.get("/releases/{application}/{path:version}", response={200: ReleaseOut, **REFUSALS},
            summary="A release and its deployments")
def get_release(request: HttpRequest, application: ApplicationName, version: Version):
    return selectors.release_detail(application, version, within=lambda: readable(request),
                                    alongside=(request.auth.lookup,))


@router.get("/changes/{issue_key}", response={200: ChangeOut, **REFUSALS},
            summary="One change from concept to deployment")
def get_change(request: HttpRequest, issue_key: Annotated[Text(64, 1), example("BIZPLAT-64951")]):
    return selectors.change_detail(issue_key, within=readable(request))
