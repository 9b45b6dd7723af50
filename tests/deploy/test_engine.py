"""The deploy engine with real ansible-runner and the bundled demo playbook."""

import os
import sys
from pathlib import Path

import ansible_runner

from audit import chain
from audit.models import AuditEvent
from environments import deploy, services
from environments.models import Deployment, DeploymentEvent
from tests.deploy.conftest import register, use_repo

State = Deployment.State


def queue(world, release, environment=None):
    return services.deployment_request(actor=world.ci, release=release, environment=environment or world.qa)


def test_demo_playbook_installs_the_verified_artifact(world, deploy_dirs, artifact, client):
    import os

    release = register(world, artifact, "2.0.0")
    deployment = queue(world, release)
    worker_path = os.environ["PATH"]

    assert deploy.execute(deployment.pk) == State.SUCCEEDED
    assert os.environ["PATH"] == worker_path  # the runner gets the venv on its PATH; the worker's stays as it was

    installed = Path(deploy_dirs) / "deploy" / "MAC" / "QA" / "current"
    assert (installed / "VERSION").read_text() == "2.0.0\n"
    assert (installed / "mac-2.0.0.tar.gz").read_bytes() == b"MAC 2.0.0\n"
    deployment.refresh_from_db()
    assert deployment.progress["hosts_done"] == deployment.progress["hosts_total"] == 1
    assert deployment.playbook_commit.startswith("bundled:")
    tasks = set(DeploymentEvent.objects.filter(deployment=deployment).values_list("task", flat=True))
    assert "Refuse an artifact whose SHA-256 differs from the release's" in tasks
    assert DeploymentEvent.objects.filter(deployment=deployment, event="playbook_on_stats").exists()
    actions = list(AuditEvent.objects.filter(object_id=str(deployment.pk), object_type="environments.deployment")
                   .values_list("action", flat=True))
    assert actions == ["deployment.request", "deployment.start", "deployment.claim", "deployment.playbook",
                       "deployment.finish"]
    finish = AuditEvent.objects.get(action="deployment.finish", object_id=str(deployment.pk))
    assert finish.data["playbook_commit"] == deployment.playbook_commit and finish.data["rc"] == 0
    assert chain.verify().ok


def test_checksum_mismatch_is_refused_by_the_playbook(world, deploy_dirs, artifact):
    release = register(world, artifact, "2.0.1", sha256="0" * 64)
    deployment = queue(world, release)

    assert deploy.execute(deployment.pk) == State.FAILED

    deployment.refresh_from_db()
    detail = deployment.result_detail  # the host, the task and Ansible's own message, then the runner's rc
    assert detail.startswith('Failed on localhost, task "Refuse an artifact whose SHA-256 differs from the '
                             "release's\": Checksum mismatch for mac-2.0.1.tar.gz: got ")
    assert detail.endswith("Nothing was installed. (ansible-runner failed, rc 2; 0 of 1 hosts done)")
    assert deployment.progress["failed_host"] == "localhost"
    finish = AuditEvent.objects.get(action="deployment.finish", object_id=str(deployment.pk))
    assert finish.data["detail"] == detail
    assert not (Path(deploy_dirs) / "deploy" / "MAC" / "QA" / "current").exists()
    failed = DeploymentEvent.objects.get(deployment=deployment, status="failed")
    assert "Checksum mismatch" in failed.stdout


def test_a_deployment_runs_once_however_often_it_is_delivered(world, deploy_dirs, artifact):
    deployment = queue(world, register(world, artifact, "2.0.2"))
    assert deploy.execute(deployment.pk) == State.SUCCEEDED
    assert deploy.execute(deployment.pk) is None
    assert AuditEvent.objects.filter(action="deployment.claim", object_id=str(deployment.pk)).count() == 1


def test_playbooks_from_git_record_their_commit(world, deploy_dirs, artifact, playbook_repo):
    repo, commit = playbook_repo
    use_repo(world.qa, repo, "quick.yml")
    deployment = queue(world, register(world, artifact, "2.0.3"))
    assert deploy.execute(deployment.pk) == State.SUCCEEDED
    deployment.refresh_from_db()
    assert deployment.playbook_commit == commit
    event = AuditEvent.objects.get(action="deployment.playbook", object_id=str(deployment.pk))
    assert event.data["playbook_commit"] == commit


def test_a_broken_playbook_source_fails_the_deployment_with_the_reason(world, deploy_dirs, artifact, tmp_path):
    use_repo(world.qa, tmp_path / "no-such-repo", "deploy.yml")
    deployment = queue(world, register(world, artifact, "2.0.4"))
    assert deploy.execute(deployment.pk) == State.FAILED
    deployment.refresh_from_db()
    assert "CalledProcessError" in deployment.result_detail
    assert Deployment.objects.filter(environment=world.qa, state__in=["queued", "running"]).count() == 0


def test_auto_deploy_follows_the_promotion_path_but_never_into_restricted(world, deploy_dirs, artifact):
    import pytest
    from django.core.exceptions import ValidationError

    for env in (world.qa, world.staging):
        env.auto_deploy = True
        services.environment_save(actor=services.Actor.system(), environment=env)
    world.production.auto_deploy = True
    with pytest.raises(ValidationError, match="never deploys by itself"):
        services.environment_save(actor=services.Actor.system(), environment=world.production)
    release = register(world, artifact, "2.1.0")
    qa = Deployment.objects.get(release=release)
    assert (qa.environment, qa.state, qa.requested_by_label) == (world.qa, State.RUNNING, "system")
    assert deploy.execute(qa.pk) == State.SUCCEEDED
    staging = Deployment.objects.get(release=release, environment=world.staging)
    assert staging.state == State.RUNNING
    assert deploy.execute(staging.pk) == State.SUCCEEDED
    assert not Deployment.objects.filter(release=release, environment=world.production).exists()
    # the policy refuses the portal itself on a restricted environment, whatever the configuration
    assert services.auto_deploy(release=release, environment=world.production) is None
    refused = AuditEvent.objects.get(action="deployment.request.refused", code="AUTO_DEPLOY_RESTRICTED")
    assert refused.data["environment"] == "Production"


def test_progress_is_visible_in_the_api(world, deploy_dirs, artifact, client):
    from access.models import ApiToken
    from access.services import token_create
    from tests.conftest import SYSTEM

    deployment = queue(world, register(world, artifact, "2.0.5"))
    deploy.execute(deployment.pk)
    _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])
    body = client.get(f"/api/v1/deployments/{deployment.pk}", HTTP_AUTHORIZATION=f"Bearer {raw}").json()
    assert body["state"] == "succeeded"
    assert body["progress"]["hosts_done"] == 1 and body["progress"]["hosts"] == {"localhost": "done"}


def test_admin_deployment_page_shows_progress_and_output(world, deploy_dirs, artifact, client, make_user):
    from django.urls import reverse

    deployment = queue(world, register(world, artifact, "2.0.6"))
    deploy.execute(deployment.pk)
    client.force_login(make_user("root", superuser=True))
    page = client.get(reverse("admin:environments_deployment_change", args=[deployment.pk])).content.decode()
    assert "1 of 1 hosts done" in page and "localhost: done" in page
    assert "PLAY RECAP" in page


def test_notification_credential_is_write_only_and_masked(world, client, make_user):
    from django.urls import reverse

    from environments.models import NotificationChannel

    client.force_login(make_user("root", superuser=True))
    add = reverse("admin:environments_notificationchannel_add")
    client.post(add, {"application": world.app.pk, "kind": "chat", "url": "http://127.0.0.1:9/hook",
                      "credential": "s3cr3t-token", "enabled": "on"})
    channel = NotificationChannel.objects.get()
    assert channel.credential == "s3cr3t-token"
    change = reverse("admin:environments_notificationchannel_change", args=[channel.pk])
    assert "s3cr3t-token" not in client.get(change).content.decode()
    client.post(change, {"application": world.app.pk, "kind": "chat", "url": "http://127.0.0.1:9/hook2",
                         "credential": "", "enabled": "on"})
    channel.refresh_from_db()
    assert (channel.url, channel.credential) == ("http://127.0.0.1:9/hook2", "s3cr3t-token")
    history = AuditEvent.objects.filter(object_type="environments.notificationchannel")
    assert history.exists() and all("s3cr3t-token" not in str(e.data) for e in history)


def test_no_reserved_name_warning_in_the_deployment_log(world, deploy_dirs, artifact):
    """Ansible warns in every log when a variable is named after a play keyword (`environment`)."""
    deployment = queue(world, register(world, artifact, "2.0.7"))
    assert deploy.execute(deployment.pk) == State.SUCCEEDED

    log = "\n".join(DeploymentEvent.objects.filter(deployment=deployment).values_list("stdout", flat=True))
    assert "PLAY RECAP" in log
    assert "reserved name" not in log.lower() and "[warning]" not in log.lower(), log
    stdout = Path(deploy_dirs) / "deployments" / str(deployment.pk) / "artifacts" / "run" / "stdout"
    assert "reserved name" not in stdout.read_text().lower()


def test_a_task_for_a_deployment_this_database_does_not_have_is_ignored(db, caplog):
    """A task older than the database (restored from a backup) or from a broker shared by mistake."""
    before = AuditEvent.objects.count()
    assert deploy.execute(987_654) is None
    assert "deployment 987654 does not exist in this database" in caplog.text
    assert AuditEvent.objects.count() == before and not Deployment.objects.exists()


def test_progress_follows_what_ansible_says_of_each_host(tmp_path):
    """Real Ansible events, two hosts: side by side in one batch, neither is done before the batch ends
    (a host answering says nothing of the other); one at a time (serial), a host is done when the next
    batch starts; a run stopped midway leaves its hosts `stopped`."""
    (tmp_path / "project").mkdir()
    (tmp_path / "inventory").mkdir()
    (tmp_path / "inventory" / "hosts").write_text(
        "[cluster]\nh1\nh2\n[cluster:vars]\nansible_connection=local\n"
        f"ansible_python_interpreter={sys.executable}\n")

    def states(serial: bool) -> list[dict]:
        play = ("- hosts: cluster\n  gather_facts: false\n" + ("  serial: 1\n" if serial else "")
                + "  tasks:\n    - debug: msg=one\n    - debug: msg=two\n")
        (tmp_path / "project" / "play.yml").write_text(play)
        progress, seen = deploy.Progress(deployment_id=0, group_sizes={"cluster": 2, "all": 2}), []

        def on_event(event):
            progress.on_event(event)
            if event.get("event") in ("runner_on_ok", "playbook_on_play_start"):
                seen.append(dict(progress.hosts))
            return True

        path = deploy._venv_bin() + os.pathsep + os.environ["PATH"]
        runner = ansible_runner.run(private_data_dir=str(tmp_path), playbook="play.yml", quiet=True,
                                    event_handler=on_event, envvars={"ANSIBLE_FORKS": "2", "PATH": path})
        assert runner.status == "successful", runner.stdout.read()
        assert progress.hosts == {"h1": "done", "h2": "done"} and progress.as_dict()["hosts_done"] == 2
        return seen

    side_by_side = states(serial=False)
    assert all("done" not in s.values() for s in side_by_side)  # until the end of the play
    one_at_a_time = states(serial=True)
    assert {"h1": "done"} in [{h: s for h, s in seen.items() if h == "h1"} for seen in one_at_a_time
                              if "h2" in seen and seen["h2"] == "upgrading"]
    stopped = deploy.Progress(deployment_id=0, hosts={"h1": "done", "h2": "upgrading"}, current_task="two")
    stopped.stop()
    assert (stopped.hosts, stopped.current_task) == ({"h1": "done", "h2": "stopped"}, "")
