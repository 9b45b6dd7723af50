"""Executable configuration and notification targets in the admin: every change in the chain with who
made it and both values; a channel's credential never rendered, never in the chain."""

import json

import pytest
from auditlog.models import LogEntry
from django.urls import reverse

from audit.models import AuditEvent
from environments.models import NotificationChannel

SECRET = "s3cr3t-token-0123456789abcdef"
NEW_SECRET = "n3w-s3cr3t-fedcba9876543210"


@pytest.fixture
def channel(world):
    return NotificationChannel.objects.create(application=world.app, kind="chat", url="http://127.0.0.1:9/hook",
                                              credential=SECRET)


@pytest.fixture
def root(make_user):
    return make_user("root", superuser=True)


def secret_fragments(secret: str) -> list[str]:
    """The secret and each of its halves: a mask that shows half of it leaks too."""
    return [secret, secret[len(secret) // 2:], secret[: len(secret) // 2]]


def assert_nowhere(secret: str, text: str) -> None:
    for fragment in secret_fragments(secret):
        assert fragment not in text


def test_view_only_user_never_sees_the_credential(client, world, channel, make_user):
    viewer = make_user("viewer", perms=["environments.view_notificationchannel"])
    client.force_login(viewer)
    page = client.get(reverse("admin:environments_notificationchannel_change", args=[channel.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert_nowhere(SECRET, page.content.decode())
    assert "set" in page.content.decode()
    listing = client.get(reverse("admin:environments_notificationchannel_changelist"))
    assert listing.status_code == 200 and channel.url in listing.content.decode()
    assert_nowhere(SECRET, listing.content.decode())


def test_the_change_form_does_not_render_the_credential_either(client, channel, root):
    client.force_login(root)
    page = client.get(reverse("admin:environments_notificationchannel_change", args=[channel.pk])).content.decode()
    assert 'name="credential"' in page  # write-only: it can be replaced
    assert_nowhere(SECRET, page)


def test_channel_change_is_audited_without_the_credential(client, world, channel, root):
    client.force_login(root)
    url = reverse("admin:environments_notificationchannel_change", args=[channel.pk])
    response = client.post(url, {"application": world.app.pk, "kind": "monitoring", "url": "http://127.0.0.1:9/x",
                                 "credential": NEW_SECRET, "enabled": "on"})
    assert response.status_code == 302
    channel.refresh_from_db()
    assert (channel.kind, channel.credential) == ("monitoring", NEW_SECRET)
    event = AuditEvent.objects.get(action="notification_channel.change")
    assert (event.actor_username, event.via, event.object_id) == ("root", "admin", str(channel.pk))
    assert event.data["changes"] == {
        "kind": {"from": "chat", "to": "monitoring"},
        "url": {"from": "http://127.0.0.1:9/hook", "to": "http://127.0.0.1:9/x"},
        "credential": "changed",
    }
    # Nowhere in the chain, in the field history or on any page that shows them.
    everything = json.dumps([e.canonical for e in AuditEvent.objects.all()])
    everything += json.dumps([e.changes for e in LogEntry.objects.all()])
    for page in ("admin:audit_auditevent_changelist", "admin:auditlog_logentry_changelist"):
        everything += client.get(reverse(page)).content.decode()
    everything += client.get(reverse("admin:audit_auditevent_change", args=[event.pk])).content.decode()
    for secret in (SECRET, NEW_SECRET):
        assert_nowhere(secret, everything)


def test_channel_kept_credential_and_disable_are_audited(client, world, channel, root):
    client.force_login(root)
    url = reverse("admin:environments_notificationchannel_change", args=[channel.pk])
    client.post(url, {"application": world.app.pk, "kind": "chat", "url": channel.url, "credential": ""})
    channel.refresh_from_db()
    assert channel.credential == SECRET and not channel.enabled  # an empty field keeps the credential
    event = AuditEvent.objects.get(action="notification_channel.change")
    assert event.data["changes"] == {"enabled": {"from": True, "to": False}}


def test_channel_creation_is_audited_and_deletion_is_switched_off(client, world, root):
    client.force_login(root)
    client.post(reverse("admin:environments_notificationchannel_add"),
                {"application": world.app.pk, "kind": "chat", "url": "http://127.0.0.1:9/new", "credential": SECRET,
                 "enabled": "on"})
    channel = NotificationChannel.objects.get()
    event = AuditEvent.objects.get(action="notification_channel.create")
    assert event.data["changes"]["credential"] == "set" and event.actor_username == "root"
    assert event.data["changes"]["url"] == {"from": None, "to": "http://127.0.0.1:9/new"}
    assert_nowhere(SECRET, event.canonical)
    delete = client.post(reverse("admin:environments_notificationchannel_delete", args=[channel.pk]), {"post": "yes"})
    assert delete.status_code == 403 and NotificationChannel.objects.filter(pk=channel.pk).exists()


def test_playbook_and_inventory_changes_are_audited_from_and_to(client, world, root):
    client.force_login(root)
    url = reverse("admin:environments_environment_change", args=[world.qa.pk])
    data = {"application": world.app.pk, "name": "QA", "required_approvals": 0, "playbook": "site.yml",
            "playbook_repo": "https://git.example.com/ops/playbooks.git", "playbook_ref": "v2",
            "inventory": "[web]\nweb1 ansible_host=10.0.0.5\n",
            "freeze_windows-TOTAL_FORMS": 0, "freeze_windows-INITIAL_FORMS": 0}
    assert client.post(url, data).status_code == 302
    event = AuditEvent.objects.filter(action="environment.change", object_id=str(world.qa.pk)).get()
    assert (event.actor_username, event.via) == ("root", "admin")
    assert event.data["executable"] == {
        "playbook_repo": {"from": "", "to": "https://git.example.com/ops/playbooks.git"},
        "playbook_ref": {"from": "", "to": "v2"},
        "playbook": {"from": "deploy_demo.yml", "to": "site.yml"},
        "inventory": {"from": "", "to": "[web]\nweb1 ansible_host=10.0.0.5"},  # the form strips it
    }
    data["auto_deploy"] = "on"  # not executable configuration: in `changed` with both values
    client.post(url, data)
    last = AuditEvent.objects.filter(action="environment.change").last()
    assert last.data["executable"] == {} and last.data["changed"] == {"auto_deploy": [False, True]}
