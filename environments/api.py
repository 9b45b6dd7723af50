from __future__ import annotations

from django.http import HttpRequest
from ninja import Router, Schema, Status
from pydantic import BaseModel

from environments import selectors, services
from portal.api_common import REFUSALS, Name, Text, actor_of, readable
from releases import selectors as release_selectors
from releases.services import application_get

router = Router(tags=["deployments"])


class DeploymentIn(BaseModel):
    application: Name
    version: Text(100, 1)
    environment: Name
    emergency_reason: Text(2000) = ""


class DecisionIn(BaseModel):
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
    progress: dict


class LastDeployment(Schema):
    id: int
    version: str
    state: str
    requested_at: str | None
    finished_at: str | None


class EnvironmentStatus(Schema):
    name: str
    restricted: bool
    promotes_from: str | None
    current_version: str | None
    last_deployment: LastDeployment | None


@router.post("/deployments", response={201: DeploymentOut, **REFUSALS}, summary="Request a deployment")
def request_deployment(request: HttpRequest, body: DeploymentIn):
    release = release_selectors.release_get(body.application, body.version, details=False)
    environment = selectors.environment_get(body.application, body.environment)
    deployment = services.deployment_request(
        actor=actor_of(request), release=release, environment=environment, emergency_reason=body.emergency_reason
    )
    return Status(201, selectors.deployment_as_dict(selectors.deployment_get(deployment.pk)))


@router.get("/deployments/{int:deployment_id}", response={200: DeploymentOut, **REFUSALS},
            summary="A deployment: state, approvals, times, result, progress")
def get_deployment(request: HttpRequest, deployment_id: int):
    return selectors.deployment_as_dict(selectors.deployment_get(deployment_id, within=readable(request)))


def _decision(service):
    def view(request: HttpRequest, deployment_id: int, body: DecisionIn):
        service(actor=actor_of(request), deployment_id=deployment_id, comment=body.comment)
        return selectors.deployment_as_dict(selectors.deployment_get(deployment_id))

    view.__name__ = service.__name__.replace("deployment_", "") + "_deployment"
    return view


for verb, service in (("approve", services.deployment_approve), ("reject", services.deployment_reject),
                      ("cancel", services.deployment_cancel)):
    router.post(f"/deployments/{{int:deployment_id}}/{verb}", response={200: DeploymentOut, **REFUSALS},
                summary=f"{verb.capitalize()} a deployment")(_decision(service))


@router.get("/applications/{application}/environments", response={200: list[EnvironmentStatus], **REFUSALS},
            summary="What is deployed where")
def application_environments(request: HttpRequest, application: Name):
    return selectors.application_environments(application_get(application, within=readable(request)))
