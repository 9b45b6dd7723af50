"""The API as gunicorn serves it, over loopback: what only a real server and a real client show (a body
sent in chunks, a Host header the portal does not serve)."""

import gzip
import http.client
import json
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from tests.processes import ROOT, portal_env


@pytest.fixture(scope="module")
def ci_token(portal) -> str:
    env = portal_env(portal.var_dir, PORTAL_DEMO="1")
    done = subprocess.run([sys.executable, "manage.py", "create_token", "--ci", "--application", "MAC",
                           "--name", "served-api"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _send(portal, method, path, *, body: bytes | None = None, headers=(), chunked=False):
    address = urlsplit(portal.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        if chunked:  # the body in pieces, as a client streaming it sends it: no Content-Length
            connection.request(method, path, body=iter([body[:10], body[10:]]), headers=dict(headers),
                               encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def test_a_body_sent_in_chunks_is_read(portal, ci_token):
    build = {"application": "MAC", "number": "served-chunked-1", "commit": "ab" * 20,
             "branch": "feature/BIZPLAT-9-chunks", "status": "successful"}
    headers = {"Authorization": f"Bearer {ci_token}", "Content-Type": "application/json",
               "Transfer-Encoding": "chunked"}
    status, _, body = _send(portal, "POST", "/api/v1/builds", body=json.dumps(build).encode(), headers=headers,
                            chunked=True)
    assert status == 201, body
    assert json.loads(body)["number"] == "served-chunked-1"
    status, _, body = _send(portal, "POST", "/api/v1/builds", body=b" " * (256 * 1024 + 1), headers=headers,
                            chunked=True)
    assert (status, json.loads(body)["code"]) == (413, "TOO_LARGE")
    status, _, body = _send(portal, "POST", "/api/v1/builds", body=gzip.compress(json.dumps(build).encode()),
                            headers={**headers, "Transfer-Encoding": "gzip, chunked"}, chunked=True)
    assert (status, json.loads(body)["code"]) == (415, "UNSUPPORTED_ENCODING"), body  # named, not read as empty


def test_a_host_the_portal_does_not_serve_is_answered_in_json(portal, ci_token):
    status, content_type, body = _send(portal, "GET", "/api/v1/builds/MAC/1", headers={
        "Host": "ci-gateway.example.com", "Authorization": f"Bearer {ci_token}"})
    assert (status, content_type) == (400, "application/json")
    answer = json.loads(body)
    assert answer["code"] == "BAD_REQUEST" and "ci-gateway.example.com" in answer["detail"]


def test_head_is_answered_like_get_without_a_body(portal, ci_token):
    auth = {"Authorization": f"Bearer {ci_token}"}
    status, content_type, body = _send(portal, "GET", "/api/v1/applications/MAC/environments", headers=auth)
    assert status == 200 and content_type.startswith("application/json") and body
    assert _send(portal, "HEAD", "/api/v1/applications/MAC/environments", headers=auth) == (200, content_type, b"")


def test_a_chunked_body_is_not_waited_for_before_the_token_is_checked(portal):
    """A client that starts a chunked body and never ends it holds no worker for a request without a
    valid token: the body is read when the view reads it, after the token."""
    address = urlsplit(portal.url)
    with socket.create_connection((address.hostname, address.port), timeout=20) as conn:
        conn.sendall(b"POST /api/v1/builds HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")  # and nothing more
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
