"""The deploy engine under a real django-q2 worker (ORM broker by default; Redis with
PORTAL_QUEUE_BROKER=redis): cancel, a worker killed with SIGKILL, one deployment at a time."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, connections
from django_q.models import Task
from django_q.tasks import async_task

from audit import chain
from audit.models import AuditEvent
from environments import deploy, services, tasks
from environments.models import Deployment, DeploymentEvent
from environments.policy import PolicyRefusal
from tests.deploy.conftest import register, use_repo

State = Deployment.State
ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def state_of(pk):
    return Deployment.objects.values_list("state", flat=True).get(pk=pk)


def running_long_step(pk):
    return DeploymentEvent.objects.filter(deployment_id=pk, event="playbook_on_task_start", task="Long step").exists()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return False


def database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def worker_env(deploy_dirs) -> dict:
    return {
        **os.environ, "DATABASE_URL": database_url(), "SECRET_KEY": settings.SECRET_KEY,
        "DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_DEPLOY_DIR": str(settings.PORTAL_DEPLOY_DIR),
        "PORTAL_DEPLOY_ROOT": str(settings.PORTAL_DEPLOY_ROOT), "PORTAL_WORKERS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


class Worker:
    """`manage.py qcluster` in its own process group, as `make run` starts it."""

    def __init__(self, deploy_dirs):
        self.log = open(Path(deploy_dirs) / "qcluster.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"], cwd=ROOT, env=worker_env(deploy_dirs),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def kill(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture
def worker_factory(deploy_dirs):
    workers = []

    def start():
        workers.append(Worker(deploy_dirs))
        return workers[-1]

    yield start
    for w in workers:
        if w.process.poll() is None:
            w.kill(signal.SIGTERM)



def test_cancel_while_queued_and_while_running(transactional_audit_db, world, deploy_dirs, artifact, playbook_repo):
    repo, _ = playbook_repo
    use_repo(world.qa, repo, "slow.yml")
    queued = services.deployment_request(actor=world.ci, release=register(world, artifact, "4.0.0"),
                                         environment=world.qa)
    services.deployment_cancel(actor=world.ci, deployment_id=queued.pk)
    assert state_of(queued.pk) == State.CANCELLED
    assert deploy.execute(queued.pk) is None  # a cancelled deployment is never run

    running = services.deployment_request(actor=world.ci, release=register(world, artifact, "4.0.1"),
                                          environment=world.qa)
    outcome = {}

    def run():
        try:
            outcome["state"] = deploy.execute(running.pk)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: running_long_step(running.pk), what="the long step to start")
    pid = Deployment.objects.get(pk=running.pk).progress["pid"]
    assert alive(pid)
    services.deployment_cancel(actor=world.ci, deployment_id=running.pk, comment="stop it")
    thread.join(timeout=60)

    assert outcome["state"] == State.CANCELLED and state_of(running.pk) == State.CANCELLED
    assert wait_for(lambda: not alive(pid), timeout=10, what="the playbook process to die")
    actions = list(AuditEvent.objects.filter(object_id=str(running.pk), object_type="environments.deployment")
                   .values_list("action", flat=True))
    assert actions[-2:] == ["deployment.cancel_request", "deployment.finish"]


def test_worker_killed_mid_deploy_leaves_an_interrupted_deployment(
    transactional_audit_db, world, deploy_dirs, artifact, playbook_repo, worker_factory
):
    repo, _ = playbook_repo
    use_repo(world.qa, repo, "slow.yml")
    worker = worker_factory()
    old = services.deployment_request(actor=world.ci, release=register(world, artifact, "5.0.0"),
                                      environment=world.qa)
    wait_for(lambda: running_long_step(old.pk), timeout=90, what="the worker to run the playbook")
    pid = Deployment.objects.get(pk=old.pk).progress["pid"]
    assert alive(pid)

    worker.kill(signal.SIGKILL)  # the worker dies; the playbook it started lives on
    assert alive(pid) and state_of(old.pk) == State.RUNNING
    with pytest.raises(PolicyRefusal) as busy:
        services.deployment_request(actor=world.ci, release=register(world, artifact, "5.0.1"),
                                    environment=world.qa)
    assert busy.value.refusal.code == "ENVIRONMENT_BUSY"  # never two at once

    time.sleep(3)
    reap = subprocess.run([sys.executable, "manage.py", "reap_deployments", "--stale-after", "2"], cwd=ROOT,
                          env=worker_env(deploy_dirs), capture_output=True, text=True, timeout=60)
    assert reap.returncode == 0 and f"[{old.pk}]" in reap.stdout, reap.stderr
    assert state_of(old.pk) == State.INTERRUPTED
    assert wait_for(lambda: not alive(pid), timeout=10, what="the leftover playbook to be killed")
    assert tasks.run_deployment(old.pk) is None  # a re-delivered task never re-runs it

    use_repo(world.qa, repo, "quick.yml")
    new = services.deployment_request(actor=world.ci, release=register(world, artifact, "5.0.2"),
                                      environment=world.qa)
    worker_factory()
    wait_for(lambda: state_of(new.pk) == State.SUCCEEDED, timeout=90, what="the new deployment to run")
    assert state_of(old.pk) == State.INTERRUPTED
    assert AuditEvent.objects.filter(action="deployment.start", object_id=str(old.pk)).count() == 1
    assert chain.verify().ok


def test_qcluster_runs_only_the_portals_tasks(transactional_audit_db, world, deploy_dirs, tmp_path,
                                              worker_factory):
    """Tasks naming any function, as a resubmit from django-q's admin pages or a row written into the
    queue would: the real cluster (with the configured broker) refuses and audits them, never runs
    them, and still runs the portal's own. (Schedules: tests/environments/test_tasks.py.)"""
    victim, marker = tmp_path / "victim", tmp_path / "pwned"
    victim.write_text("keep me")
    async_task("os.remove", str(victim))
    async_task("builtins.exec", f"open({str(marker)!r}, 'w').write('pwned')")
    async_task("environments.tasks.expire_pending_approvals")
    worker_factory()

    wait_for(lambda: AuditEvent.objects.filter(action="task.refused").count() == 2, timeout=90,
             what="both tasks to be refused")
    wait_for(lambda: Task.objects.filter(func="environments.tasks.expire_pending_approvals", success=True).exists(),
             timeout=90, what="the portal's own task to run")
    assert victim.exists() and not marker.exists()
    assert set(AuditEvent.objects.filter(action="task.refused").values_list("data__func", flat=True)) == {
        "os.remove", "builtins.exec"}
    assert not Task.objects.filter(func__in=["os.remove", "builtins.exec"]).exists()
    assert chain.verify().ok
