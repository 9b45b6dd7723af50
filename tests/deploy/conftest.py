"""Fixtures for the deploy engine: real artifacts on disk, real ansible-runner, real HTTP peers."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from environments.models import Environment


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
