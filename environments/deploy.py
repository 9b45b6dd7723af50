"""Deploy execution: one queued deployment, one ansible-runner run.

`execute` claims the deployment (queued -> running) or does nothing, prepares a private data
directory (playbooks: the bundled ones or a Git clone at the environment's ref; inventory; the
release's extravars), runs the playbook, stores each runner event as it comes (so progress is
visible while it runs), keeps a heartbeat, honours cancel requests, and records the result.
If the worker dies, `reap_stale` (on worker start and on a schedule) ends the deployment
`interrupted` and kills the playbook process it left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import ansible_runner
from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from audit.actors import Actor
from core.decisions import NotFound, PolicyRefusal
from core.times import iso
from environments import services
from environments.models import Deployment, DeploymentEvent, Environment

logger = logging.getLogger(__name__)
State = Deployment.State
BUNDLED_PLAYBOOKS = Path(__file__).resolve().parent / "playbooks"
ENGINE = Actor.system(via="task")
RESULT_EVENTS = {
    "runner_on_ok": "ok", "runner_on_failed": "failed", "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}
MAX_STDOUT = 20_000
MAX_MESSAGE = 600


def _venv_bin() -> str:
    return str(Path(sys.executable).parent)


def bundled_playbooks_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in BUNDLED_PLAYBOOKS.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(BUNDLED_PLAYBOOKS)).encode() + b"\0" + path.read_bytes() + b"\0")
    return "bundled:" + digest.hexdigest()


def prepare_project(environment: Environment, project_dir: Path) -> str:
    """Put the playbooks into project_dir; returns what identifies them (commit or bundled digest)."""
    if not environment.playbook_repo:
        shutil.copytree(BUNDLED_PLAYBOOKS, project_dir, ignore=shutil.ignore_patterns("__pycache__"))
        return bundled_playbooks_digest()

    def git(*args, cwd=None):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                              timeout=300).stdout.strip()

    git("clone", "--quiet", "--no-checkout", environment.playbook_repo, str(project_dir))
    git("checkout", "--quiet", "--detach", environment.playbook_ref or "HEAD", cwd=project_dir)
    return git("rev-parse", "HEAD", cwd=project_dir)


def local_inventory() -> str:
    return f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n"


def prepare_inventory(environment: Environment, inventory_dir: Path) -> str:
    text = environment.inventory.strip()
    if text and "\n" not in text and Path(text).exists():
        return text
    inventory_dir.mkdir(parents=True, exist_ok=True)
    path = inventory_dir / "hosts"
    path.write_text((text + "\n") if text else local_inventory())
    return str(path)


def extravars_for(deployment: Deployment) -> dict:
    release = deployment.release
    return {
        "application": release.application.name,
        # Not `environment`: that is an Ansible play keyword, and a variable of that name makes Ansible
        # warn ("reserved name") in every deployment log.
        "environment_name": deployment.environment.name,
        "version": release.version,
        "artifact_url": release.artifact_url,
        "artifact_sha256": release.artifact_sha256,
        "deployment_id": deployment.pk,
        "deploy_root": str(settings.PORTAL_DEPLOY_ROOT),
    }


@dataclass
class Progress:
    """What a person watching sees: hosts done of total, current task, failed host, per-host state."""

    deployment_id: int
    hosts_total: int = 0
    current_task: str = ""
    current_host: str = ""
    failed_host: str = ""
    failed_task: str = ""
    failed_message: str = ""  # Ansible's own words for the first failure
    pid: int | None = None
    hosts: dict[str, str] = field(default_factory=dict)  # host -> upgrading | done | failed | stopped
    runner_status: str = ""
    group_sizes: dict[str, int] = field(default_factory=dict)  # inventory pattern -> host count

    def as_dict(self) -> dict:
        done = sum(1 for s in self.hosts.values() if s == "done")
        return {
            "hosts_total": self.hosts_total, "hosts_done": done, "current_task": self.current_task,
            "current_host": self.current_host, "failed_host": self.failed_host, "failed_task": self.failed_task,
            "failed_message": self.failed_message, "hosts": self.hosts,
            "pid": self.pid, "runner_status": self.runner_status,
        }

    def stop(self) -> None:
        """The run ended without finishing a host it was on (cancelled, timed out, killed, failed to
        start the next task): that host is left as it was, which the page says."""
        for host, state in self.hosts.items():
            if state == "upgrading":
                self.hosts[host] = "stopped"
        self.current_task = ""

    def on_event(self, event: dict) -> None:
        data = event.get("event_data") or {}
        kind = event.get("event", "")
        if self.pid is None and event.get("pid"):
            self.pid = event["pid"]
        if kind == "playbook_on_play_start":
            # Ansible starts the play again for each batch of a serial play (a rolling upgrade's one host
            # at a time): the hosts of the batch before are done, unless they failed. Hosts of one batch
            # run side by side, so another host answering says nothing about the one before.
            for host, state in self.hosts.items():
                if state == "upgrading":
                    self.hosts[host] = "done"
            pattern = data.get("play_pattern") or "all"
            self.hosts_total = max(self.hosts_total, self.group_sizes.get(pattern, self.group_sizes.get("all", 0)))
        elif kind == "playbook_on_task_start":
            self.current_task = data.get("task", "")
        elif kind in RESULT_EVENTS:
            host = data.get("host", "")
            if host:
                self.current_host = host
            if host and self.hosts.get(host) not in ("failed",):
                self.hosts[host] = "upgrading"
            if RESULT_EVENTS[kind] in ("failed", "unreachable") and not data.get("ignore_errors"):
                self.hosts[host] = "failed"
                if not self.failed_host:
                    self.failed_host, self.failed_task = host, data.get("task", "") or self.current_task
                    self.failed_message = ansible_message(data.get("res"))
        elif kind == "playbook_on_stats":
            failed = set(data.get("failures") or {}) | set(data.get("dark") or {})
            for host in set(data.get("ok") or {}) | failed:
                self.hosts[host] = "failed" if host in failed else "done"
            self.current_task = ""


def ansible_message(result) -> str:
    """What Ansible said about a failed task: its `msg`, with the command's error output when the
    message alone says little ("non-zero return code"). One line, at most MAX_MESSAGE characters."""
    if not isinstance(result, dict):
        return ""
    message = result.get("msg") or ""
    if not isinstance(message, str):
        message = str(message)
    stderr = str(result.get("stderr") or "").strip()
    if stderr and stderr not in message:
        message = f"{message}: {stderr}" if message else stderr
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


def result_detail(status: str, rc, progress: dict) -> str:
    """The result a person reads: on failure the host, the task and Ansible's message first, then the
    runner's status and how far it got."""
    counts = (f"ansible-runner {status}, rc {rc}; {progress['hosts_done']} of {progress['hosts_total']} "
              "hosts done")
    if not progress.get("failed_host"):
        return counts
    failure = f"Failed on {progress['failed_host']}"
    if progress.get("failed_task"):
        failure += f", task \"{progress['failed_task']}\""
    if progress.get("failed_message"):
        failure += f": {progress['failed_message']}"
    return f"{failure} ({counts})"


def inventory_group_sizes(inventory: str) -> dict[str, int]:
    """Hosts per inventory group, read with Ansible's own inventory parser (for hosts_total)."""
    manager = InventoryManager(loader=DataLoader(), sources=[inventory])
    sizes = {name: len(group.get_hosts()) for name, group in manager.groups.items()}
    sizes["all"] = len(manager.get_hosts("all"))
    return sizes


class Watcher:
    """ansible-runner callbacks. They never raise: a failing write must not kill the run."""

    HEARTBEAT_EVERY = 2.0

    def __init__(self, deployment_id: int, timeout: float | None = None):
        self.deployment_id = deployment_id
        self.progress = Progress(deployment_id)
        self.cancelled = self.timed_out = False
        self._last_beat = 0.0
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def event_handler(self, event: dict) -> bool:
        try:
            self.progress.on_event(event)
            data = event.get("event_data") or {}
            kind = event.get("event", "")
            DeploymentEvent.objects.create(
                deployment_id=self.deployment_id, counter=event.get("counter", 0), event=kind[:64],
                host=(data.get("host") or "")[:255], task=(data.get("task") or "")[:500],
                status=RESULT_EVENTS.get(kind, ""), stdout=(event.get("stdout") or "")[:MAX_STDOUT],
            )
            Deployment.objects.filter(pk=self.deployment_id).update(
                progress=self.progress.as_dict(), heartbeat_at=timezone.now()
            )
        except Exception:  # noqa: BLE001 - never break the run for a progress write
            logger.exception("could not store event of deployment %s", self.deployment_id)
        return True

    def status_handler(self, status: dict, runner_config=None) -> None:
        self.progress.runner_status = status.get("status", "")

    def cancel_callback(self) -> bool:
        try:
            now = time.monotonic()
            if now - self._last_beat >= self.HEARTBEAT_EVERY:
                self._last_beat = now
                Deployment.objects.filter(pk=self.deployment_id).update(heartbeat_at=timezone.now())
                self.cancelled = Deployment.objects.filter(
                    pk=self.deployment_id, cancel_requested_at__isnull=False
                ).exists()
            if self._deadline is not None and now >= self._deadline:
                self.timed_out = True  # PORTAL_DEPLOY_TIMEOUT: stopped here, as a cancel is
            if self.cancelled or self.timed_out:
                # Before ansible-runner stops the playbook: once it is gone, its workers and their tasks
                # are re-parented and can no longer be told from anything else on the host.
                kill_run(self.progress.pid)
            return self.cancelled or self.timed_out
        except Exception:  # noqa: BLE001 - the callback must never raise
            logger.exception("cancel check failed for deployment %s", self.deployment_id)
            return False


def _runner_outcome(status: str, rc: int | None, cancelled: bool, timed_out: bool = False) -> str:
    if timed_out or status == "timeout":
        return State.FAILED
    if cancelled or status == "canceled":
        return State.CANCELLED
    if status == "successful" and rc == 0:
        return State.SUCCEEDED
    return State.FAILED


def _children() -> dict[int, list[int]]:
    """Every process's children on this host, from /proc (a process's parent is the 4th field of its stat)."""
    children = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children[parent].append(int(entry.name))
    return children


def kill_run(pid: int | None) -> int:
    """Kill a deployment's ansible-playbook and every process under it: Ansible's task workers (each
    starts a session of its own, out of the playbook's process group) and what their tasks run. Only
    while the playbook still lives, and only if it is an Ansible process (a recycled pid is left alone).
    A service a task started and detached (a daemon, re-parented away from the run) is not under it and
    keeps running, as the playbook meant. A few passes, since a process may start another meanwhile.
    Returns how many processes were killed. (A task on a remote host over SSH is that host's to stop.)"""
    if not pid:
        return 0
    try:
        if b"ansible" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return 0
    except OSError:
        return 0
    killed = 0
    for _ in range(3):
        children, tree, todo = _children(), [], [pid]
        while todo:
            current = todo.pop()
            tree.append(current)
            todo.extend(children.get(current, ()))
        alive = False
        for member in tree:
            try:
                os.kill(member, signal.SIGKILL)
                killed += 1
                alive = True
            except (ProcessLookupError, PermissionError):
                pass
        if not alive:
            break
        time.sleep(0.05)
    return killed


def execute(deployment_id: int) -> str | None:
    """Run one started deployment. Returns its final state, or None if this engine did not claim it
    (not running, or another engine has it, or no such deployment: nothing done)."""
    try:
        deployment = services.deployment_start(deployment_id=deployment_id, engine=services.this_engine(),
                                               actor=ENGINE)
    except NotFound:  # a task older than the database (restored from a backup, or a broker shared by mistake)
        logger.warning("deployment %s does not exist in this database; task ignored", deployment_id)
        return None
    if deployment is None:
        logger.info("deployment %s is not waiting for an engine; nothing to do", deployment_id)
        return None
    watcher = Watcher(deployment_id, timeout=settings.PORTAL_DEPLOY_TIMEOUT)
    private_dir = Path(settings.PORTAL_DEPLOY_DIR) / str(deployment_id)
    outcome, detail, extra = State.FAILED, "", {}
    try:
        if private_dir.exists():
            shutil.rmtree(private_dir)
        private_dir.mkdir(parents=True)
        commit = prepare_project(deployment.environment, private_dir / "project")
        services.deployment_record_playbook(deployment_id=deployment_id, playbook_commit=commit)
        inventory = prepare_inventory(deployment.environment, private_dir / "inventory")
        watcher.progress.group_sizes = inventory_group_sizes(inventory)
        runner = ansible_runner.run(
            private_data_dir=str(private_dir), playbook=deployment.environment.playbook, inventory=inventory,
            extravars=extravars_for(deployment), ident="run", quiet=True, suppress_env_files=True,
            envvars={"ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                     "ANSIBLE_DEPRECATION_WARNINGS": "0",
                     "PATH": _venv_bin() + os.pathsep + os.environ.get("PATH", "")},
            # The watcher stops the run at PORTAL_DEPLOY_TIMEOUT (with what runs under it); ansible-runner's
            # own timeout is only the backstop of a callback that no longer runs.
            timeout=settings.PORTAL_DEPLOY_TIMEOUT + 60, event_handler=watcher.event_handler,
            status_handler=watcher.status_handler, cancel_callback=watcher.cancel_callback,
        )
        outcome = _runner_outcome(runner.status, runner.rc, watcher.cancelled, watcher.timed_out)
        p = watcher.progress.as_dict()
        detail = result_detail(runner.status, runner.rc, p)
        if watcher.timed_out:
            detail = (f"Stopped after PORTAL_DEPLOY_TIMEOUT ({settings.PORTAL_DEPLOY_TIMEOUT} s), with every "
                      f"process under the playbook ({detail})")
        extra = {"runner_status": runner.status, "rc": runner.rc, "hosts": p["hosts"], "playbook_commit": commit}
    except Exception as exc:  # noqa: BLE001 - any failure ends the deployment `failed`, with the reason
        logger.exception("deployment %s failed to run", deployment_id)
        detail = f"The deploy job failed before the playbook finished: {type(exc).__name__}: {exc}"
    finally:
        kill_run(watcher.progress.pid)  # what a failure or a timeout left running under the playbook
        watcher.progress.stop()
        Deployment.objects.filter(pk=deployment_id).update(progress=watcher.progress.as_dict())
    finished = services.deployment_record_result(
        deployment_id=deployment_id, state=outcome, detail=detail[:2000], actor=ENGINE, extra=extra
    )
    return finished.state


def _engine_gone(engine: str, host: str) -> bool:
    """Whether the worker process `engine` (host:pid) of this host no longer runs."""
    name, _, pid = engine.rpartition(":")
    if name != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user has that number now: wait for the heartbeat to age
    try:  # a zombie (its parent killed too, not yet reaped) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def reap_stale(*, stale_after: float | None = None) -> list[int]:
    """End `interrupted` every running deployment whose deploy job stopped giving signs of life.

    On the host whose engine ran it, what its run left behind is killed first (see kill_run); then the
    result is recorded, which starts the next waiting deployment. Another host's processes are that
    host's reaper's to kill: each reap also kills what is left of this host's runs that another host's
    reaper ended (its worker runs one at start and every minute). A started deployment that no engine
    took up (its task was lost) is handed over again.
    """
    stale_after = settings.PORTAL_DEPLOY_STALE_SECONDS if stale_after is None else stale_after
    cutoff = timezone.now() - timedelta(seconds=stale_after)
    host = socket.gethostname()
    reaped = []
    # Stale, or run by a worker process of this host that is gone and silent for PORTAL_DEPLOY_GONE_SECONDS (a
    # worker killed and started again need not wait the whole stale time). The heartbeat still has to
    # have stopped: a worker of another PID namespace with the same host name beats every 2 seconds.
    gone_cutoff = timezone.now() - timedelta(seconds=min(stale_after, settings.PORTAL_DEPLOY_GONE_SECONDS))
    candidates = Deployment.objects.filter(Q(heartbeat_at__lt=cutoff) | Q(engine__startswith=f"{host}:",
                                                                         heartbeat_at__lt=gone_cutoff),
                                           state=State.RUNNING)
    for deployment in candidates:
        fresh = deployment.heartbeat_at is not None and deployment.heartbeat_at >= cutoff
        if fresh and not _engine_gone(deployment.engine, host):
            continue
        if not deployment.engine:
            services.deployment_redeliver(deployment_id=deployment.pk, stale_before=cutoff)
            continue
        if deployment.engine.rsplit(":", 1)[0] == host:
            kill_run((deployment.progress or {}).get("pid"))
        try:
            services.deployment_record_result(
                deployment_id=deployment.pk, state=State.INTERRUPTED, actor=ENGINE,
                detail="The deploy job stopped (worker died); the deployment was not re-run.",
                extra={"engine": deployment.engine, "heartbeat_at": iso(deployment.heartbeat_at)},
            )
        except PolicyRefusal:
            continue  # it ended meanwhile
        reaped.append(deployment.pk)
    since = timezone.now() - timedelta(seconds=settings.PORTAL_DEPLOY_TIMEOUT + 600)
    for engine, progress in Deployment.objects.filter(
            state=State.INTERRUPTED, finished_at__gte=since, engine__startswith=f"{host}:").values_list(
            "engine", "progress"):
        if engine.rsplit(":", 1)[0] == host:
            kill_run((progress or {}).get("pid"))  # nothing, unless its playbook still lives here
    return reaped
