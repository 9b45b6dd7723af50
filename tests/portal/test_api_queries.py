"""What CI calls on every build of every branch costs a small, fixed number of queries, whatever the
size of the history: the token with its applications in one query, the policy checks on rows already
read, the chain append, and reads of a few columns without wide joins."""

import json
import os

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from access.models import ApiToken
from access.services import token_create
from audit import chain
from environments import services as env_services
from tests.conftest import SYSTEM, person

SHA = "ab" * 32
SHOW = os.environ.get("SHOW_QUERIES")


def call(client, token, method, path, body=None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    with CaptureQueriesContext(connection) as captured:
        if method == "POST":
            response = client.post(f"/api/v1{path}", json.dumps(body), content_type="application/json", **headers)
        else:
            response = client.get(f"/api/v1{path}", **headers)
    assert response.status_code in (200, 201), response.content
    if SHOW:
        print(f"\n{method} {path}: {len(captured)}")
        for q in captured:
            print("   ", q["sql"][:300])
    return len(captured)


def counts(world, client, token, n):
    build = {"application": "MAC", "number": f"b{n}", "commit": "a1b2c3", "branch": "feature/BIZPLAT-1-x",
             "url": "https://ci.example.com/1", "status": "successful", "tests": {"passed": 3, "failed": 0}}
    release = {"application": "MAC", "version": f"9.{n}", "build": f"b{n}", "artifact_url": "file:///a.tgz",
               "artifact_sha256": SHA, "issue_keys": ["BIZPLAT-1"], "implementers": ["alice@example.com"]}
    return {
        "build": call(client, token, "POST", "/builds", build),
        "release": call(client, token, "POST", "/releases", release),
        "environments": call(client, token, "GET", "/applications/MAC/environments"),
        "release_read": call(client, token, "GET", f"/releases/MAC/9.{n}"),
        "build_read": call(client, token, "GET", f"/builds/MAC/b{n}"),
    }


def grow_history(world, releases):
    for _ in range(releases):
        release = world.release(implementers=["alice@example.com", "x@example.com"])
        world.to_staging(release)
        world.deploy(release, world.production, actor=person(world.bob))
    # open deployments in every state of the queue, so the reads show each kind of entry
    waiting = world.release()
    world.to_staging(waiting)
    env_services.deployment_request(actor=person(world.bob), release=waiting, environment=world.production)
    for _ in range(2):
        queued = world.release()
        world.deploy(queued, world.qa)
        env_services.deployment_request(actor=world.ci, release=queued, environment=world.staging)


# Queries per call besides the chain append (whose own cost is measured below, so that these stay
# the endpoint's own: the lookups, the policy's questions, the rows written and the answer read back).
# A personal token pays two more for the model permission (the user's and the groups' permissions).
# A release registration locks its automatic deployments' environments before its audit event, even
# when there are none (one read, the one that then deploys to them: see
# environments.services.release_registering).
EXPECTED = {
    "ci": {"build": 7, "release": 13, "environments": 6, "release_read": 4, "build_read": 2},
    "personal": {"build": 9, "release": 15, "environments": 6, "release_read": 4, "build_read": 2},
}
AUTO_DEPLOY = (26, 21, 23)
# On PostgreSQL the reads of an answer that do not depend on each other (the token's lookup among
# them) go to the database in one round trip (core.compiled.together), which counts as one query:
# this many fewer there. A new build's issue keys go in with it, in the same statement.
TOGETHER = {"build": 3, "release": 4, "environments": 5, "release_read": 3, "build_read": 1}
APPENDS = {"build": 1, "release": 1, "environments": 0, "release_read": 0, "build_read": 0}
# And a release that deploys itself: the environment's lock with its application and the environment
# it promotes from (three reads), what the policy's last check reads (an open deployment of the release
# there: one; an automatic deployment reads no freeze, it waits out any at the front of the queue), the
# automatic deployments it supersedes with their releases and whether the environment runs one (three),
# and where one is superseded, the channels to tell (one more).
TOGETHER_AUTO_DEPLOY = TOGETHER["release"] + 2 + 0 + 2
TOGETHER_SUPERSEDING = TOGETHER_AUTO_DEPLOY + 1


def append_cost() -> int:
    """Queries of one chain append inside a service's transaction, on this database."""
    with transaction.atomic():
        with CaptureQueriesContext(connection) as captured:
            chain.append(actor=SYSTEM, action="test.measure")
    return len(captured)


@pytest.mark.parametrize("history", [1, 12])
@pytest.mark.parametrize("kind", ["ci", "personal"])
def test_what_ci_calls_costs_the_same_at_any_history(world, client, kind, history):
    if kind == "ci":
        _, token = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    else:
        world.alice.user_permissions.add(*Permission.objects.filter(codename__in=["add_build", "add_release"]))
        _, token = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="alice", user=world.alice)
    grow_history(world, history)
    per_append = append_cost()
    measured = counts(world, client, token, history)
    assert {name: n - APPENDS[name] * per_append for name, n in measured.items()} == expected(EXPECTED[kind])


def expected(counts: dict) -> dict:
    together = connection.vendor == "postgresql"
    return {name: n - (TOGETHER[name] if together else 0) for name, n in counts.items()}


@pytest.mark.parametrize("history", [1, 12])
def test_a_release_that_deploys_itself_costs_the_same_at_any_history(world, client, history):
    """With QA deploying each new release by itself, registering a release also requests, queues and
    starts (or supersedes) a deployment in the same transaction: still a fixed number of queries."""
    _, token = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    grow_history(world, history)
    world.qa.auto_deploy = True
    world.qa.save(update_fields=["auto_deploy"])
    per_append = append_cost()
    first = counts(world, client, token, history)["release"]  # QA is free: the new release starts there
    second = counts(world, client, token, history + 100)["release"]  # QA is busy: it waits in the queue
    third = counts(world, client, token, history + 200)["release"]  # and supersedes the one waiting
    together = (TOGETHER_AUTO_DEPLOY, TOGETHER_AUTO_DEPLOY, TOGETHER_SUPERSEDING)
    if connection.vendor != "postgresql":
        together = (0, 0, 0)
    assert (first - 3 * per_append, second - 2 * per_append, third - 3 * per_append) == tuple(
        n - t for n, t in zip(AUTO_DEPLOY, together, strict=True))
