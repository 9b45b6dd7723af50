"""Rolling upgrade under load: the setup of tests/deploy/test_rolling.py (three demo app hosts behind
a real HAProxy, the bundled rolling_upgrade.yml run by the real deploy engine), with wrk sending
requests through HAProxy for the whole roll. Reports the roll's duration, requests per second
served and failed requests (which must be 0)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT = "Bench rolling"
CONNECTIONS = 4


def measure(front_port: int, wrk: str, log=print) -> dict | None:
    from django.conf import settings

    from audit.actors import Actor
    from environments import deploy, services
    from environments.cluster import Cluster, haproxy_available
    from environments.models import Environment
    from releases.models import Application
    from releases.services import release_register

    if not haproxy_available():
        log("haproxy is not installed (apt-get install -y haproxy): rolling upgrade skipped.")
        return None
    work = ROOT / "var" / "bench-rolling"
    shutil.rmtree(work, ignore_errors=True)
    settings.PORTAL_DEPLOY_DIR, settings.PORTAL_DEPLOY_ROOT = work / "deployments", work / "deploy"
    actor = Actor.system(via="bench")
    cluster = Cluster(work / "cluster", front_port=front_port)
    cluster.start()
    try:
        app = Application.objects.get(name="MAC")
        environment = Environment.objects.filter(application=app, name=ENVIRONMENT).first() or Environment(
            application=app, name=ENVIRONMENT)
        environment.playbook, environment.inventory = "rolling_upgrade.yml", str(cluster.inventory)
        environment = services.environment_save(actor=actor, environment=environment)
        version = f"8.{int(time.time())}"
        artifact = work / "artifacts" / f"mac-{version}.tar.gz"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(f"MAC {version}\n".encode())
        release, _ = release_register(
            actor=actor, application="MAC", version=version, build="1", artifact_url=artifact.as_uri(),
            artifact_sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(), issue_keys=["BIZPLAT-1"],
            implementers=["dev1@example.com"],
        )
        deployment = services.deployment_request(actor=actor, release=release, environment=environment)
        load = subprocess.Popen([wrk, "-t1", f"-c{CONNECTIONS}", "-d600s", "--latency", "--timeout", "5s",
                                 cluster.front_url],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        t0 = time.monotonic()
        state = deploy.execute(deployment.pk)
        roll = time.monotonic() - t0
        time.sleep(1)
        load.send_signal(signal.SIGINT)  # wrk prints its summary and stops
        out, _ = load.communicate(timeout=30)
        versions = {name: (root / "current" / "VERSION").read_text().strip() for name, _, root in cluster.hosts()}
    finally:
        cluster.stop()
    from bench.api_bench import parse_wrk

    figures = parse_wrk(out)
    result = {"state": state, "roll_seconds": roll, "hosts_upgraded": sum(v == version for v in versions.values()),
              "hosts": len(versions), **figures}
    log(f"  roll {state} in {roll:.1f} s, {figures['requests']:,} requests, {figures['rate']:,.0f}/s,"
        f" failed {figures['failed']}", flush=True)
    return result
