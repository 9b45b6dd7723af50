"""An insider's attacks on the lazy bearer-token lookup (edge.api.Bearer), the JSON/401 guard
(portal.api.JsonAnswersMiddleware) and the API's own middleware stack (portal.handlers).

Each test asserts what a secure API must do."""

import json

import pytest

from access.models import ApiToken
from access.services import token_create, token_revoke
from audit.models import AuditEvent
from environments import services as env_services
from environments.models import Approval, Deployment, Environment
from releases import services as rel_services
from releases.models import Application, Build, Release
from tests.conftest import SYSTEM, ci_actor
from tests.portal.test_api import BUILD, RELEASE, Api
from tests.wsgi import serve

UNAUTH = {"code": "UNAUTHENTICATED", "detail": "A valid bearer token is required: Authorization: Bearer <token>."}


# --- helpers ------------------------------------------------------------------------------------

def state():
    """Everything a write could leave behind."""
    return (AuditEvent.objects.count(), Deployment.objects.count(), Approval.objects.count(),
            Build.objects.count(), Release.objects.count(),
            sorted(Deployment.objects.values_list("id", "state")))


def nobody_token(world, who):
    if who == "unknown":
        return "rp_" + "x" * 43
    if who == "revoked":
        token, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="gone", user=world.carol)
        token_revoke(actor=SYSTEM, token=token)
        return raw
    if who == "revoked_ci":
        token, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="gone", applications=[world.app])
        token_revoke(actor=SYSTEM, token=token)
        return raw
    raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="carol", user=world.carol)[1]
    world.carol.is_active = False
    world.carol.save()
    return raw


@pytest.fixture
def setup(world, client):
    """MAC with a release in an awaiting-approval deployment to Production, and a second application
    OTHER with a release, a build and an open deployment."""
    ci = Api(client, token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])[1])
    assert ci.post("/builds", BUILD).status_code == 201
    assert ci.post("/releases", RELEASE).status_code == 201
    release = Release.objects.get(version="3.1.0")
    world.to_staging(release)
    bob = Api(client, token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name="bob", user=world.bob)[1])
    waiting = bob.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "Production"})
    assert waiting.status_code == 201 and waiting.json()["state"] == "awaiting_approval", waiting.json()

    other = Application.objects.create(name="OTHER", issue_key_prefix="OTH")
    other_qa = Environment.objects.create(application=other, name="QA")
    rel_services.build_register(actor=SYSTEM, application="OTHER", number="7", commit="c0ffee" * 6,
                                branch="feature/OTH-1-secret", url="https://ci/7", status="successful")
    other_release, _ = rel_services.release_register(
        actor=SYSTEM, application="OTHER", version="9.9.9", build="7", artifact_url="file:///o.tgz",
        artifact_sha256="cd" * 32, issue_keys=["OTH-1"], implementers=["mallory@example.com"])
    other_ci = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="oci", applications=[other])[1]
    other_deployment = env_services.deployment_request(
        actor=ci_actor(other),
        release=other_release, environment=other_qa)
    return {"ci": ci, "bob": bob, "waiting": waiting.json()["id"], "other": other,
            "other_deployment": other_deployment.pk, "other_ci": other_ci}


# --- 1. a token that stands for nobody: every endpoint, every method ------------------------------

ENDPOINTS = [
    ("get", "/applications/MAC/environments"), ("get", "/applications/OTHER/environments"),
    ("get", "/applications/NOPE/environments"), ("get", "/applications/MAC/metrics"),
    ("get", "/applications/MAC/metrics?weeks=0"), ("get", "/applications/MAC/metrics?environment=Nope"),
    ("get", "/releases/MAC/3.1.0"), ("get", "/releases/MAC/0.0.0"), ("get", "/releases/OTHER/9.9.9"),
    ("get", "/builds/MAC/101"), ("get", "/builds/MAC/999"), ("get", "/changes/BIZPLAT-64951"),
    ("get", "/changes/OTH-1"), ("get", "/changes/NONE-1"), ("get", "/deployments/{waiting}"),
    ("get", "/deployments/999999"), ("get", "/deployments/0"),
    ("post", "/deployments/{waiting}/approve"), ("post", "/deployments/{waiting}/reject"),
    ("post", "/deployments/{waiting}/cancel"), ("post", "/deployments/999999/cancel"),
    ("post", "/deployments"), ("post", "/builds"), ("post", "/releases"),
]


def _bodies(path):
    return {"/deployments": {"application": "MAC", "version": "3.1.0", "environment": "QA"},
            "/builds": {**BUILD, "number": "555"},
            "/releases": {**RELEASE, "version": "6.6.6"}}.get(path, {"comment": "pwned"})


@pytest.mark.parametrize("who", ["unknown", "revoked", "revoked_ci", "inactive"])
def test_nobody_token_every_endpoint_is_401_and_writes_nothing(world, client, setup, who):
    raw = nobody_token(world, who)
    before = state()
    nobody = Api(client, raw)
    answers = {}
    for method, path in ENDPOINTS:
        path = path.format(waiting=setup["waiting"])
        r = nobody.get(path) if method == "get" else nobody.post(path, _bodies(path))
        answers[(method, path)] = (r.status_code, r.json())
        # malformed bodies too: validation must not answer before authentication
        if method == "post":
            r = nobody.post(path, "{not json", raw=True)
            answers[(method, path, "badjson")] = (r.status_code, r.json())
            r = nobody.post(path, {"x": 1})
            answers[(method, path, "invalid")] = (r.status_code, r.json())
    wrong = {k: v for k, v in answers.items() if v != (401, UNAUTH)}
    assert wrong == {}
    assert state() == before


@pytest.mark.parametrize("who", ["unknown", "revoked", "inactive"])
def test_nobody_token_head_options_and_other_methods(world, client, setup, who):
    raw = nobody_token(world, who)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    out = {}
    for method in ("head", "options", "put", "patch", "delete"):
        r = getattr(client, method)("/api/v1/releases/MAC/3.1.0", **headers)
        out[method] = r.status_code
    # never a 2xx/3xx, never the release
    assert all(s in (401, 405) for s in out.values()), out
    r = client.head("/api/v1/releases/MAC/3.1.0", **headers)
    assert b"3.1.0" not in r.content


@pytest.mark.parametrize("who", ["unknown", "revoked", "inactive"])
def test_nobody_token_through_the_real_wsgi_application(world, setup, who):
    raw = nobody_token(world, who)
    for path in ("/api/v1/releases/MAC/3.1.0", "/api/v1/applications/MAC/environments",
                 "/api/v1/releases/MAC/0.0.0", "/api/v1/applications/NOPE/environments"):
        status, _, body = serve(path, authorization=f"Bearer {raw}")
        assert (status, json.loads(body)) == (401, UNAUTH), path
    before = state()
    status, _, body = serve("/api/v1/builds", method="POST", body=json.dumps({**BUILD, "number": "77"}).encode(),
                            authorization=f"Bearer {raw}")
    assert (status, json.loads(body)) == (401, UNAUTH)
    assert state() == before


def test_nobody_token_exceptions_raised_before_resolution_still_401(world, client, setup):
    """Inputs that make the batched reads fail (lone surrogates, huge text) before readable() is asked."""
    nobody = Api(client, "rp_" + "y" * 43)
    for path in ("/releases/MAC/%ED%A0%80", "/applications/%ED%A0%80/environments",
                 "/releases/MAC/" + "v" * 5000, "/applications/" + "a" * 5000 + "/environments",
                 "/releases/%00/x", "/deployments/99999999999999999999999"):
        r = nobody.get(path)
        assert (r.status_code, r.json()) == (401, UNAUTH), path
    body = json.dumps({"application": "MAC", "version": "\ud800", "environment": "QA"})
    r = nobody.post("/deployments", body, raw=True)
    assert (r.status_code, r.json()) == (401, UNAUTH)


# --- 2. a token of the wrong scope or kind ---------------------------------------------------------

def test_ci_token_of_a_reads_b_exactly_as_if_b_did_not_exist(world, client, setup):
    ci = setup["ci"]  # scoped to MAC
    pairs = [("/applications/OTHER/environments", "/applications/OTHER/environments"),  # same app...
             ("/releases/OTHER/9.9.9", "/releases/OTHER/0.0.0"),
             ("/builds/OTHER/7", "/builds/OTHER/8"),
             ("/applications/OTHER/metrics", "/applications/GHOST/metrics"),
             ("/changes/OTH-1", "/changes/OTH-2"),
             (f"/deployments/{setup['other_deployment']}", "/deployments/999999")]
    for existing, missing in pairs:
        a, b = ci.get(existing), ci.get(missing)
        assert a.status_code == 404, (existing, a.status_code, a.content)
        if existing != missing:
            assert b.status_code == 404
    a, b = ci.get("/applications/OTHER/environments"), ci.get("/applications/GHOST/environments")
    assert a.json()["detail"].replace("OTHER", "X") == b.json()["detail"].replace("GHOST", "X")


def test_ci_token_of_a_cannot_tell_whether_a_deployment_of_b_exists(world, client, setup):
    """POST /deployments/{id}/cancel|approve|reject with a CI token scoped to MAC on OTHER's deployment:
    anything but the answer for an id that does not exist tells the token it exists (and whose)."""
    ci = setup["ci"]
    before = Deployment.objects.get(pk=setup["other_deployment"]).state
    leaks = {}
    for verb in ("cancel", "approve", "reject"):
        existing = ci.post(f"/deployments/{setup['other_deployment']}/{verb}", {})
        missing = ci.post(f"/deployments/999999/{verb}", {})
        if (existing.status_code, existing.json()["code"]) != (missing.status_code, missing.json()["code"]) or \
                existing.json()["detail"].replace(str(setup["other_deployment"]), "N") != \
                missing.json()["detail"].replace("999999", "N"):
            leaks[verb] = (existing.status_code, existing.json(), missing.status_code, missing.json())
    assert Deployment.objects.get(pk=setup["other_deployment"]).state == before
    assert leaks == {}


def test_ci_token_of_a_cannot_probe_b_releases_through_post_deployments(world, client, setup):
    ci = setup["ci"]
    existing = ci.post("/deployments", {"application": "OTHER", "version": "9.9.9", "environment": "QA"})
    missing = ci.post("/deployments", {"application": "OTHER", "version": "0.0.0", "environment": "QA"})
    assert Deployment.objects.filter(release__application__name="OTHER").count() == 1
    assert existing.status_code == missing.status_code == 404
    assert existing.json()["detail"].replace("9.9.9", "V") == missing.json()["detail"].replace("0.0.0", "V")


def test_ci_token_of_a_cannot_probe_b_builds_through_post_releases(world, client, setup):
    ci = setup["ci"]
    existing = ci.post("/releases", {**RELEASE, "application": "OTHER", "version": "5.0", "build": "7"})
    missing = ci.post("/releases", {**RELEASE, "application": "OTHER", "version": "5.0", "build": "8"})
    assert (existing.status_code, existing.json()["code"]) == (missing.status_code, missing.json()["code"])
    existing = ci.post("/builds", {**BUILD, "application": "OTHER", "number": "7"})
    missing = ci.post("/builds", {**BUILD, "application": "OTHER", "number": "8"})
    assert (existing.status_code, existing.json()["code"]) == (missing.status_code, missing.json()["code"])


def test_ci_token_of_a_cannot_tell_which_applications_exist_by_registering(world, client, setup):
    """Registering for an application outside the token's scope answers as for one that does not exist;
    the refusal is in the chain all the same."""
    ci, before = setup["ci"], AuditEvent.objects.filter(code="TOKEN_SCOPE").count()
    answers = [(ci.post("/builds", {**BUILD, "application": app}), ci.post("/releases", {
        **RELEASE, "application": app, "build": "7"})) for app in ("OTHER", "GHOST")]
    bodies = [[(a.status_code, a.json()["detail"].replace(app, "X")) for a in pair]
              for pair, app in zip(answers, ("OTHER", "GHOST"), strict=True)]
    assert bodies[0] == bodies[1] == [(404, "No application named 'X'.")] * 2
    assert AuditEvent.objects.filter(code="TOKEN_SCOPE").count() == before + 2
    assert not Build.objects.filter(application__name="OTHER", number=BUILD["number"]).exists()


def test_ci_token_cannot_approve_or_act_on_restricted(world, client, setup):
    ci = setup["ci"]
    before = state()
    for verb in ("approve", "reject"):
        r = ci.post(f"/deployments/{setup['waiting']}/{verb}", {})
        assert r.status_code == 403, r.json()
    r = ci.post("/deployments", {"application": "MAC", "version": "3.1.0", "environment": "Production"})
    assert r.status_code == 403
    assert state()[1:] == before[1:]  # only refusal audit events


def test_batched_views_do_not_mix_up_tokens_between_requests(world, client, setup):
    """A valid token's batched lookup followed by an unknown one (and back) on the same process."""
    ci, nobody = setup["ci"], Api(client, "rp_" + "z" * 43)
    other = Api(client, setup["other_ci"])
    for _ in range(3):
        assert ci.get("/releases/MAC/3.1.0").status_code == 200
        assert nobody.get("/releases/MAC/3.1.0").status_code == 401
        assert other.get("/releases/MAC/3.1.0").status_code == 404
        assert other.get("/applications/MAC/environments").status_code == 404
        assert other.get("/releases/OTHER/9.9.9").status_code == 200


# --- 3. paths that might escape the API stack or the guard -----------------------------------------

TRICKS = [
    "/api/v1/docs/../releases/MAC/3.1.0", "/api/v1/docs/../applications/MAC/environments",
    "/api/v1/docs%2F..%2Freleases/MAC/3.1.0", "/api/v1/docs/%2e%2e/releases/MAC/3.1.0",
    "/api/v1/docsx/../releases/MAC/3.1.0", "/api/v1/docs/releases/MAC/3.1.0",
    "/api/v1/releases/MAC/3.1.0/", "/api/v1//releases/MAC/3.1.0", "//api/v1/releases/MAC/3.1.0",
    "/api/v1/./releases/MAC/3.1.0", "/API/v1/releases/MAC/3.1.0", "/api/v1/releases/MAC/3.1.0;x",
    "/api/v1/releases/MAC/3%2E1%2E0", "/api/v1/docs#/releases/MAC/3.1.0",
]


@pytest.mark.parametrize("who", ["unknown", "revoked", "none"])
def test_path_tricks_never_show_the_release(world, setup, who):
    headers = {} if who == "none" else {"authorization": f"Bearer {nobody_token(world, who)}"}
    shown = {}
    for path in TRICKS:
        status, hdrs, body = serve(path, **headers)
        if status < 400 or b"artifact_sha256" in body or b"BIZPLAT" in body:
            shown[path] = (status, body[:120])
    for script_name, path in (("/api/v1", "/releases/MAC/3.1.0"), ("/api", "/v1/releases/MAC/3.1.0"),
                              ("/api/v1/docs", "/../releases/MAC/3.1.0"), ("/x", "/api/v1/releases/MAC/3.1.0")):
        status, hdrs, body = serve(path, script_name=script_name, **headers)
        if status < 400 or b"artifact_sha256" in body:
            shown[script_name + path] = (status, body[:120])
    assert shown == {}


def test_docs_and_openapi_with_a_nobody_token(world, setup):
    raw = nobody_token(world, "unknown")
    status, _, body = serve("/api/v1/openapi.json", authorization=f"Bearer {raw}")
    assert b"OTH-1" not in body and b"mallory" not in body and b"cdcdcdcd" not in body  # schema, no data
    status, _, body = serve("/api/v1/docs", authorization=f"Bearer {raw}")
    assert b"artifact_sha256\": \"" not in body


def test_a_session_is_no_key_to_any_api_endpoint(world, client, setup):
    client.force_login(world.carol)
    assert client.get("/admin/").status_code == 200
    before = state()
    for method, path in ENDPOINTS:
        path = "/api/v1" + path.format(waiting=setup["waiting"])
        r = client.get(path) if method == "get" else client.post(path, json.dumps(_bodies(path[7:])),
                                                                   content_type="application/json")
        assert r.status_code == 401, (path, r.status_code)
    # a session plus an unknown bearer
    r = client.get("/api/v1/releases/MAC/3.1.0", HTTP_AUTHORIZATION="Bearer rp_" + "q" * 43)
    assert r.status_code == 401
    # and through the docs (site) stack with the session cookie
    cookie = client.cookies["sessionid"].value
    status, _, body = serve("/api/v1/docs/../releases/MAC/3.1.0", cookie=f"sessionid={cookie}")
    assert status >= 400 and b"artifact_sha256" not in body
    assert state() == before


# --- 4. the API's own stack: what the site's stack enforced and the API's no longer does -----------

def test_the_api_stack_still_checks_allowed_hosts(world, client, setup):
    """A Host not in ALLOWED_HOSTS is refused (400) under /api/v1/ as on the site, before anything is
    read or written (DNS rebinding, Host-header poisoning): the API's stack asks get_host() too."""
    token = setup["ci"].token
    auth = {"HTTP_HOST": "evil.example", "secure": True, "HTTP_AUTHORIZATION": f"Bearer {token}"}
    assert client.get("/admin/login/", HTTP_HOST="evil.example", secure=True).status_code == 400
    dispatch = client.handler
    client.handler = dispatch.site  # the stack the API had before portal.handlers
    try:
        assert client.get("/api/v1/releases/MAC/3.1.0", **auth).status_code == 400
    finally:
        client.handler = dispatch
    before = state()
    read = client.get("/api/v1/releases/MAC/3.1.0", **auth)
    write = client.post("/api/v1/builds", json.dumps({**BUILD, "number": "4242"}),
                        content_type="application/json", **auth)
    wrote = state() != before
    assert (read.status_code, write.status_code, wrote) == (400, 400, False)


def test_valid_token_lone_surrogate_is_no_500(world, client, setup):
    """'Nothing a client sends may produce a 500' (portal.api) -- the batched reads with odd text."""
    ci = setup["ci"]
    answers = {p: ci.get(p).status_code for p in ("/releases/MAC/%ED%A0%80", "/applications/%ED%A0%80/environments")}
    body = json.dumps({"application": "MAC", "version": "\ud800", "environment": "QA"})
    answers["POST /deployments"] = ci.post("/deployments", body, raw=True).status_code
    assert all(s < 500 for s in answers.values()), answers


def test_malformed_tokens(world, client, setup):
    for header in ("Bearer rp_" + "x" * 300, "Bearer ", "Bearer", "Basic rp_x", "bearer rp_" + "x" * 43,
                   "Bearer rp_" + "x" * 43 + " extra", "Bearer  rp_" + "x" * 43, "Token rp_abc"):
        r = client.get("/api/v1/releases/MAC/3.1.0", HTTP_AUTHORIZATION=header)
        assert r.status_code == 401, (header, r.status_code)
        assert r.json()["code"] == "UNAUTHENTICATED"
