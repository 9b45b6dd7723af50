"""The portal's WSGI application hands the API and the site to their own middleware stacks
(portal.handlers): what each answer must carry, it carries, through the application a server runs."""

import io
import json
import wsgiref.util

import pytest
from django.core import signals
from django.db import close_old_connections

from access.models import ApiToken
from access.services import token_create
from portal.wsgi import application
from tests.conftest import SYSTEM


def serve(path: str, **headers) -> tuple[int, dict, bytes]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "wsgi.input": io.BytesIO(b""), "SERVER_NAME": "testserver",
               **{f"HTTP_{name.upper()}": value for name, value in headers.items()}}
    wsgiref.util.setup_testing_defaults(environ)
    answer = {}

    def start_response(status, response_headers, exc_info=None):
        answer["status"], answer["headers"] = int(status.split()[0]), dict(response_headers)

    # As Django's test client does: the test's transaction holds the connection the request uses.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        response = application(environ, start_response)
        body = b"".join(response)
        response.close()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)
    return answer["status"], answer["headers"], body


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
