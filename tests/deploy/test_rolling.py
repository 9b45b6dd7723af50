"""Rolling upgrades through a real HAProxy: no failed request, and a failing host stops the roll."""

import io
import os
import shutil
import socket
import threading
import time
from collections import Counter

import pytest
import requests

from environments import deploy, services
from environments.cluster import Cluster
from environments.models import Deployment
from tests.deploy.conftest import register

State = Deployment.State

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None and not os.environ.get("PORTAL_REQUIRE_HAPROXY"),
    reason="haproxy is not installed (.ci/run installs it)",
)
pytestmark = needs_haproxy


def free_port_block(size=4) -> int:
    for base in range(20000, 60000, 97):
        ports = range(base, base + size)
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free ports")


def _free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def cluster(tmp_path, world):
    c = Cluster(tmp_path / "cluster", front_port=free_port_block())
    c.start()
    for environment in (world.qa,):
        environment.playbook, environment.inventory = "rolling_upgrade.yml", str(c.inventory)
        services.environment_save(actor=services.Actor.system(), environment=environment)
    yield c
    c.stop()


class Load:
    """Continuous requests through HAProxy from another thread (bounded in count and time)."""

    def __init__(self, url, rate=25, limit_seconds=300):
        self.url, self.pause, self.limit = url, 1.0 / rate, limit_seconds
        self.ok, self.failures, self.answers = 0, [], Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = self.stopped = 0.0

    def _run(self):
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                response = requests.get(self.url, timeout=3, headers={"Connection": "close"})
                if response.status_code == 200:
                    self.ok += 1
                    self.answers[response.text.strip()] += 1
                else:
                    self.failures.append(response.status_code)
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            time.sleep(self.pause)

    def __enter__(self):
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.stopped = time.monotonic()

    @property
    def rate(self) -> float:
        return (self.ok + len(self.failures)) / (self.stopped - self.started)


def versions(c: Cluster) -> dict[str, str]:
    return {name: (root / "current" / "VERSION").read_text().strip() for name, _, root in c.hosts()}


def test_rolling_deploy_under_load_has_no_failed_request(world, deploy_dirs, artifact, cluster):
    deployment = services.deployment_request(actor=world.ci, release=register(world, artifact, "6.0.0"),
                                             environment=world.qa)
    with Load(cluster.front_url) as load:
        time.sleep(1)
        state = deploy.execute(deployment.pk)
        time.sleep(1)

    assert state == State.SUCCEEDED
    assert load.failures == [] and load.ok > 0, (load.failures[:5], load.ok)  # the rate is a benchmark figure
    assert versions(cluster) == {"web1": "6.0.0", "web2": "6.0.0", "web3": "6.0.0"}
    assert cluster.server_status() == {"web1": "UP", "web2": "UP", "web3": "UP"}
    served = {answer.split()[1] for answer in load.answers if answer.startswith("6.0.0")}
    assert served == {"web1", "web2", "web3"}
    deployment.refresh_from_db()
    assert deployment.progress["hosts_done"] == deployment.progress["hosts_total"] == 3
    log = "\n".join(deployment.events.values_list("stdout", flat=True))
    assert "PLAY RECAP" in log and "reserved name" not in log.lower()


def test_failing_health_check_stops_the_roll(world, deploy_dirs, artifact, cluster):
    broken = cluster.hosts()[1][2]
    (broken / "FAIL_HEALTH").write_text("6.1.0\n")  # this release fails its health check on web2
    deployment = services.deployment_request(actor=world.ci, release=register(world, artifact, "6.1.0"),
                                             environment=world.qa)
    with Load(cluster.front_url) as load:
        state = deploy.execute(deployment.pk)

    assert state == State.FAILED
    assert versions(cluster) == {"web1": "6.1.0", "web2": "6.1.0", "web3": "0.0.0"}  # web3 untouched
    status = cluster.server_status()
    assert status["web1"] == "UP" and status["web3"] == "UP" and status["web2"] == "MAINT"
    assert load.failures == []
    deployment.refresh_from_db()
    assert deployment.progress["hosts"] == {"web1": "done", "web2": "failed"}
    assert deployment.progress["failed_host"] == "web2"
    assert deployment.result_detail.startswith('Failed on web2, task "Health check": ')

    # started again (make run after an interrupted roll): the host left out is put back, and said so
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    (broken / "FAIL_HEALTH").unlink()  # its health is back; HAProxy still holds it out
    call_command("cluster", "start", "--dir", str(cluster.directory), stdout=out)  # its port: the running one's
    assert "web2 was left out of the load balancer (an interrupted rolling upgrade): put back." in out.getvalue()
    assert cluster.server_status() == {"web1": "UP", "web2": "UP", "web3": "UP"}
    assert f"Cluster at http://127.0.0.1:{cluster.front_port}/" in out.getvalue()
    with pytest.raises(CommandError, match=f"The demo cluster runs on port {cluster.front_port}; stop it first"):
        call_command("cluster", "start", "--dir", str(cluster.directory), "--port", str(cluster.front_port + 40))


def test_cluster_status_says_what_runs_and_when_nothing_does(cluster):
    from django.core.management import CommandError, call_command

    out = io.StringIO()
    call_command("cluster", "status", "--dir", str(cluster.directory), stdout=out)  # the port: the running one's
    assert f"Cluster at http://127.0.0.1:{cluster.front_port}/" in out.getvalue()
    assert "web1 UP, web2 UP, web3 UP" in out.getvalue()
    cluster.stop()
    with pytest.raises(CommandError, match="The demo cluster is not running"):
        call_command("cluster", "status", "--dir", str(cluster.directory))


def test_the_demo_cluster_stands_for_production_only(tmp_path, world):
    """`cluster start --bind` points Production at the cluster; Staging (bound by an older version of the
    command) goes back to the demo playbook, so a Staging deployment never changes what Production serves."""
    from django.core.management import call_command

    c = Cluster(tmp_path / "cluster", front_port=free_port_block())
    world.staging.playbook, world.staging.inventory = "rolling_upgrade.yml", str(c.inventory)
    services.environment_save(actor=services.Actor.system(), environment=world.staging)
    try:
        call_command("cluster", "start", "--bind", "--dir", str(c.directory), "--port", str(c.front_port),
                     stdout=io.StringIO())
        for environment in (world.staging, world.production):
            environment.refresh_from_db()
        assert (world.production.playbook, world.production.inventory) == ("rolling_upgrade.yml", str(c.inventory))
        assert (world.staging.playbook, world.staging.inventory) == ("deploy_demo.yml", "")
    finally:
        c.stop()
