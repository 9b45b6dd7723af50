from __future__ import annotations

import datetime as dt

from django.http import HttpRequest
from django.utils import timezone
from ninja import Field, Query, Router, Schema, Status
from pydantic import BaseModel

from edge.api import REFUSALS, ApplicationName, Day, Name, ObjectId, Text, actor_of, readable, sent
from environments import metrics, selectors, services
from releases import selectors as release_selectors

router = Router(tags=["deployments"])


class DeploymentIn(BaseModel):
    model_config = sent({"application": "MAC", "version": "3.1.0", "environment": "QA"})

    application: Name
    version: Text(100, 1)
    environment: Name
    emergency_reason: Text(2000) = ""


class DecisionIn(BaseModel):
    model_config = sent({"comment": "Change tickets and test results checked."})

    comment: Text(2000) = ""


class ApprovalOut(BaseModel):
    approver: str
    decision: str
    comment: str
    decided_at: str


class DeploymentOut(BaseModel):
    id: int
    application: str
    version: str
    environment: str
    state: str = Field(description="Open: awaiting_approval, queued, running. Final: succeeded, failed, cancelled, "
                       "rejected, interrupted (its worker died), superseded (a newer automatic deployment took its "
                       "place in the queue), refused (a rule asked again at the front of the queue said no: "
                       "refusal_code). Poll until the state is final.")
    requested_by: str
    requested_at: str | None
    cancel_requested_at: str | None = Field(description="When a cancel of the running deployment was asked for: "
                                            "its playbook is being stopped, and it ends cancelled.")
    expires_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    emergency: bool
    emergency_reason: str
    approvals: list[ApprovalOut]
    required_approvals: int
    result: str
    refusal_code: str
    superseded_by: int | None
    position: int | None = Field(None, description="Place in the environment's queue: 0 running, 1 next, ...")
    waiting_for: str = Field("", description="Why it waits, e.g. 'behind #412', 'frozen until ...'")
    progress: dict


class LastDeployment(BaseModel):
    id: int
    version: str
    state: str
    requested_at: str | None
    finished_at: str | None


class QueueEntry(BaseModel):
    id: int
    version: str
    state: str
    position: int | None
    waiting_for: str
    emergency: bool
    requested_by: str


class FreezeNow(BaseModel):
    until: str
    reason: str


class EnvironmentStatus(BaseModel):
    name: str
    restricted: bool
    promotes_from: str | None
    current_version: str | None
    last_deployment: LastDeployment | None
    frozen: FreezeNow | None = Field(description="The freeze holding the environment now, if any: a request is "
                                     "refused (409 FREEZE_WINDOW) but an emergency; the portal's own automatic "
                                     "deployments wait in the queue until it ends.")
    queue: list[QueueEntry] = Field(description="Open deployments in order: running, waiting, awaiting approval")


@router.post("/deployments", response={201: DeploymentOut, **REFUSALS}, summary="Request a deployment")
def request_deployment(request: HttpRequest, body: DeploymentIn):
    # A release of an application the token may not see answers as one that does not exist.
    release = release_selectors.release_get(body.application, body.version, details=False, within=readable(request))
    environment = selectors.environment_get(body.application, body.environment)
    deployment = services.deployment_request(
        actor=actor_of(request), release=release, environment=environment, emergency_reason=body.emergency_reason
    )
    return Status(201, selectors.deployment_as_dict(selectors.deployment_get(deployment.pk)))


@router.get("/deployments/{deployment_id}", response={200: DeploymentOut, **REFUSALS},
            summary="A deployment: state, approvals, times, result, progress")
def get_deployment(request: HttpRequest, deployment_id: ObjectId):
    return selectors.deployment_as_dict(selectors.deployment_get(deployment_id, within=readable(request)))


def _decision(service):
    def view(request: HttpRequest, deployment_id: ObjectId, body: DecisionIn):
        if (within := readable(request)) is not None:  # one the token may not see is not there for it
            selectors.deployment_get(deployment_id, within=within)
        service(actor=actor_of(request), deployment_id=deployment_id, comment=body.comment)
        return selectors.deployment_as_dict(selectors.deployment_get(deployment_id))

    view.__name__ = service.__name__.replace("deployment_", "") + "_deployment"
    return view


for verb, service in (("approve", services.deployment_approve), ("reject", services.deployment_reject),
                      ("cancel", services.deployment_cancel)):
    router.post(f"/deployments/{{deployment_id}}/{verb}", response={200: DeploymentOut, **REFUSALS},
                summary=f"{verb.capitalize()} a deployment")(_decision(service))


@router.get("/applications/{application}/environments", response={200: list[EnvironmentStatus], **REFUSALS},
            summary="What is deployed where")
def application_environments(request: HttpRequest, application: ApplicationName):
    app = release_selectors.application_read(application)
    rows = selectors.application_environments(application, alongside=(request.auth.lookup, app))
    release_selectors.application_of(app, application, within=readable(request))  # 404 unless the reader may see it
    return rows


class MetricsQuery(Schema):
    since: Day | None = Field(None, description="First day; the period starts on the Monday of its ISO week.")
    until: Day | None = Field(None, description="Last day (default today); the period ends with its ISO week. "
                              "Before `since`, the two days are taken the other way round; the answer's `since` and "
                              "`until` say the period measured (at most its latest 157 weeks).")
    weeks: int = Field(metrics.DEFAULT_WEEKS, ge=1, le=metrics.MAX_WEEKS,
                       description="Without `since`: this many ISO weeks up to `until`.")
    environment: Name | None = Field(None, description="One environment (default: all of the application's).")


class MetricsWeek(BaseModel):
    week: str = Field(description="ISO week, e.g. 2026-W11, or 'total' for the whole period")
    starts_on: dt.date | None = Field(description="The week's Monday (none for the total)")
    deployments_succeeded: int
    deployments_failed: int
    deployment_frequency: int = Field(description="Succeeded deployments (in the week they finished)")
    change_failure_rate: float | None = Field(description="failed / (succeeded + failed); none without any")
    emergency_deployments: int
    emergency_share: float | None = Field(description="Emergency deployments among succeeded + failed")
    changes: int = Field(description="Changes (issue keys) that reached the environment for the first time")
    lead_time_seconds: int | None = Field(description="Average, first successful build of a change to its arrival")
    failures: int = Field(description="Failed deployments that began an outage (the first of a run of failures)")
    restored: int
    time_to_restore_seconds: int | None = Field(description="Average, a failure to the next succeeded deployment")
    approval_decisions: int
    approval_wait_seconds: int | None = Field(description="Average, request to the deciding approval or rejection")


class EnvironmentMetricsOut(BaseModel):
    environment: str
    restricted: bool
    weeks: list[MetricsWeek]
    total: MetricsWeek


class MetricsOut(BaseModel):
    application: str
    since: dt.date = Field(description="The first Monday of the period")
    until: dt.date = Field(description="The last day of the period (a Sunday)")
    environments: list[EnvironmentMetricsOut]


@router.get("/applications/{application}/metrics", response={200: MetricsOut, **REFUSALS},
            summary="Delivery metrics per environment and ISO week")
def application_metrics(request: HttpRequest, application: ApplicationName, query: Query[MetricsQuery]):
    """Deployment frequency, lead time for changes, change failure rate, time to restore, approval wait
    and emergency share, per environment and ISO week (durations in seconds). A CI token reads only
    the applications it is scoped to (another one is not found)."""
    app = release_selectors.application_get(application, within=readable(request))
    until = query.until or timezone.now().date()
    if query.since is not None:
        period = metrics.MetricsPeriod.covering(query.since, until)
    else:
        period = metrics.MetricsPeriod.last_weeks(query.weeks, today=until)
    environment = selectors.environment_get(app.name, query.environment) if query.environment else None
    found = metrics.delivery_metrics(app, period=period, environment=environment)
    return {"application": app.name, "since": period.first_monday, "until": period.last_day,
            "environments": [m.as_dict() for m in found]}
