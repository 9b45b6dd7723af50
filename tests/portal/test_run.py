"""`make run` stops cleanly: SIGTERM to make, or Ctrl-C (SIGINT to its whole process group), stops the
web server and the worker, each signalled once, with no traceback."""

import os
import signal
import subprocess
from io import StringIO

import pytest
from django.core.management import call_command

from environments.models import Deployment
from environments.services import deployment_cancel
from tests.conftest import SYSTEM
from tests.processes import ROOT, alive, descendants, free_ports, http_status, portal_env, wait_for

pytestmark = pytest.mark.deploy  # it runs the worker


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("make-run-var")  # shared: the second start reuses the static files


def stop_cluster(env):
    subprocess.run([env["PATH"].split(os.pathsep)[0] + "/python", "manage.py", "cluster", "stop"], cwd=ROOT,
                   env=env, capture_output=True, timeout=60)


@pytest.mark.parametrize("stop", ["SIGTERM to make", "Ctrl-C"])
def test_make_run_stops_the_web_server_and_the_worker(transactional_audit_db, settings, var_dir, tmp_path, stop):
    # The demo is loaded already and what it left open cancelled, so the worker is idle when it is
    # stopped (a running deployment is let finish, which takes as long as its playbook).
    settings.VAR_DIR, settings.DEMO = var_dir, True
    call_command("demo_data", stdout=StringIO())
    for pk in Deployment.objects.filter(state__in=Deployment.OPEN_STATES).values_list("pk", flat=True):
        deployment_cancel(actor=SYSTEM, deployment_id=pk)
    port = free_ports(5)  # the web server, then HAProxy and three app instances when haproxy is installed
    env = portal_env(var_dir, PORTAL_QUEUE_NAME=f"portal-make-run-{os.getpid()}-{var_dir.name}")  # a queue of its own
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        make = subprocess.Popen(["make", "--no-print-directory", "run", f"PORT={port}", f"CLUSTER_PORT={port + 1}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    family: set[int] = set()
    try:
        wait_for(lambda: make.poll() is not None or (
            http_status(f"http://127.0.0.1:{port}/admin/login/") == 200 and "running." in log.read_text()
        ), timeout=180, what="the portal and its worker to start")
        assert make.poll() is None, log.read_text()
        # the demo cluster's app instances keep running by design (make cluster-stop)
        family = {p for p in descendants(make.pid) | {make.pid} if "cluster_app.py" not in cmdline(p)}
        assert any("qcluster" in cmdline(p) for p in family) and any("gunicorn" in cmdline(p) for p in family)

        if stop == "Ctrl-C":
            os.killpg(make.pid, signal.SIGINT)  # what a terminal sends to its foreground job
        else:
            os.kill(make.pid, signal.SIGTERM)
        make.wait(timeout=20)
        wait_for(lambda: not any(alive(p) for p in family), timeout=10,
                 what=f"every process of `make run` to exit: {[cmdline(p) for p in family if alive(p)]}")
    finally:
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop_cluster(env)
    output = log.read_text()
    assert "Traceback" not in output and "RecursionError" not in output, output
    assert "has stopped" in output and "Shutting down: Master" in output, output  # both stopped, not killed


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
