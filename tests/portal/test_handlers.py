"""The portal's WSGI application hands the API and the site to their own middleware stacks
(portal.handlers): what each answer must carry, it carries, through the application a server runs."""

import json

import pytest

from access.models import ApiToken
from access.services import token_create
from tests.conftest import SYSTEM
from tests.wsgi import serve


@pytest.mark.django_db
def test_the_api_answers_json_with_the_security_headers_and_no_session(world):
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])
    status, headers, body = serve("/api/v1/applications/MAC/environments", authorization=f"Bearer {raw}")
    assert status == 200 and [e["name"] for e in json.loads(body)] == ["QA", "Staging", "Production"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "same-origin"
    assert "Set-Cookie" not in headers
    status, _, body = serve("/api/v1/applications/MAC/environments")
    assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED"
    status, _, body = serve("/api/v1/no/such/path", authorization=f"Bearer {raw}")
    assert status == 404 and json.loads(body)["code"] == "NOT_FOUND"


@pytest.mark.django_db
def test_the_api_documentation_and_the_site_keep_the_sites_policy(world, client):
    for path in ("/api/v1/docs", "/admin/login/"):
        status, headers, body = serve(path)
        assert status == 200, path
        assert "script-src 'self'" in headers["Content-Security-Policy"], path
        assert headers["X-Frame-Options"] == "DENY", path


@pytest.mark.django_db
def test_a_signed_in_session_is_no_key_to_the_api(world, client):
    client.force_login(world.carol)
    assert client.get("/admin/").status_code == 200
    response = client.get("/api/v1/applications/MAC/environments")
    assert response.status_code == 401 and response.json()["code"] == "UNAUTHENTICATED"
