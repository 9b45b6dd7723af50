"""Continuous deployment end to end over HTTP: a real server, a real worker, CI registering three
releases back to back. The last one reaches Staging with no human action; nothing is dropped."""

import hashlib

import requests

from access.models import ApiToken
from access.services import token_create
from audit import chain
from audit.models import AuditEvent
from environments.models import Deployment
from environments.services import environment_save
from tests.conftest import SYSTEM
from tests.deploy.conftest import state_of, wait_for

FINAL = {"succeeded", "superseded"}


def test_three_releases_back_to_back_reach_staging_by_themselves(
    transactional_audit_db, server, world, deploy_dirs, artifact, worker_factory
):
    for environment in (world.qa, world.staging):
        environment.auto_deploy = True
        environment_save(actor=SYSTEM, environment=environment, changed=["auto_deploy"])
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {raw}"
    worker_factory()

    versions = ["9.0.0", "9.1.0", "9.2.0"]
    for number, version in enumerate(versions, start=1):
        url, sha = artifact(version)
        build = {"application": "MAC", "number": str(number), "commit": hashlib.sha1(version.encode()).hexdigest(),
                 "branch": f"feature/BIZPLAT-{number}-x", "url": f"https://ci.example.com/{number}",
                 "status": "successful", "tests": {"passed": 3, "failed": 0, "skipped": 0}}
        assert api.post(f"{server.url}/api/v1/builds", json=build, timeout=30).status_code == 201
        release = {"application": "MAC", "version": version, "build": str(number), "artifact_url": url,
                   "artifact_sha256": sha, "issue_keys": [f"BIZPLAT-{number}"],
                   "implementers": ["alice@example.com"]}
        assert api.post(f"{server.url}/api/v1/releases", json=release, timeout=30).status_code == 201

    def last_in_staging():
        body = api.get(f"{server.url}/api/v1/releases/MAC/9.2.0", timeout=30).json()
        return any(d["environment"] == "Staging" and d["state"] == "succeeded" for d in body["deployments"])

    wait_for(last_in_staging, timeout=240, what="9.2.0 to reach Staging")

    def all_ended():
        return not Deployment.objects.filter(state__in=Deployment.OPEN_STATES).exists()

    wait_for(all_ended, timeout=120, what="every deployment to end")
    states = {(d.release.version, d.environment.name): d.state
              for d in Deployment.objects.select_related("release", "environment")}
    assert set(states.values()) <= FINAL, states  # each ended succeeded, or superseded by a newer release
    assert states[("9.2.0", "QA")] == states[("9.2.0", "Staging")] == "succeeded"
    for deployment in Deployment.objects.filter(state="superseded"):
        assert state_of(deployment.superseded_by_id) == "succeeded"
        assert AuditEvent.objects.filter(action="deployment.supersede", object_id=str(deployment.pk)).exists()
    assert not AuditEvent.objects.filter(code="ENVIRONMENT_BUSY").exists()
    queue = api.get(f"{server.url}/api/v1/applications/MAC/environments", timeout=30).json()
    assert [e["queue"] for e in queue] == [[], [], []]
    assert chain.verify().ok
