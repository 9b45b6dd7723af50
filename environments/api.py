from __future__ import annotations

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status
from pydantic import BaseModel, ConfigDict

from edge.api import REFUSALS, ApplicationName, Name, ObjectId, Text, actor_of, readable
from environments import selectors, services
from releases import selectors as release_selectors

router = Router(tags=["deployments"])


class DeploymentIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"application": "MAC", "version": "3.1.0", "environment": "QA"}]})

    application: Name
    version: Text(100, 1)
    environment: Name
    emergency_reason: Text(2000) = ""


class DecisionIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"comment": "Change tickets and test results checked."}]})

    comment: Text(2000) = ""


class ApprovalOut(Schema):
    approver: str
    decision: str
    comment: str
    decided_at: str


class DeploymentOut(Schema):
    id: int
    application: str
    version: str
    environment: str
    state: str
    requested_by: str
    requested_at: str | None
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


class LastDeployment(Schema):
    id: int
    version: str
    state: str
    requested_at: str | None
    finished_at: str | None


class QueueEntry(Schema):
    id: int
    version: str
    state: str
    position: int | None
    waiting_for: str
    emergency: bool
    requested_by: str


class EnvironmentStatus(Schema):
    name: str
    restricted: bool
    promotes_from: str | None
    current_version: str | None
    last_deployment: LastDeployment | None
    queue: list[QueueEntry] = Field(description="Open deployments in order: running, waiting, awaiting approval")


@router.post("/deployments", response={201: DeploymentOut, **REFUSALS}, summary="Request a deployment")
def request_deployment(request: HttpRequest, body: DeploymentIn):
    release = release_selectors.release_get(body.application, body.version, details=False)
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
    app = release_selectors.application_get(application, within=readable(request))
    return selectors.application_environments(app)
