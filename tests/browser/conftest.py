"""Browser tests: Debian's Chromium driven by Playwright against the portal served on loopback.

The portal runs as `make run` runs it (`manage.py serve`: gunicorn and a django-q2 worker) on the test
database, loaded with the demo (`manage.py demo_data`: MAC on QA -> Staging -> Production; alice, bob,
carol, dave, admin with password = user name). The data is committed, so the server sees it; the
database is emptied when the last browser test is done. One Chromium for the whole session; a fresh
context per page; every request that is not to the portal is refused (the machine is offline, and a
page must not depend on the internet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.core.management import call_command
from django.db import connection, connections

from audit import triggers
from environments.models import Deployment
from tests.processes import ROOT, free_ports, http_status, portal_env, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1366, "height": 768}  # the analysts' screens
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    skip = None
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        skip = pytest.mark.skip(reason=f"Chromium is not installed ({CHROMIUM}): apt-get install chromium "
                                       "(.ci/run does; with CI set these tests never skip)")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.browser)
            if skip:
                item.add_marker(skip)


@dataclass
class Portal:
    url: str
    process: subprocess.Popen
    log: Path
    var_dir: Path
    sessions: dict[str, dict] = field(default_factory=dict)  # user name -> Playwright storage state

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _manage(env, *args, timeout=120):
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _asks_for_the_database(item) -> bool:
    """Whether pytest-django sets up the test database for this test (as it decides: a django_db
    marker, or one of its database fixtures)."""
    return bool(item.get_closest_marker("django_db")) or bool(
        {"db", "transactional_db", "live_server"} & set(getattr(item, "fixturenames", ())))


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker, request):
    """The test database, also when only browser tests run: pytest-django sets up the databases of the
    selected tests that ask for one, and a browser test uses it only through the portal's processes.
    Without this, `pytest tests/browser/test_admin.py` would have served (and at its end flushed) the
    database the settings name outside tests: a developer's own demo."""
    if any(_asks_for_the_database(item) for item in request.session.items):
        yield  # pytest-django's own set it up
        return
    from django.test.utils import setup_databases, teardown_databases

    with django_db_blocker.unblock():
        databases = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    with django_db_blocker.unblock():
        teardown_databases(databases, verbosity=0)


@pytest.fixture(scope="package")
def portal(django_db_setup, django_db_blocker, tmp_path_factory):
    """The portal and its worker, serving the demo from the test database."""
    var_dir = tmp_path_factory.mktemp("portal")
    env = portal_env(var_dir, PORTAL_DEMO="1", PORTAL_DEPLOY_DIR=str(var_dir / "deployments"),
                     PORTAL_DEPLOY_ROOT=str(var_dir / "deploy"))
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # the tests' allowance (below), not the portal's
    with django_db_blocker.unblock():
        _manage(env, "collectstatic", "--no-input", "--verbosity", "0")
        _manage(env, "demo_data")
        port = free_ports(1)
        log = var_dir / "serve.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--bind", f"127.0.0.1:{port}", "--web-workers", "2"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        server = Portal(f"http://127.0.0.1:{port}", process, log, var_dir)
        try:
            wait_for(lambda: process.poll() is not None or (
                http_status(f"{server.url}/admin/login/") == 200 and "running." in server.log_text()
            ), timeout=120, what="the portal and its worker to start")
            assert process.poll() is None, server.log_text()
            yield server
        finally:
            _let_deployments_finish()
            _stop(process)
            triggers.drop_all(connection)
            try:
                call_command("flush", interactive=False, verbosity=0)
            finally:
                triggers.install_all(connection)
                # opened beside Playwright's event loop, it is not the connection closed before the test
                # database is dropped (PostgreSQL then refuses the drop)
                connections.close_all()


def _let_deployments_finish(timeout: float = 90.0) -> None:
    """Stop the worker idle, so no playbook outlives the tests (a deployment still running after the
    timeout is stopped with the worker, as `make run` would)."""
    busy = Deployment.objects.filter(state__in=[Deployment.State.QUEUED, Deployment.State.RUNNING])
    try:
        wait_for(lambda: not busy.exists(), timeout=timeout, what="the deployments to finish", pause=0.5)
    except AssertionError:
        pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="package", autouse=True)
def _orm_beside_playwright():
    """Playwright's sync API keeps an event loop in this thread, and Django refuses ORM calls from a thread
    with a running loop; the tests' own reads and writes are synchronous, so allow them."""
    before = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if before is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = before


@pytest.fixture(scope="package")
def browser():
    """One Chromium for all the browser tests."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Offline:
    """Refuses every request that does not go to the portal on loopback, and remembers it."""

    def __init__(self):
        self.blocked: list[str] = []

    def __call__(self, route):
        url = route.request.url
        if urlsplit(url).scheme in {"data", "blob"} or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def new_page(browser, portal):
    """new_page(user=None): a page in a fresh browser context, signed in as `user` when given. The
    page's `offline.blocked` lists the requests it tried to make outside the portal."""
    contexts = []

    def make(user: str | None = None):
        if user is not None and user not in portal.sessions:
            portal.sessions[user] = _sign_in(browser, portal, user)
        context = browser.new_context(base_url=portal.url, viewport=VIEWPORT, locale="en-US", timezone_id="UTC",
                                      storage_state=portal.sessions.get(user))
        contexts.append(context)
        offline = Offline()
        context.route("**/*", offline)
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.offline = offline
        return page

    yield make
    for context in contexts:
        context.close()


def _sign_in(browser, portal, user: str) -> dict:
    context = browser.new_context(base_url=portal.url, viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto("/admin/login/?next=/admin/")
        page.fill("#id_username", user)
        page.fill("#id_password", user)  # the demo's password is the user name
        page.click("input[type=submit]")
        page.wait_for_url("**/admin/")
        return context.storage_state()
    finally:
        context.close()


@pytest.fixture
def screenshot():
    """screenshot(page, name): saves docs/screenshots/<name>.png (committed, shown in README.md)."""

    def save(page, name: str, *, full_page: bool = True) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        return path

    return save


def _signed_in(user: str):
    @pytest.fixture
    def page(new_page):
        return new_page(user)

    page.__doc__ = f"A page signed in as {user} (the demo's password = user name)."
    return page


alice_page = _signed_in("alice")
bob_page = _signed_in("bob")
carol_page = _signed_in("carol")
dave_page = _signed_in("dave")
