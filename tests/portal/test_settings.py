"""Production settings: Django's deployment checks pass, HTTPS is enforced by default, and every page
carries a content security policy that allows only the portal itself."""

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.urls import reverse

from tests.processes import production_env

ROOT = Path(__file__).resolve().parents[2]


def check_deploy(tmp_path, **extra) -> subprocess.CompletedProcess:
    """`manage.py check --deploy` as production runs it: its own secret key, host names, no demo."""
    seal_key = tmp_path / "seal.key"
    seal_key.write_text(secrets.token_urlsafe(32))
    env = production_env(tmp_path, **{"SECRET_KEY": secrets.token_urlsafe(64), "ALLOWED_HOSTS": "portal.example.com",
                                      "PORTAL_AUDIT_SEAL_KEY_FILE": str(seal_key), **extra})
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_production_settings_pass_the_deployment_checks(tmp_path):
    done = check_deploy(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues (0 silenced)." in done.stdout
    assert "WARNING" not in done.stdout + done.stderr


def test_turning_https_off_is_visible_to_the_deployment_checks(tmp_path):
    done = check_deploy(tmp_path, PORTAL_SSL_REDIRECT="0", PORTAL_HSTS_SECONDS="0")
    assert done.returncode != 0
    assert "security.W004" in done.stderr and "security.W008" in done.stderr


def test_a_portal_without_an_audit_seal_key_is_visible_to_the_deployment_checks(tmp_path):
    done = check_deploy(tmp_path, PORTAL_AUDIT_SEAL_KEY_FILE="")
    assert done.returncode != 0
    assert "audit.W001" in done.stderr and "PORTAL_AUDIT_SEAL_KEY_FILE" in done.stderr
    done = check_deploy(tmp_path, PORTAL_AUDIT_SEAL_KEY_FILE="", PORTAL_DEMO="1")  # the demo's public key
    assert done.returncode != 0 and "audit.W002" in done.stderr


def test_an_exact_count_limit_below_a_lists_page_is_refused_by_name(tmp_path):
    """Below a page's hundred rows the admin would list every row a search finds on one page, uncounted."""
    done = check_deploy(tmp_path, PORTAL_EXACT_COUNT_LIMIT="50")
    assert done.returncode != 0
    assert "PORTAL_EXACT_COUNT_LIMIT must be at least 100, the rows of a list's page." in done.stderr
    assert check_deploy(tmp_path, PORTAL_EXACT_COUNT_LIMIT="100").returncode == 0


def test_every_page_has_a_self_only_content_security_policy(client, make_user):
    login = client.get(reverse("admin:login"))
    policy = dict(part.strip().split(" ", 1) for part in login.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == policy["script-src"] == policy["style-src"] == "'self'"
    assert policy["object-src"] == policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in login.headers["Content-Security-Policy"]
    client.force_login(make_user("root", superuser=True))
    assert "Content-Security-Policy" in client.get(reverse("admin:index")).headers


@pytest.mark.parametrize("path", ["/api/v1/docs", "/admin/login/"])
def test_pages_load_scripts_and_styles_from_the_portal_only(client, path):
    """Bundled Swagger UI (no CDN) and the admin: no script from elsewhere, no inline script to run."""
    html = client.get(path).content.decode()
    assert "cdn" not in html.lower() and "https://" not in html
    for attributes, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S):
        assert 'src="/static/' in attributes or ('type="application/json"' in attributes and body.strip()), attributes
    assert ' style="' not in html


def test_the_portals_pages_have_no_inline_style_or_script(client, world, make_user):
    """The pages are styled from the portal's stylesheet and refreshed by its own script file: an inline
    style or script would be blocked."""
    release = world.release(issue_keys=["BIZPLAT-9"])
    deployment = world.deploy(release, world.qa)
    client.force_login(make_user("root", superuser=True))
    for url in (reverse("admin:index"), reverse("admin:releases_release_change", args=[release.pk]),
                reverse("admin:environments_deployment_change", args=[deployment.pk]),
                reverse("admin:change_journey", args=["BIZPLAT-9"])):
        html = client.get(url).content.decode()
        assert "portal/portal.css" in html and ' style="' not in html, url
        for attributes, _body in re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S):
            assert 'src="/static/' in attributes, (url, attributes)
    html = client.get(reverse("admin:environments_deployment_change", args=[deployment.pk])).content.decode()
    assert 'class="output-log"' in html and 'src="/static/portal/live.js"' in html


def manage(tmp_path, script: str, *, migrate: bool = True, **settings) -> subprocess.CompletedProcess:
    """`manage.py shell -c script` in a portal of its own (migrated first unless told not to), with these
    environment variables over the test run's own (none of its PORTAL_* or DATABASE_URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_") and k != "DATABASE_URL"}
    env.update(PORTAL_VAR_DIR=str(tmp_path), **settings)
    for command in ([["migrate", "-v0"]] if migrate else []) + [["shell", "-c", script]]:
        done = subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_release_is_answered_as_registered_when_the_task_queue_is_down(tmp_path):
    """With the Redis broker unreachable, a release that deploys itself is still registered, its QA
    deployment is on record (the reaper hands its task over once the queue is back), and the caller is
    told so, not answered with an error for what committed."""
    script = (
        "from environments.models import Deployment, Environment\n"
        "from releases.services import build_register, release_register\n"
        "from tests.conftest import SYSTEM\n"
        "from releases.models import Application\n"
        "app = Application.objects.create(name='MAC', issue_key_prefix='BIZPLAT')\n"
        "Environment.objects.create(application=app, name='QA', auto_deploy=True)\n"
        "build_register(actor=SYSTEM, application='MAC', number='1', commit='c0ffee', branch='main',"
        " status='successful')\n"
        "release, created = release_register(actor=SYSTEM, application='MAC', version='1.0.0', build='1',"
        " artifact_url='file:///x.tar.gz', artifact_sha256='0' * 64, issue_keys=[], implementers=['a'])\n"
        "print('registered', created, [d.state for d in Deployment.objects.filter(release=release)])\n"
    )
    done = manage(tmp_path, script, PORTAL_DEMO="1", PORTAL_QUEUE_BROKER="redis",
                  REDIS_URL="redis://127.0.0.1:9/0")  # the discard port: nothing listens there
    assert "registered True ['running']" in done.stdout
    # one line per log record: time with its offset, level, logger, message
    assert re.search(r"^20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ERROR environments\.services: The task queue did "
                     r"not take run_deployment", done.stderr, re.M), done.stderr


def test_the_health_check_answers_over_plain_http_where_everything_else_redirects(tmp_path):
    """Production settings redirect to HTTPS; a load balancer's plain-HTTP probe of the health check is
    answered (its status only), any other path still redirected."""
    script = (
        "from django.test import Client\n"
        "c = Client()\n"
        "for path in ('/api/v1/health', '/api/v1/releases/MAC/1.0', '/admin/'):\n"
        "    print(path, c.get(path, HTTP_HOST='portal.example.com').status_code)\n"
    )
    done = manage(tmp_path, script, DJANGO_SETTINGS_MODULE="portal.settings", SECRET_KEY=secrets.token_urlsafe(64),
                  ALLOWED_HOSTS="portal.example.com")
    assert [line for line in done.stdout.splitlines() if line.startswith("/")] == [
        "/api/v1/health 200", "/api/v1/releases/MAC/1.0 301", "/admin/ 301"]


def test_health_says_whether_the_database_answers_and_the_api_answers_503_json_without_it(tmp_path, client, db):
    """A load balancer probes /api/v1/health (no token). With the database gone (a port nothing listens
    on), the probe and every API call answer 503 UNAVAILABLE as JSON, not Django's HTML error page."""
    assert client.get("/api/v1/health").json() == {"status": "ok", "database": "ok"}
    script = (
        "import json\n"
        "from django.test import Client\n"
        "c = Client()\n"
        "for path, headers in (('/api/v1/health', {}), ('/api/v1/builds/MAC/1', {'HTTP_AUTHORIZATION': 'Bearer rp_x'}),"
        " ('/api/v1/applications/MAC/environments', {'HTTP_AUTHORIZATION': 'Bearer rp_x'})):\n"
        "    r = c.get(path, HTTP_HOST='localhost', **headers)\n"
        "    print(path, r.status_code, r['Content-Type'].split(';')[0], json.dumps(r.json(), sort_keys=True))\n"
    )
    done = manage(tmp_path, script, migrate=False, PORTAL_DEMO="1",
                  DATABASE_URL="postgres://portal@127.0.0.1:9/portal")  # a port nothing listens on
    unavailable = ('503 application/json {"code": "UNAVAILABLE", "detail": "The portal\'s database does not answer: '
                   'try again shortly."}')
    assert [line for line in done.stdout.splitlines() if line.startswith("/api/")] == [
        '/api/v1/health 503 application/json {"database": "does not answer", "status": "unavailable"}',
        f"/api/v1/builds/MAC/1 {unavailable}", f"/api/v1/applications/MAC/environments {unavailable}"]
