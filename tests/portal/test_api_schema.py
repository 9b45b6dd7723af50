"""The API against its own OpenAPI document: schemathesis generates valid and invalid requests for
every operation and checks every answer (no server error, status code, content type, headers and
body all as documented, valid data accepted, invalid data refused, authentication required), once
with a CI token and once with a personal token, against the real application in-process (WSGI), on
whichever database the suite runs on."""

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks

from access.models import ApiToken
from access.services import token_create
from portal.wsgi import application
from releases import services as rel_services
from releases.api import BUILD_EXAMPLE, RELEASE_EXAMPLE
from tests.conftest import SYSTEM

load_all_checks()
EVERY_CHECK = CHECKS.get_all()


@pytest.fixture
def ci_token(world) -> dict:
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="schema-ci", applications=[world.app])
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture
def personal_token(world) -> dict:
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="schema-bob", user=world.bob)
    return {"Authorization": f"Bearer {raw}"}


@pytest.fixture(autouse=True)
def in_process(world):
    """The documented examples exist (so the examples reach the success answers too), and the
    application runs in-process, inside the test's transaction: like Django's test client, keep the
    end of each request from closing the connection (and with it the test's transaction)."""
    build, release = BUILD_EXAMPLE, RELEASE_EXAMPLE
    rel_services.build_register(actor=SYSTEM, **{**build, "tests": rel_services.TestCounts(**build["tests"])})
    pr = release["pull_request"]
    example = rel_services.release_register(actor=SYSTEM, **{
        **release, "pull_request": rel_services.PullRequest(pr["url"], pr["author"], tuple(pr["reviewers"]),
                                                            "2026-11-29T10:00:00+00:00")})[0]
    world.to_staging(example)
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)
BOUNDED = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


@schema.parametrize()
@BOUNDED
def test_every_answer_is_documented_with_a_ci_token(case, ci_token):
    case.call_and_validate(headers=ci_token, checks=EVERY_CHECK)


@schema.parametrize()
@BOUNDED
def test_every_answer_is_documented_with_a_personal_token(case, personal_token):
    case.call_and_validate(headers=personal_token, checks=EVERY_CHECK)
