import csv
import os
import pwd
import socket
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from access.models import ApiToken
from access.services import token_actor, token_revoke
from audit import chain
from audit.models import AuditEvent
from environments.models import Deployment, Environment
from environments.policy import environment_grants
from evidence import reconcile
from releases.models import Application, Release
from tests.conftest import SYSTEM
from tests.processes import production_env


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_mode(settings):
    settings.DEMO = True


def test_demo_data_refuses_outside_demo_mode(db, settings):
    settings.DEMO = False
    with pytest.raises(CommandError, match="only in demo mode"):
        run("demo_data")
    assert not get_user_model().objects.filter(username="admin").exists()
    assert not AuditEvent.objects.exists()


def test_demo_data_command_exits_non_zero_outside_demo_mode(tmp_path):
    env = production_env(tmp_path, SECRET_KEY="x" * 60)
    done = subprocess.run([sys.executable, "manage.py", "demo_data"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "only in demo mode (PORTAL_DEMO=1)" in done.stderr


def test_demo_data_builds_the_demo_and_twice_changes_nothing(db, demo_mode):
    run("demo_data")
    events = AuditEvent.objects.count()
    run("demo_data")
    assert AuditEvent.objects.count() == events
    production = Environment.objects.get(application__name="MAC", name="Production")
    assert (production.restricted, production.required_approvals, production.promotes_from.name) == (
        True, 1, "Staging")
    assert Environment.objects.get(name="QA").auto_deploy
    users = get_user_model().objects
    assert environment_grants(users.get(username="bob"), production) == {"deploy_environment",
                                                                         "approve_environment"}
    assert environment_grants(users.get(username="alice"), production) == set()
    assert environment_grants(users.get(username="dave"), production) == set()
    assert users.get(username="alice").email == "alice@example.com"
    assert users.get(username="dave").has_perm("audit.export_reports")
    assert not users.get(username="dave").has_perm("environments.change_deployment")
    assert not users.get(username="alice").has_perm("audit.export_reports")
    states = {(d.release.version, d.environment.name): d.state  # the walk-through's releases (not the history)
              for d in Deployment.objects.select_related("release", "environment").exclude(
                  release__version__startswith="0.")}
    assert states == {  # the demo's recorded past, and what it leaves to the worker
        ("1.0.0", "QA"): "succeeded", ("1.0.0", "Staging"): "succeeded", ("1.0.0", "Production"): "succeeded",
        ("1.1.0", "QA"): "succeeded", ("1.1.0", "Staging"): "succeeded",
        ("1.2.0", "QA"): "succeeded", ("1.2.0", "Staging"): "succeeded", ("1.2.0", "Production"): "awaiting_approval",
        ("1.3.0", "QA"): "running", ("1.3.1", "QA"): "queued",
    }
    production = Deployment.objects.get(release__version="1.0.0", environment__name="Production")
    assert (production.requested_by.username, [a.approver.username for a in production.approvals.all()]) == (
        "bob", ["carol"])
    assert Deployment.objects.get(release__version="1.2.0", environment__name="Production").requested_by_label == "bob"
    assert sorted(Release.objects.get(version="1.1.0").implementers.values_list("identity", flat=True)) == [
        "alice@example.com", "bob@example.com"]  # bob implemented it: he may not request it
    assert Application.objects.get(name="MAC").issue_url("BIZPLAT-104") == "https://jira.example.com/browse/BIZPLAT-104"
    assert chain.verify().ok
    assert list(reconcile.accounts()) == []  # every account, flag and permission made through the portal


def test_create_admin_makes_the_first_administrator_on_the_audit_chain(db, monkeypatch, tmp_path):
    """A new installation's first account, made through the portal: the exceptions report finds nothing
    of it to question (createsuperuser's account would be made outside the portal)."""
    monkeypatch.setattr(sys, "stdin", StringIO("a long pass phrase\n"))
    assert run("create_admin", "root", "--email", "root@example.com").strip() == "Administrator root created."
    root = get_user_model().objects.get(username="root")
    assert (root.is_superuser, root.is_staff, root.email) == (True, True, "root@example.com")
    assert Client().login(username="root", password="a long pass phrase")
    event = AuditEvent.objects.get(action="user.create")
    assert (event.via, event.data["user"], event.data["is_superuser"]) == ("command", "root", True)
    assert list(reconcile.accounts()) == [] and chain.verify().ok
    monkeypatch.setattr(sys, "stdin", StringIO("another one\n"))
    with pytest.raises(CommandError, match="There is an account root already"):
        run("create_admin", "root")
    monkeypatch.setattr(sys, "stdin", StringIO("\n"))
    with pytest.raises(CommandError, match="An empty password is not accepted"):
        run("create_admin", "second")
    monkeypatch.setattr(sys, "stdin", StringIO("second2026\n"))
    with pytest.raises(CommandError, match="The password is not accepted: .*too short"):
        run("create_admin", "second")
    assert not get_user_model().objects.filter(username="second").exists()
    get_user_model().objects.create_superuser("outside", password="x")  # what createsuperuser does
    assert {m.sentence() for m in reconcile.accounts()} == {
        "account outside: is_superuser is 'True' in the table, 'no user.create event' in the audit chain",
        "account outside: is_staff is 'True' in the table, 'no user.create event' in the audit chain"}
    # an installation's administrator made so before this release: adopted on the record, with the reason
    listed = run("adopt_rights", "--reason", "the first administrator, made with createsuperuser", "--dry-run")
    assert listed.count("would adopt: account outside") == 2 and len(list(reconcile.accounts())) == 2
    with pytest.raises(CommandError, match="the following arguments are required: --reason"):
        run("adopt_rights")
    assert run("adopt_rights", "--reason", "the first administrator, made with createsuperuser").count(
        "adopted: account outside") == 2
    assert list(reconcile.accounts()) == [] and chain.verify().ok
    event = AuditEvent.objects.filter(action="user.change", object_repr="outside").first()
    assert (event.via, event.data["adopted"]) == ("command", "the first administrator, made with createsuperuser")
    # the exceptions report names whose shell it was on the row itself
    today, report = timezone.now().date().isoformat(), tmp_path / "exceptions.csv"
    run("sox_report", "exceptions", "--since", today, "--until", today, "-o", str(report))
    with report.open(newline="") as rows:
        adopted = [row for row in csv.DictReader(rows) if row["kind"] == "adopted_right"]
    shell = event.data["os_account"]
    assert len(adopted) == 2 and {row["actor"] for row in adopted} == {f"system (shell account {shell})"}
    assert shell.endswith(f" on {socket.gethostname()}")


def test_create_token_prints_the_token_last(db, demo_mode):
    run("demo_data")
    ci = run("create_token", "--ci", "--application", "MAC", "--name", "jenkins").strip().splitlines()[-1]
    actor = token_actor(ci)
    assert actor.is_ci and actor.token_name == "jenkins"
    mine = run("create_token", "--user", "carol").strip().splitlines()[-1]
    assert token_actor(mine).user.username == "carol"
    created = AuditEvent.objects.filter(action="token.create")
    assert created.count() == 2


def test_a_command_s_events_name_the_shell_account_that_ran_it(db, demo_mode, monkeypatch):
    """Commands act as the portal (system, via command); the chain still says whose shell it was: the
    process's user id, and the account that logged in where the kernel recorded one, whatever $USER or
    SUDO_USER claim."""
    for variable in ("USER", "LOGNAME", "SUDO_USER"):
        monkeypatch.setenv(variable, "someone-else")
    run("demo_data")
    run("create_token", "--user", "carol")
    me = pwd.getpwuid(os.getuid()).pw_name
    login = int(Path("/proc/self/loginuid").read_text())
    expected = me if login in (4294967295, os.getuid()) else f"{me} (logged in as {pwd.getpwuid(login).pw_name})"
    event = AuditEvent.objects.get(action="token.create")
    assert (event.actor_username, event.via, event.data["os_account"]) == (
        "system", "command", f"{expected} on {socket.gethostname()}")
    assert chain.verify().ok
    client = Client()
    client.login(username="admin", password="admin")
    listed = client.get("/admin/audit/auditevent/?action=token.create").content.decode()
    assert f"system (by a command: {expected} on {socket.gethostname()})" in listed


def test_create_token_reuses_the_token_kept_in_its_file_while_it_is_valid(db, tmp_path, demo_mode):
    run("demo_data")
    kept = tmp_path / "demo-ci-token"
    ci = ("create_token", "--ci", "--application", "MAC", "--name", "demo-ci", "--reuse-file", str(kept))
    first = run(*ci)
    token = first.strip().splitlines()[-1]
    assert kept.read_text() == first and kept.stat().st_mode & 0o777 == 0o600
    assert run(*ci) == first  # shown again, not created again
    assert AuditEvent.objects.filter(action="token.create").count() == 1

    other = run("create_token", "--ci", "--application", "MAC", "--name", "other", "--reuse-file", str(kept))
    assert other.strip().splitlines()[-1] != token  # another name: a new token
    token_revoke(actor=SYSTEM, token=ApiToken.objects.get(name="other"))
    renewed = run(*ci).strip().splitlines()[-1]  # the file holds a revoked token: a new one
    assert renewed not in (token, other.strip().splitlines()[-1]) and token_actor(renewed).token_name == "demo-ci"
    assert AuditEvent.objects.filter(action="token.create").count() == 3
