"""Fixtures for the deploy engine: real artifacts on disk, real ansible-runner, real HTTP peers."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from environments.models import Deployment, DeploymentEvent, Environment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def deploy_dirs(tmp_path, settings):
    settings.PORTAL_DEPLOY_DIR = tmp_path / "deployments"
    settings.PORTAL_DEPLOY_ROOT = tmp_path / "deploy"
    return tmp_path


@pytest.fixture
def artifact(tmp_path):
    """A release artifact on disk and its real SHA-256."""

    def make(version: str, content: bytes | None = None) -> tuple[str, str]:
        path = tmp_path / "artifacts" / f"mac-{version}.tar.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content or f"MAC {version}\n".encode())
        return path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()

    return make


def register(world, artifact, version, *, sha256=None):
    from releases.services import release_register
    from tests.conftest import SYSTEM

    url, real_sha = artifact(version)
    release, _ = release_register(
        actor=SYSTEM, application="MAC", version=version, build=world.build().number, artifact_url=url,
        artifact_sha256=sha256 or real_sha, issue_keys=["BIZPLAT-7"], implementers=["alice@example.com"],
    )
    return release


@pytest.fixture
def playbook_repo(tmp_path):
    """A local Git repository of playbooks (the way an environment can take its deploy scripts)."""
    repo = tmp_path / "playbooks-repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "--quiet", "--initial-branch=main")
    git("config", "user.email", "ops@example.com")
    git("config", "user.name", "ops")
    (repo / "slow.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Prepare\n      ansible.builtin.debug:\n        msg: 'deploying {{ version }}'\n"
        "    - name: Long step\n      ansible.builtin.command: sleep {{ sleep_seconds | default(60) }}\n"
    )
    (repo / "quick.yml").write_text(
        "- hosts: all\n  gather_facts: false\n  tasks:\n"
        "    - name: Say which version\n      ansible.builtin.debug:\n        msg: '{{ application }} {{ version }}'\n"
    )
    git("add", ".")
    git("commit", "--quiet", "-m", "playbooks")
    return repo, git("rev-parse", "HEAD")


def use_repo(environment: Environment, repo: Path, playbook: str, ref: str = "main"):
    from environments.services import environment_save
    from tests.conftest import SYSTEM

    environment.playbook_repo, environment.playbook_ref, environment.playbook = str(repo), ref, playbook
    return environment_save(actor=SYSTEM, environment=environment, changed=["playbook_repo", "playbook"])


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.deploy)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`manage.py runserver` against the test database, in its own process group."""

    def __init__(self, deploy_dirs):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(deploy_dirs) / "runserver.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{self.port}"], cwd=ROOT,
            env={**worker_env(deploy_dirs), "PORTAL_DEBUG": "1"}, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def answers():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(answers, timeout=60, what="the server to listen")

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=20)
        self.log.close()


@pytest.fixture
def server(deploy_dirs):
    running = Server(deploy_dirs)
    yield running
    running.stop()
