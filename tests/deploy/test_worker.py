"""The deploy engine under a real django-q2 worker (ORM broker by default; Redis with
PORTAL_QUEUE_BROKER=redis): cancel, a worker killed with SIGKILL, one deployment at a time."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.db import connections
from django_q.models import Task
from django_q.tasks import async_task

from audit import chain
from audit.models import AuditEvent
from environments import deploy, services, tasks
from environments.models import Deployment
from tests.conftest import person
from tests.deploy.conftest import ROOT, alive, register, running_long_step, state_of, use_repo, wait_for, worker_env

State = Deployment.State


def sleeps_under(pid: int) -> list[int]:
    """The `sleep` processes under a process (read from /proc: each process's parent and command line)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes()
        except OSError:
            continue

    def under(p):
        while p > 1:
            p = parents.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p, command in commands.items() if command.startswith(b"sleep\0") and under(p)]


def test_cancel_while_queued_and_while_running(transactional_audit_db, world, deploy_dirs, artifact, playbook_repo):
    repo, _ = playbook_repo
    use_repo(world.qa, repo, "slow.yml")
    running = services.deployment_request(actor=person(world.alice), release=register(world, artifact, "4.0.1"),
                                          environment=world.qa)
    queued = services.deployment_request(actor=person(world.alice), release=register(world, artifact, "4.0.0"),
                                         environment=world.qa)
    assert state_of(queued.pk) == State.QUEUED  # waits behind the first
    services.deployment_cancel(actor=world.ci, deployment_id=queued.pk)
    assert state_of(queued.pk) == State.CANCELLED
    assert deploy.execute(queued.pk) is None  # a cancelled deployment is never run

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
    long_step = wait_for(lambda: sleeps_under(pid), what="the long step's own process")
    assert alive(pid)
    services.deployment_cancel(actor=world.ci, deployment_id=running.pk, comment="stop it")
    thread.join(timeout=60)

    assert outcome["state"] == State.CANCELLED and state_of(running.pk) == State.CANCELLED
    assert wait_for(lambda: not alive(pid), timeout=10, what="the playbook process to die")
    # and what the task started, under Ansible's worker, which is not in the playbook's process group
    assert wait_for(lambda: not any(alive(p) for p in long_step), timeout=10, what="the task's process to die")
    actions = list(AuditEvent.objects.filter(object_id=str(running.pk), object_type="environments.deployment")
                   .values_list("action", flat=True))
    assert actions[-2:] == ["deployment.cancel_request", "deployment.finish"]
    ended = Deployment.objects.get(pk=running.pk)
    detail = ended.result_detail
    assert detail.startswith("Cancelled by ci:ci while it ran: stop it. The run stopped: "), detail
    assert "upgrading" not in ended.progress["hosts"].values() and ended.progress["current_task"] == ""


def test_a_playbook_past_its_timeout_is_stopped_with_what_runs_under_it(
    transactional_audit_db, world, deploy_dirs, artifact, playbook_repo, settings
):
    settings.PORTAL_DEPLOY_TIMEOUT = 6
    repo, _ = playbook_repo
    use_repo(world.qa, repo, "slow.yml")
    running = services.deployment_request(actor=world.ci, release=register(world, artifact, "4.1.0"),
                                          environment=world.qa)
    seen = {}

    def watch():
        try:
            wait_for(lambda: running_long_step(running.pk), what="the long step to start")
            seen["pid"] = pid = Deployment.objects.get(pk=running.pk).progress["pid"]
            seen["sleeps"] = wait_for(lambda: sleeps_under(pid), what="the long step's own process")
        finally:
            connections.close_all()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert deploy.execute(running.pk) == State.FAILED  # the long step sleeps 60 s
    watcher.join(timeout=30)
    deployment = Deployment.objects.get(pk=running.pk)
    assert deployment.result_detail.startswith("Stopped after PORTAL_DEPLOY_TIMEOUT (6 s)"), deployment.result_detail
    assert wait_for(lambda: not any(alive(p) for p in [seen["pid"], *seen["sleeps"]]), timeout=10,
                    what="the playbook and its task's process to die")


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
    long_step = wait_for(lambda: sleeps_under(pid), what="the long step's own process")
    assert alive(pid)

    worker.kill(signal.SIGKILL)  # the worker dies; the playbook it started lives on
    assert alive(pid) and state_of(old.pk) == State.RUNNING
    new = services.deployment_request(actor=world.ci, release=register(world, artifact, "5.0.1"),
                                      environment=world.qa)
    assert state_of(new.pk) == State.QUEUED  # it waits: never two at once, and never refused for it
    use_repo(world.qa, repo, "quick.yml")

    # the worker starts again on this machine: its reaper need not wait for the heartbeat to age (120 s),
    # the process that ran the deployment is gone
    engine = int(Deployment.objects.get(pk=old.pk).engine.rsplit(":", 1)[1])
    wait_for(lambda: not alive(engine), timeout=10, what="the worker's process to be gone")
    time.sleep(2)  # and silent for PORTAL_DEPLOY_GONE_SECONDS (1 here, 30 by default; stale: 120)
    reap = subprocess.run([sys.executable, "manage.py", "reap_deployments"], cwd=ROOT,
                          env={**worker_env(deploy_dirs), "PORTAL_DEPLOY_GONE_SECONDS": "1"},
                          capture_output=True, text=True, timeout=60)
    assert reap.returncode == 0 and f"[{old.pk}]" in reap.stdout, reap.stderr
    assert state_of(old.pk) == State.INTERRUPTED
    assert state_of(new.pk) == State.RUNNING  # the interrupted one's end started the next
    assert wait_for(lambda: not alive(pid), timeout=10, what="the leftover playbook to be killed")
    assert wait_for(lambda: not any(alive(p) for p in long_step), timeout=10, what="its task's process to die")
    assert tasks.run_deployment(old.pk) is None  # a re-delivered task never re-runs it

    worker_factory()
    wait_for(lambda: state_of(new.pk) == State.SUCCEEDED, timeout=90, what="the waiting deployment to run")
    assert state_of(old.pk) == State.INTERRUPTED
    assert AuditEvent.objects.filter(action="deployment.claim", object_id=str(old.pk)).count() == 1
    assert chain.verify().ok


def test_a_started_deployment_whose_task_was_lost_still_runs_once(
    transactional_audit_db, world, deploy_dirs, artifact, worker_factory
):
    """A worker killed right after one deployment finished: the next one had started, its task is gone."""
    from django_q.brokers import get_broker

    first = services.deployment_request(actor=world.ci, release=register(world, artifact, "5.1.0"),
                                        environment=world.qa)
    second = services.deployment_request(actor=person(world.alice), release=register(world, artifact, "5.1.1"),
                                         environment=world.qa)
    services.deployment_start(deployment_id=first.pk, engine="gone:1")
    services.deployment_record_result(deployment_id=first.pk, state=State.SUCCEEDED)
    assert state_of(second.pk) == State.RUNNING
    get_broker().purge_queue()  # the tasks died with the worker

    time.sleep(2)
    reap = subprocess.run([sys.executable, "manage.py", "reap_deployments", "--stale-after", "1"], cwd=ROOT,
                          env=worker_env(deploy_dirs), capture_output=True, text=True, timeout=60)
    assert reap.returncode == 0, reap.stderr
    assert state_of(second.pk) == State.RUNNING  # never run, so handed over again rather than interrupted
    worker_factory()
    wait_for(lambda: state_of(second.pk) == State.SUCCEEDED, timeout=90, what="the waiting deployment to run")
    assert AuditEvent.objects.filter(action="deployment.claim", object_id=str(second.pk)).count() == 1
    assert AuditEvent.objects.filter(action="deployment.redeliver", object_id=str(second.pk)).count() == 1
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


def test_a_run_another_hosts_reaper_ended_is_killed_by_its_own_hosts_next_reap(world, deploy_dirs):
    """A reaper on another machine ends a stale deployment `interrupted` but cannot touch this host's
    processes; this host's next reap (at worker start, then every minute) kills what is left of the run."""
    import socket

    deployment = services.deployment_request(actor=world.ci, release=world.release(), environment=world.qa)
    # a playbook left behind: an Ansible-named process with a task under it
    playbook = subprocess.Popen([sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '120'])",
                                 "ansible-playbook"])
    try:
        task = wait_for(lambda: sleeps_under(playbook.pid), what="the task under the playbook")
        services.deployment_start(deployment_id=deployment.pk, engine=f"{socket.gethostname()}:4242")
        Deployment.objects.filter(pk=deployment.pk).update(progress={"pid": playbook.pid})
        services.deployment_record_result(deployment_id=deployment.pk, state=State.INTERRUPTED)  # elsewhere
        assert alive(playbook.pid) and all(alive(p) for p in task)
        deploy.reap_stale()
        playbook.wait(timeout=10)
        assert wait_for(lambda: not any(alive(p) for p in task), timeout=10, what="the task to die")
    finally:
        playbook.kill()
