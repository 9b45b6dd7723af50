"""The API contract of DESIGN.md, through real HTTP requests with real tokens."""

import datetime as dt
import gzip
import json
import re
import sys

import pytest

from access.models import ApiToken
from access.services import token_create, token_revoke
from audit.models import AuditEvent
from edge.api import SPACE
from environments.models import Deployment
from releases.models import Application, Build, Release
from tests.conftest import SYSTEM, person

SHA = "ab" * 32


class Api:
    def __init__(self, client, token):
        self.client, self.token = client, token

    def _headers(self):
        return {"HTTP_AUTHORIZATION": f"Bearer {self.token}"} if self.token else {}

    def post(self, path, body, raw=False):
        data = body if raw else json.dumps(body)
        return self.client.post(f"/api/v1{path}", data, content_type="application/json", **self._headers())

    def get(self, path):
        return self.client.get(f"/api/v1{path}", **self._headers())


@pytest.fixture
def ci(world, client):
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    return Api(client, raw)


def personal(world, client, user):
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name=user.username, user=user)
    return Api(client, raw)


BUILD = {"application": "MAC", "number": "101", "commit": "a1b2c3", "branch": "feature/BIZPLAT-64951-fx",
         "url": "https://ci.example.com/101", "status": "successful", "tests": {"passed": 12, "failed": 0}}
RELEASE = {"application": "MAC", "version": "3.1.0", "build": "101", "artifact_url": "file:///a/mac-3.1.0.tgz",
           "artifact_sha256": SHA, "issue_keys": ["BIZPLAT-64951"], "implementers": ["alice@example.com"],
           "pull_request": {"url": "https://vcs/pr/9", "author": "alice@example.com", "reviewers": ["erin"],
                            "approved_at": "2026-11-29T10:00:00Z"}}


def register(ci, version="3.1.0", build="101"):
    assert ci.post("/builds", {**BUILD, "number": build}).status_code == 201
    assert ci.post("/releases", {**RELEASE, "version": version, "build": build}).status_code == 201


def test_build_routes(ci):
    response = ci.post("/builds", {**BUILD, "status": "in_progress"})
    assert response.status_code == 201
    assert ci.post("/builds", {**BUILD, "status": "in_progress"}).status_code == 200
    assert ci.post("/builds", BUILD).status_code == 200
    conflict = ci.post("/builds", {**BUILD, "status": "failed"})
    assert conflict.status_code == 409 and conflict.json()["code"] == "BUILD_FINISHED"
    got = ci.get("/builds/MAC/101").json()
    assert (got["status"], got["tests"]) == ("successful", {"passed": 12, "failed": 0, "skipped": 0})
    assert ci.get("/builds/MAC/999").status_code == 404


def test_release_routes(ci):
    register(ci)
    assert ci.post("/releases", RELEASE).status_code == 200
    conflict = ci.post("/releases", {**RELEASE, "artifact_url": "file:///other"})
    assert conflict.status_code == 409 and conflict.json()["code"] == "RELEASE_CONFLICT"
    body = ci.get("/releases/MAC/3.1.0").json()
    assert body["artifact_sha256"] == SHA and body["issue_keys"] == ["BIZPLAT-64951"]
    assert body["pull_request"]["reviewers"] == ["erin"] and body["deployments"] == []
    assert ci.get("/releases/MAC/0.0.0").status_code == 404


def test_release_from_failed_build_is_422(ci):
    ci.post("/builds", {**BUILD, "status": "failed"})
    response = ci.post("/releases", RELEASE)
    assert response.status_code == 422
    assert response.json()["code"] == "BUILD_NOT_SUCCESSFUL"


def test_deployment_flow_with_ci_and_personal_tokens(world, client, ci):
    register(ci)
    qa = ci.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA"})
    assert qa.status_code == 201 and qa.json()["state"] == "running"  # QA was free: it started at once
    from environments import services

    for env_name in ("QA", "Staging"):
        if env_name == "Staging":
            staging = ci.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "Staging"})
            assert staging.status_code == 201
        deployment = Deployment.objects.get(environment__name=env_name)
        services.deployment_start(deployment_id=deployment.pk)
        services.deployment_record_result(deployment_id=deployment.pk, state="succeeded")

    refused = ci.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "Production"})
    assert refused.status_code == 403 and refused.json()["code"] == "CI_TOKEN_RESTRICTED"
    bob, carol = personal(world, client, world.bob), personal(world, client, world.carol)
    prod = bob.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "Production"})
    assert prod.status_code == 201 and prod.json()["state"] == "awaiting_approval"
    prod_id = prod.json()["id"]
    self_approval = bob.post(f"/deployments/{prod_id}/approve", {"comment": "me"})
    assert self_approval.status_code == 403 and self_approval.json()["code"] == "SOD_REQUESTER_APPROVER"
    ci_approval = ci.post(f"/deployments/{prod_id}/approve", {})
    assert ci_approval.status_code == 403 and ci_approval.json()["code"] == "CI_TOKEN_RESTRICTED"
    approved = carol.post(f"/deployments/{prod_id}/approve", {"comment": "checked evidence"})
    assert approved.status_code == 200
    body = approved.json()
    assert body["state"] == "running" and body["approvals"][0]["approver"] == "carol"
    assert ci.get(f"/deployments/{prod_id}").json()["requested_by"] == "bob"

    envs = ci.get("/applications/MAC/environments").json()
    assert [(e["name"], e["current_version"]) for e in envs] == [("QA", "3.1.0"), ("Staging", "3.1.0"),
                                                                 ("Production", None)]
    assert envs[2]["last_deployment"]["state"] == "running" and envs[2]["restricted"] is True
    assert envs[2]["queue"] == [{"id": prod_id, "version": "3.1.0", "state": "running", "position": 0,
                                 "waiting_for": "a deploy worker to take it up", "emergency": False,
                                 "requested_by": "bob"}]

    ci.post("/builds", {**BUILD, "number": "102", "branch": "bugfix/bizplat-64951-again", "status": "failed",
                        "tests": {"passed": 10, "failed": 2}})
    ci.post("/builds", {**BUILD, "number": "103", "branch": "feature/BIZPLAT-649510-other"})
    change = ci.get("/changes/bizplat-64951").json()
    assert [b["number"] for b in change["builds"]] == ["101", "102"]
    failed = change["builds"][1]
    assert (failed["status"], failed["tests"], failed["branch"], failed["commit"], failed["url"]) == (
        "failed", {"passed": 10, "failed": 2, "skipped": 0}, "bugfix/bizplat-64951-again", "a1b2c3",
        "https://ci.example.com/101")
    assert [r["version"] for r in change["releases"]] == ["3.1.0"]
    assert {e["environment"] for e in change["environments_reached"]} == {"QA", "Staging"}
    assert ci.get("/changes/BIZPLAT-1").status_code == 404


def test_busy_environment_answers_with_the_waiting_state_and_position(world, client, ci):
    register(ci)
    register(ci, version="3.2.0", build="102")
    alice = personal(world, client, world.alice)
    first = alice.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA"}).json()
    second = alice.post("/deployments", {"application": "MAC", "version": "3.2.0", "environment": "QA"})
    assert second.status_code == 201
    body = second.json()
    assert (body["state"], body["position"], body["waiting_for"]) == ("queued", 1, f"behind #{first['id']}")
    queue = ci.get("/applications/MAC/environments").json()[0]["queue"]
    assert [(e["id"], e["state"], e["position"]) for e in queue] == [(first["id"], "running", 0),
                                                                      (body["id"], "queued", 1)]
    assert ci.get(f"/deployments/{body['id']}").json()["waiting_for"] == f"behind #{first['id']}"


def test_a_release_registered_while_qa_is_frozen_is_queued_there_and_says_what_it_waits_for(world, ci):
    import datetime as dt

    from django.utils import timezone

    from environments.models import FreezeWindow

    world.qa.auto_deploy = True
    world.qa.save(update_fields=["auto_deploy"])
    now = timezone.now()
    window = FreezeWindow.objects.create(environment=world.qa, starts_at=now - dt.timedelta(minutes=1),
                                         ends_at=now + dt.timedelta(hours=3), reason="ledger migration")
    assert ci.post("/builds", {**BUILD, "number": "101"}).status_code == 201
    registered = ci.post("/releases", {**RELEASE, "version": "3.1.0", "build": "101"})
    assert registered.status_code == 201
    [deployment] = registered.json()["deployments"]
    until = window.ends_at.astimezone(dt.UTC)
    assert (deployment["environment"], deployment["state"]) == ("QA", "queued")
    assert ci.get(f"/deployments/{deployment['id']}").json()["waiting_for"] == (
        f"frozen until {until:%Y-%m-%d %H:%M} UTC (ledger migration)")
    qa, staging, _ = ci.get("/applications/MAC/environments").json()
    assert qa["frozen"] == {"until": until.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                            "reason": "ledger migration"}
    assert staging["frozen"] is None and [e["id"] for e in qa["queue"]] == [deployment["id"]]


def test_a_build_number_or_version_with_a_slash_is_read_back(ci):
    """CI servers name builds by job paths (a multibranch job's `folder/branch-7`): what registers reads back."""
    assert ci.post("/builds", {**BUILD, "number": "mac/main-7"}).status_code == 201
    assert ci.post("/releases", {**RELEASE, "version": "5.0.0/rc1", "build": "mac/main-7"}).status_code == 201
    assert ci.get("/builds/MAC/mac%2Fmain-7").json()["number"] == "mac/main-7"
    assert ci.get("/builds/MAC/mac/main-7").json()["number"] == "mac/main-7"
    assert ci.get("/releases/MAC/5.0.0%2Frc1").json()["build"] == "mac/main-7"


def test_a_retried_request_finds_the_open_deployment_in_the_refusal(world, client, ci):
    register(ci)
    alice = personal(world, client, world.alice)
    body = {"application": "MAC", "version": "3.1.0", "environment": "QA"}
    first = alice.post("/deployments", body).json()
    again = alice.post("/deployments", body)
    assert again.status_code == 409
    assert again.json() == {"code": "ALREADY_REQUESTED", "deployment_id": first["id"],
                            "detail": f"MAC 3.1.0 already has an open deployment to QA (#{first['id']})."}


def test_cancelling_a_running_deployment_answers_that_its_stop_is_asked_for(world, client, ci):
    register(ci)
    alice = personal(world, client, world.alice)
    running = alice.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA"}).json()
    assert (running["state"], running["cancel_requested_at"]) == ("running", None)
    assert running["queued_at"] == running["requested_at"]  # one moment: asked for, and queued at once
    cancelled = alice.post(f"/deployments/{running['id']}/cancel", {"comment": "wrong version"})
    assert cancelled.status_code == 200
    body = cancelled.json()
    assert body["state"] == "running" and body["cancel_requested_at"] is not None  # the engine stops it
    assert ci.get(f"/deployments/{running['id']}").json()["cancel_requested_at"] == body["cancel_requested_at"]


def test_an_artifact_url_the_playbook_cannot_fetch_is_refused_when_registered(ci):
    assert ci.post("/builds", {**BUILD, "number": "101"}).status_code == 201
    refused = ci.post("/releases", {**RELEASE, "version": "3.1.0", "build": "101", "artifact_url": "not a url"})
    assert refused.status_code == 422
    assert refused.json()["errors"] == [{"field": "artifact_url", "message": (
        "must be an http://, https://, ftp:// or file:// URL, or an absolute path on the worker")}]
    for n, url in enumerate(("https://artifacts.example.com/mac.tar.gz", "file:///srv/mac.tar.gz",
                             "/srv/mac-3.2.0.tar.gz ")):
        assert ci.post("/releases", {**RELEASE, "version": f"3.{n}.0", "build": "101", "artifact_url": url}
                       ).status_code == 201
    assert ci.get("/releases/MAC/3.2.0").json()["artifact_url"] == "/srv/mac-3.2.0.tar.gz"


def test_a_build_report_without_test_counts_keeps_the_counts_it_had(ci):
    body = {k: v for k, v in BUILD.items() if k != "tests"}
    assert ci.post("/builds", {**body, "number": "55", "status": "in_progress", "tests": {"passed": 3}}
                   ).status_code == 201
    assert ci.post("/builds", {**body, "number": "55", "status": "successful"}).status_code == 200
    assert ci.get("/builds/MAC/55").json()["tests"] == {"passed": 3, "failed": 0, "skipped": 0}
    assert ci.post("/builds", {**body, "number": "56"}).json()["tests"] == {"passed": 0, "failed": 0, "skipped": 0}


def test_a_change_is_found_by_its_branch_builds_before_any_release(ci):
    assert ci.post("/builds", {**BUILD, "number": "7", "branch": "BIZPLAT-77/fix", "status": "in_progress"}
                   ).status_code == 201
    change = ci.get("/changes/BIZPLAT-77")
    assert change.status_code == 200
    body = change.json()
    assert ([b["number"] for b in body["builds"]], body["releases"], body["environments_reached"]) == (["7"], [], [])
    assert body["builds"][0]["status"] == "in_progress"


def test_reject_and_cancel_routes(world, client, ci):
    register(ci)
    register(ci, version="3.2.0", build="102")
    ci.post("/deployments", {"application": "MAC", "version": "3.2.0", "environment": "QA"})
    first = ci.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA"}).json()
    assert first["state"] == "queued"
    cancelled = ci.post(f"/deployments/{first['id']}/cancel", {"comment": "oops"})
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = ci.post(f"/deployments/{first['id']}/cancel", {})
    assert again.status_code == 409 and again.json()["code"] == "NOT_CANCELLABLE"
    rejected = personal(world, client, world.carol).post(f"/deployments/{first['id']}/reject", {"comment": "x"})
    assert rejected.status_code == 409 and rejected.json()["code"] == "NOT_AWAITING_APPROVAL"
    assert ci.post("/deployments/424242/approve", {}).status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Bearer rp_" + "x" * 43, "Basic abc",
                                    "Bearer " + "rp_" + "y" * 5000])
def test_missing_or_bad_token_is_401(client, world, header):
    headers = {"HTTP_AUTHORIZATION": header} if header else {}
    response = client.post("/api/v1/builds", json.dumps(BUILD), content_type="application/json", **headers)
    assert response.status_code == 401 and response.json()["code"] == "UNAUTHENTICATED"
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_revoked_token_is_401_and_revocation_is_audited(world, client):
    token, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="gone", applications=[world.app])
    token_revoke(actor=SYSTEM, token=token)
    assert Api(client, raw).get("/builds/MAC/1").status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", object_id=str(token.pk)).exists()
    assert token.key_hash != raw and raw not in json.dumps([e.data for e in AuditEvent.objects.all()])


def test_personal_token_of_inactive_user_is_401(world, client):
    api = personal(world, client, world.bob)
    world.bob.is_active = False
    world.bob.save()
    assert api.get("/builds/MAC/1").status_code == 401


READS = ["/applications/MAC/environments", "/applications/NOPE/environments", "/releases/MAC/3.1.0",
         "/releases/MAC/0.0.0", "/builds/MAC/1", "/changes/BIZPLAT-64951", "/deployments/1"]


@pytest.mark.parametrize("who", ["unknown", "revoked", "inactive"])
def test_a_token_that_stands_for_nobody_reads_nothing_and_learns_nothing(world, client, who):
    """A token is looked up together with a read's own queries (edge.api.Bearer); whatever those find,
    the answer is the same 401 for what exists and for what does not, and a write is not attempted."""
    ci = Api(client, token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])[1])
    ci.post("/builds", BUILD)
    ci.post("/releases", RELEASE)
    if who == "unknown":
        raw = "rp_" + "x" * 43
    elif who == "revoked":
        token, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="gone", applications=[world.app])
        token_revoke(actor=SYSTEM, token=token)
    else:
        raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="bob", user=world.bob)[1]
        world.bob.is_active = False
        world.bob.save()
    nobody = Api(client, raw)
    assert ci.get("/releases/MAC/3.1.0").status_code == 200
    answers = [nobody.get(path) for path in READS]
    answers += [nobody.post("/builds", {**BUILD, "number": "99"}), nobody.post("/builds", {"number": 1})]
    assert [(a.status_code, a.json()) for a in answers] == [
        (401, {"code": "UNAUTHENTICATED",
               "detail": "A valid bearer token is required: Authorization: Bearer <token>."})] * len(answers)
    assert not Build.objects.filter(number="99").exists()


@pytest.mark.parametrize("body", [
    "{not json", "[]", "null", "42", '"text"', "{}",
    json.dumps({**BUILD, "number": 101}),
    json.dumps({**BUILD, "status": "exploded"}),
    json.dumps({**BUILD, "tests": {"passed": -1}}),
    json.dumps({**BUILD, "tests": {"passed": 10**30}}),
    json.dumps({**BUILD, "tests": "many"}),
    json.dumps({**BUILD, "commit": "a\u0000b"}),
    json.dumps({**BUILD, "branch": "x" * 5000}),
    json.dumps({**BUILD, "application": ""}),
    "\ud800".encode("utf-8", "surrogatepass"),
    b"\xff\xfe garbage",
])
def test_bad_build_bodies_are_4xx_never_500(ci, body):
    response = ci.post("/builds", body, raw=True)
    assert 400 <= response.status_code < 500, response.content
    assert {"code", "detail"} <= set(response.json())


def test_invalid_body_names_the_field(ci):
    response = ci.post("/builds", {**BUILD, "status": "exploded"})
    assert response.status_code == 422
    assert response.json()["code"] == "INVALID" and "status" in response.json()["detail"]


@pytest.mark.parametrize(("patch", "field"), [
    ({"artifact_sha256": "xyz"}, "artifact_sha256"), ({"artifact_sha256": "a" * 65}, "artifact_sha256"),
    ({"issue_keys": ["not a key"]}, "issue_keys.0"), ({"issue_keys": "BIZPLAT-1"}, "issue_keys"),
    ({"implementers": [None]}, "implementers.0"), ({"pull_request": {"url": "u"}}, "pull_request.author"),
    ({"pull_request": {"url": "u", "author": "a", "approved_at": "yesterday"}}, "pull_request.approved_at"),
    ({"version": ""}, "version"),
])
def test_bad_release_bodies_are_422_naming_the_field(ci, patch, field):
    ci.post("/builds", BUILD)
    response = ci.post("/releases", {**RELEASE, **patch})
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["code"] == "INVALID" and field in [e["field"] for e in body["errors"]], body
    assert not Release.objects.exists()


def test_an_application_without_environments_answers_an_empty_list(world, client):
    bare = Application.objects.create(name="BARE", issue_key_prefix="BARE")
    reader = Api(client, token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="bare", applications=[bare])[1])
    response = reader.get("/applications/BARE/environments")
    assert (response.status_code, response.json()) == (200, [])
    response = reader.get("/applications/MAC/environments")  # MAC has environments, but not for this token
    assert (response.status_code, response.json()["detail"]) == (404, "No application named 'MAC'.")


def test_unknown_application_is_404(ci):
    assert ci.post("/builds", {**BUILD, "application": "NOPE"}).status_code == 404
    assert ci.get("/applications/NOPE/environments").status_code == 404
    response = ci.post("/deployments", {"application": "NOPE", "version": "1", "environment": "QA"})
    assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"


def test_oversize_body_is_413(ci):
    response = ci.post("/builds", {**BUILD, "url": "x" * 400_000})
    assert response.status_code == 413 and response.json()["code"] == "TOO_LARGE"


@pytest.mark.parametrize("path", ["/deployments/99999999999999999999999", "/deployments/-1",
                                  "/releases/MAC/%00", "/changes/%00", "/builds/MAC/%00"])
def test_odd_paths_are_4xx(ci, path):
    assert 400 <= ci.get(path).status_code < 500


def test_openapi_lists_every_contract_route(client):
    schema = client.get("/api/v1/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/api/v1/builds", "/api/v1/builds/{application}/{number}", "/api/v1/releases",
            "/api/v1/releases/{application}/{version}", "/api/v1/deployments",
            "/api/v1/deployments/{deployment_id}", "/api/v1/deployments/{deployment_id}/approve",
            "/api/v1/deployments/{deployment_id}/reject", "/api/v1/deployments/{deployment_id}/cancel",
            "/api/v1/changes/{issue_key}", "/api/v1/applications/{application}/environments"} <= paths
    assert client.get("/api/v1/docs").status_code == 200


def test_a_revoked_tokens_waiting_requests_never_start(world, client, ci):
    register(ci)
    register(ci, version="3.2.0", build="102")
    ci.post("/deployments", {"application": "MAC", "version": "3.2.0", "environment": "QA"})
    token, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="script", user=world.alice)
    waiting = Api(client, raw).post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA"})
    assert waiting.json()["state"] == "queued"
    token_revoke(actor=person(world.carol), token=token)
    body = ci.get(f"/deployments/{waiting.json()['id']}").json()
    assert (body["state"], body["refusal_code"]) == ("refused", "TOKEN_REVOKED")
    event = AuditEvent.objects.get(action="deployment.refused", object_id=str(waiting.json()["id"]))
    assert (event.code, event.actor_username) == ("TOKEN_REVOKED", "carol")


def invalid_field(response, field):
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["code"] == "INVALID" and field in [e["field"] for e in body["errors"]], body
    assert field in body["detail"]
    return body


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/releases", {**RELEASE, "issueKeys": ["BIZPLAT-1"]}, "issueKeys"),  # camelCase: the keys would be lost
    ("/releases", {**RELEASE, "pull_request": {**RELEASE["pull_request"], "approvedAt": "x"}},
     "pull_request.approvedAt"),
    ("/builds", {**BUILD, "tests": {"passed": 10, "failures": 3}}, "tests.failures"),
    ("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "QA", "emergency": True}, "emergency"),
])
def test_a_field_the_api_does_not_know_is_422_not_dropped(ci, path, body, field):
    """A misspelt field is refused by name: dropped, it would leave a registration that can never be
    corrected (the same registration again with the field right is a conflict)."""
    if path != "/builds":
        ci.post("/builds", BUILD)
    answer = invalid_field(ci.post(path, body), field)
    assert "Extra inputs are not permitted" in answer["detail"]


@pytest.mark.parametrize("count", ["5", True, 5.5])
def test_test_counts_are_json_numbers(ci, count):
    invalid_field(ci.post("/builds", {**BUILD, "tests": {"passed": count}}), "tests.passed")
    assert ci.post("/builds", {**BUILD, "tests": {"passed": 5.0}}).json()["tests"]["passed"] == 5  # JSON's 5


def test_a_body_that_is_no_object_says_so_in_json_terms(ci):
    answer = invalid_field(ci.post("/builds", [BUILD]), "body")
    assert answer["errors"][0]["message"] == "Input should be a JSON object"
    date = invalid_field(ci.post("/releases", {**RELEASE, "pull_request": {**RELEASE["pull_request"],
                                                                           "approved_at": "yesterday"}}),
                         "pull_request.approved_at")
    assert date["errors"][0]["message"].startswith("must be an RFC 3339 date-time")


def test_a_commit_hash_in_either_case_is_the_same_build(ci):
    assert ci.post("/builds", {**BUILD, "commit": "c0ffee01"}).status_code == 201
    again = ci.post("/builds", {**BUILD, "commit": "C0FFEE01"})
    assert again.status_code == 200 and again.json()["commit"] == "c0ffee01"
    assert ci.post("/builds", {**BUILD, "commit": "c0ffee02"}).json()["code"] == "BUILD_CONFLICT"


def test_a_jenkins_build_tag_fits_the_build_number(ci):
    tag = "jenkins-acme-platform-mac-service-feature%2FBIZPLAT-64951-rounding-fix-for-month-end-close-128"
    assert ci.post("/builds", {**BUILD, "number": tag}).status_code == 201
    assert ci.get(f"/builds/MAC/{tag.replace('%', '%25')}").json()["number"] == tag
    invalid_field(ci.post("/builds", {**BUILD, "number": "9" * 256}), "number")


@pytest.mark.parametrize("approved_at", [
    "0001-01-01T00:00:00+05:00", "0001-01-01T00:00:00-05:00", "9999-12-31T23:59:59-05:00",
    "9999-12-31T23:59:59+05:00", "1999-12-31T23:59:59Z", "2100-01-01T00:00:00Z", "2026-11-29T10:00:00",
    "2026-02-30T10:00:00Z", "1700000000",
])
def test_pull_request_dates_out_of_range_are_422_naming_the_field(ci, approved_at):
    ci.post("/builds", BUILD)
    pull_request = {**RELEASE["pull_request"], "approved_at": approved_at}
    invalid_field(ci.post("/releases", {**RELEASE, "pull_request": pull_request}), "pull_request.approved_at")
    assert not Release.objects.exists()


def test_pull_request_dates_inside_the_range_keep_their_instant(ci):
    ci.post("/builds", BUILD)
    pull_request = {**RELEASE["pull_request"], "approved_at": "2000-01-01T00:30:00+01:00"}
    assert ci.post("/releases", {**RELEASE, "pull_request": pull_request}).status_code == 201
    assert ci.get("/releases/MAC/3.1.0").json()["pull_request"]["approved_at"] == "1999-12-31T23:30:00.000000Z"



def test_a_retry_writing_the_approval_time_in_another_time_zone_is_the_same_registration(ci):
    register(ci)
    retried = {**RELEASE["pull_request"], "approved_at": "2026-11-29T11:00:00+01:00"}  # 10:00Z, as registered
    assert ci.post("/releases", {**RELEASE, "pull_request": retried}).status_code == 200
    later = {**RELEASE["pull_request"], "approved_at": "2026-11-29T11:00:00Z"}
    conflict = ci.post("/releases", {**RELEASE, "pull_request": later})
    assert conflict.status_code == 409 and "differs in pull_request.approved_at" in conflict.json()["detail"]


@pytest.mark.parametrize("offset", ["+23:00", "-16:00"])
def test_an_offset_beyond_what_the_database_takes_is_still_an_instant(ci, offset):
    """RFC 3339 allows offsets up to 23:59; PostgreSQL stores none beyond 15:59: the API keeps the instant."""
    ci.post("/builds", BUILD)
    pull_request = {**RELEASE["pull_request"], "approved_at": f"2026-11-29T10:00:00{offset}"}
    assert ci.post("/releases", {**RELEASE, "pull_request": pull_request}).status_code == 201
    hours = int(offset[:3])
    expected = dt.datetime(2026, 11, 29, 10, tzinfo=dt.UTC) - dt.timedelta(hours=hours)
    assert ci.get("/releases/MAC/3.1.0").json()["pull_request"]["approved_at"] == expected.strftime(
        "%Y-%m-%dT%H:%M:%S.000000Z")


def test_issue_keys_are_stripped_of_whitespace_around_them(ci):
    ci.post("/builds", BUILD)
    keys = [" bizplat-7 ", "BIZPLAT-8\t", "BIZPLAT-7"]
    assert ci.post("/releases", {**RELEASE, "issue_keys": keys}).status_code == 201
    assert ci.get("/releases/MAC/3.1.0").json()["issue_keys"] == ["BIZPLAT-7", "BIZPLAT-8"]
    invalid_field(ci.post("/releases", {**RELEASE, "version": "3.1.1", "issue_keys": ["BIZPLAT 7"]}), "issue_keys.0")


def test_more_than_one_space_after_the_bearer_scheme(world, client, ci):
    """RFC 7235 allows one or more spaces between the scheme and the credentials."""
    response = client.get("/api/v1/builds/MAC/1", HTTP_AUTHORIZATION=f"Bearer   {ci.token}")
    assert response.status_code == 404 and response.json()["code"] == "NOT_FOUND"
    for header in (f"Bearer \t{ci.token}", f"Bearer {ci.token}\x85", f"Bearer {ci.token} "):  # spaces only, before
        assert client.get("/api/v1/builds/MAC/1", HTTP_AUTHORIZATION=header).status_code == 401, repr(header)


@pytest.mark.parametrize(("patch", "field"), [
    ({"issue_keys": ["ß" * 30 + "-1"]}, "issue_keys.0"),
    ({"issue_keys": ["BİZPLAT-1"]}, "issue_keys.0"),
    ({"implementers": ["alice@example.com", "İ" * 200]}, "implementers.1"),
    ({"pull_request": {**RELEASE["pull_request"], "author": "İ" * 254}}, "pull_request.author"),
    ({"pull_request": {**RELEASE["pull_request"], "reviewers": ["erin", "x" * 253 + "İ"]}},
     "pull_request.reviewers.1"),
])
def test_values_that_grow_when_case_mapped_are_422_naming_the_field(ci, patch, field):
    ci.post("/builds", BUILD)
    body = invalid_field(ci.post("/releases", {**RELEASE, **patch}), field)
    assert "once lower-cased" in body["detail"] or "PROJECT-123" in body["detail"]
    assert not Release.objects.exists()

@pytest.mark.parametrize(("patch", "field"), [
    ({"implementers": ["bob@example.com\u200b"]}, "implementers.0"),  # looks like bob, matches nobody
    ({"implementers": ["alice@example.com", "\u2066bob\u2069"]}, "implementers.1"),
    ({"implementers": ["m@x", "z;a@x"]}, "implementers.1"),  # the reports join lists with ';'
    ({"pull_request": {**RELEASE["pull_request"], "author": "\ufeffalice"}}, "pull_request.author"),
    ({"pull_request": {**RELEASE["pull_request"], "reviewers": ["erin;bob"]}}, "pull_request.reviewers.0"),
])
def test_identities_with_invisible_characters_or_a_list_separator_are_422(ci, patch, field):
    """Separation of duties matches implementers by what a person reads: an identity that shows the
    same letters as bob's must be bob's, or be refused."""
    ci.post("/builds", BUILD)
    body = invalid_field(ci.post("/releases", {**RELEASE, **patch}), field)
    assert "invisible formatting characters" in body["detail"]
    assert not Release.objects.exists()



def test_identities_that_fit_once_lower_cased_are_stored_lower_case(ci):
    ci.post("/builds", BUILD)
    identity = "İ" * 127
    response = ci.post("/releases", {**RELEASE, "implementers": [identity]})
    assert response.status_code == 201 and response.json()["implementers"] == [identity.lower()]


@pytest.mark.parametrize("value", ["   ", "\t\u3000\u2028", "a\x00b"])
def test_blank_text_and_nul_are_422(ci, value):
    invalid_field(ci.post("/builds", {**BUILD, "commit": value}), "commit")


def test_surrounding_whitespace_is_stripped(ci):
    assert ci.post("/builds", {**BUILD, "application": " MAC\u3000", "number": "\t7 "}).status_code == 201
    assert ci.get("/builds/MAC/7").json()["number"] == "7"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("get", "/deployments/abc", 422), ("get", "/deployments/0", 422), ("get", "/deployments/9223372036854775808", 422),
    ("post", "/deployments/abc/approve", 422), ("post", "/deployments/1.5/cancel", 422),
    ("get", "/deployments/9223372036854775807", 404), ("get", "/no/such/route", 404),
    ("get", "/builds/MAC/a%2Fb", 404), ("get", "/releases/MAC/", 404),
])
def test_malformed_ids_and_unknown_paths_answer_json(ci, method, path, status):
    response = getattr(ci, method)(path) if method == "get" else ci.post(path, {})
    assert response.status_code == status and response["Content-Type"].startswith("application/json"), response.content
    assert {"code", "detail"} <= set(response.json())
    if status == 422:
        assert response.json()["errors"][0]["field"] == "deployment_id"


def test_head_answers_as_get_without_the_body(ci):
    ci.post("/builds", BUILD)
    got = ci.get("/builds/MAC/101")
    head = ci.client.head("/api/v1/builds/MAC/101", **ci._headers())
    assert (head.status_code, head.content, head["Content-Length"]) == (200, b"", str(len(got.content)))
    assert ci.client.head("/api/v1/builds/MAC/999", **ci._headers()).status_code == 404
    post_only = ci.client.head("/api/v1/builds", **ci._headers())
    assert (post_only.status_code, post_only["Allow"]) == (405, "POST")


def test_a_trailing_slash_is_named_as_the_reason_of_a_404(ci):
    answer = ci.post("/builds/", BUILD)
    assert answer.status_code == 404 and "end without a slash (/api/v1/builds)" in answer.json()["detail"]


def test_a_name_twice_in_one_object_or_nan_is_no_json_the_api_reads(ci):
    twice = ci.post("/builds", '{"application": "MAC", "number": "7", "commit": "c", "branch": "b", '
                               '"status": "successful", "status": "in_progress"}', raw=True)
    assert twice.status_code == 400 and twice.json() == {
        "code": "INVALID_JSON", "detail": "The request body names 'status' twice in one object; each name once."}
    nan = ci.post("/builds", '{"application": "MAC", "number": "7", "commit": "c", "branch": "b", '
                             '"status": "successful", "tests": {"passed": NaN}}', raw=True)
    assert nan.status_code == 400 and nan.json()["code"] == "INVALID_JSON"
    assert not Build.objects.exists()


def test_a_compressed_body_is_refused_by_name(ci):
    """A client that compresses its body is told so, not that its JSON is broken."""
    body = gzip.compress(json.dumps(BUILD).encode())
    for header, value in (("HTTP_CONTENT_ENCODING", "gzip"), ("HTTP_TRANSFER_ENCODING", "gzip, chunked")):
        answer = ci.client.post("/api/v1/builds", body, content_type="application/json", **{header: value},
                                **ci._headers())
        name = header.removeprefix("HTTP_").replace("_", "-").title()
        assert answer.status_code == 415 and answer.json() == {"code": "UNSUPPORTED_ENCODING", "detail": (
            f"The request body is sent compressed ({name}: {value}): send it as plain JSON (chunked or with a "
            "length).")}
    plain = ci.client.post("/api/v1/builds", json.dumps(BUILD), content_type="application/json",
                           HTTP_CONTENT_ENCODING="identity", **ci._headers())
    assert plain.status_code == 201 and Build.objects.count() == 1


def test_unsupported_method_answers_json_with_allow(ci):
    response = ci.client.put("/api/v1/builds", "{}", content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {ci.token}")
    assert response.status_code == 405 and response["Allow"] == "POST"
    assert response.json()["code"] == "METHOD_NOT_ALLOWED"


def test_bad_json_and_oversize_bodies_answer_json(ci):
    bad = ci.post("/builds", "{not json", raw=True)
    assert bad.status_code == 400 and bad.json()["code"] == "INVALID_JSON"
    big = ci.post("/releases", {**RELEASE, "artifact_url": "x" * 400_000})
    assert big.status_code == 413 and big.json()["code"] == "TOO_LARGE"


def test_openapi_documents_every_answer_and_input_rule(client):
    schema = client.get("/api/v1/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path == "/api/v1/health":  # reads nothing a client sends: up or not
                assert set(operation["responses"]) == {"200", "503"}
                continue
            assert {"400", "401", "403", "404", "409", "413", "422", "503"} <= set(operation["responses"]), (
                method, path)
    components = schema["components"]["schemas"]
    build = components["BuildIn"]["properties"]
    assert "NUL characters are refused" in build["commit"]["description"]
    assert "whitespace is stripped" in build["commit"]["description"]
    assert "UNKNOWN_BUILD" in schema["paths"]["/api/v1/releases"]["post"]["description"]
    approved_at = components["PullRequestIn"]["properties"]["approved_at"]["anyOf"][0]
    assert approved_at["format"] == "date-time" and "2000" in approved_at["description"]
    assert "errors" in components["Invalid"]["properties"]
    author = components["PullRequestIn"]["properties"]["author"]
    assert "once lower-cased" in author["description"]


def test_the_documented_whitespace_is_what_stripping_removes():
    space = re.compile(f"[{SPACE}]")
    assert [c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace() != bool(space.fullmatch(c))] == []


@pytest.fixture
def other_application(world):
    """HAMS, with a build, a release carrying BIZPLAT-64951 too, and a succeeded QA deployment."""
    from environments import services
    from environments.models import Environment
    from releases.models import Application
    from releases.services import build_register, release_register

    hams = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    qa = Environment.objects.create(application=hams, name="QA")
    build_register(actor=SYSTEM, application="HAMS", number="7", commit="beef" * 10, branch="feature/HAMS-5-x",
                   url="https://ci/7", status="successful")
    release, _ = release_register(actor=SYSTEM, application="HAMS", version="9.9.9", build="7",
                                  artifact_url="file:///a/hams.tgz", artifact_sha256=SHA,
                                  issue_keys=["HAMS-5", "BIZPLAT-64951"], implementers=["zed@example.com"])
    deployment = services.deployment_request(actor=SYSTEM, release=release, environment=qa)
    services.deployment_start(deployment_id=deployment.pk)
    services.deployment_record_result(deployment_id=deployment.pk, state="succeeded")
    return deployment


def test_ci_token_reads_only_its_applications(world, client, ci, other_application):
    """Another application's data answers exactly like data that does not exist: 404, nothing leaked."""
    register(ci)
    hams_ci = Api(client, token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="hams",
                                       applications=[other_application.release.application])[1])
    hidden = {
        "/builds/HAMS/7": "HAMS has no build '7'.",
        "/releases/HAMS/9.9.9": "HAMS has no release '9.9.9'.",
        f"/deployments/{other_application.pk}": f"No deployment #{other_application.pk}.",
        "/applications/HAMS/environments": "No application named 'HAMS'.",
        "/changes/HAMS-5": "No build or release carries HAMS-5.",
    }
    for path, detail in hidden.items():
        response = ci.get(path)
        assert (response.status_code, response.json()) == (404, {"code": "NOT_FOUND", "detail": detail}), path
        assert hams_ci.get(path).status_code == 200, path

    shared = ci.get("/changes/BIZPLAT-64951").json()  # the key is on a release of each application
    assert [r["application"] for r in shared["releases"]] == ["MAC"]
    assert {b["application"] for b in shared["builds"]} == {"MAC"}
    assert hams_ci.get("/changes/BIZPLAT-64951").json()["releases"][0]["application"] == "HAMS"


    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200
    page = docs.content.decode()
    assert "/static/ninja/swagger-ui-bundle.js" in page and "cdn" not in page.lower()  # works offline
