"""The admin as analysts use it: actions call services, refusals show the rule's sentence."""

import pytest
from auditlog.context import set_actor
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from audit.models import AuditEvent
from environments import services
from environments.models import Deployment
from tests.conftest import person

CHANGELIST = "admin:environments_deployment_changelist"


@pytest.fixture
def analysts(world):
    view = Permission.objects.filter(codename__in=["view_deployment", "view_release", "view_auditevent",
                                                   "view_environment", "add_deployment"])
    for user in (world.bob, world.carol, world.dave):
        user.user_permissions.add(*view)
    return world


def pending_production(world):
    release = world.release()
    world.to_staging(release)
    return services.deployment_request(actor=person(world.bob), release=release, environment=world.production)


def act(client, user, action, ids, comment=""):
    client.force_login(user)
    return client.post(reverse(CHANGELIST), {"action": action, "_selected_action": ids, "apply": "1",
                                             "comment": comment}, follow=True)


def test_analyst_approves_through_the_admin_action(client, analysts):
    deployment = pending_production(analysts)
    response = act(client, analysts.carol, "approve", [deployment.pk], "looks right")
    assert response.status_code == 200
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.QUEUED
    event = AuditEvent.objects.filter(action="deployment.approve").get()
    assert (event.actor_username, event.via, event.data["comment"]) == ("carol", "admin", "looks right")


def test_refusal_shows_the_rules_sentence(client, analysts):
    deployment = pending_production(analysts)
    response = act(client, analysts.bob, "approve", [deployment.pk])
    messages = [str(m) for m in response.context["messages"]]
    assert any("SOD_REQUESTER_APPROVER" in m and "You requested this deployment" in m for m in messages)
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.AWAITING_APPROVAL


def test_reject_asks_for_a_comment_first(client, analysts):
    deployment = pending_production(analysts)
    client.force_login(analysts.carol)
    page = client.post(reverse(CHANGELIST), {"action": "reject", "_selected_action": [deployment.pk]})
    assert page.status_code == 200 and b'name="comment"' in page.content
    missing = client.post(reverse(CHANGELIST), {"action": "reject", "_selected_action": [deployment.pk],
                                                "apply": "1", "comment": ""})
    assert b"is required" in missing.content
    act(client, analysts.carol, "reject", [deployment.pk], "wrong ticket")
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.REJECTED


def test_request_next_environment_action_on_releases(client, analysts):
    release = analysts.release()
    client.force_login(analysts.alice)
    analysts.alice.user_permissions.add(Permission.objects.get(codename="view_release"))
    client.post(reverse("admin:releases_release_changelist"),
                {"action": "request_next_environment", "_selected_action": [release.pk]}, follow=True)
    assert Deployment.objects.get(release=release).environment == analysts.qa
    page = client.get(reverse("admin:releases_release_changelist"))
    assert page.status_code == 200 and release.version.encode() in page.content


def test_deployment_and_audit_pages_are_read_only(client, analysts):
    deployment = pending_production(analysts)
    client.force_login(analysts.dave)
    page = client.get(reverse("admin:environments_deployment_change", args=[deployment.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    event = AuditEvent.objects.last()
    page = client.get(reverse("admin:audit_auditevent_change", args=[event.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    post = client.post(reverse("admin:audit_auditevent_change", args=[event.pk]), {"action": "x"})
    assert post.status_code == 403
    assert client.get(reverse("admin:audit_auditevent_changelist") + "?code=SOD_REQUESTER_APPROVER").status_code == 200


def test_superuser_cannot_add_themselves_to_a_releasers_group(client, world, make_user):
    admin = make_user("root", superuser=True)
    client.force_login(admin)
    url = reverse("admin:auth_user_change", args=[admin.pk])
    form = client.get(url).context["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None and k not in ("groups", "user_permissions",
                                                                                 "password", "last_login")}
    data.update({"groups": [world.releasers.pk], "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    response = client.post(url, data)
    assert response.status_code == 200 and b"SELF_GRANT" in response.content
    assert not admin.groups.exists()
    other = make_user("newbie")
    data_other = {**data, "username": "newbie", "email": "newbie@example.com"}
    client.post(reverse("admin:auth_user_change", args=[other.pk]), data_other)
    assert list(other.groups.all()) == [world.releasers]
    assert AuditEvent.objects.filter(action="group.add_member", data__user="newbie").exists()


def test_access_page_grants_through_the_service(client, world, make_user):
    admin = make_user("root", superuser=True)
    client.force_login(admin)
    url = reverse("admin:environments_environment_access", args=[world.production.pk])
    assert b"mac-releasers" in client.get(url).content
    response = client.post(url, {"permission": "approve_environment", "user": admin.pk, "grant": "1"}, follow=True)
    assert b"SELF_GRANT" in response.content
    client.post(url, {"permission": "approve_environment", "user": world.dave.pk, "grant": "1"})
    assert AuditEvent.objects.filter(action="environment.grant", data__user="dave").exists()


def test_environment_change_goes_through_the_service(client, world, make_user):
    admin = make_user("root", superuser=True)
    client.force_login(admin)
    url = reverse("admin:environments_environment_change", args=[world.staging.pk])
    page = client.get(url)
    assert page.status_code == 200 and b"who may deploy and approve" in page.content.lower()
    data = {"application": world.app.pk, "name": "Staging", "promotes_from": world.production.pk,
            "required_approvals": 0, "playbook": "deploy_demo.yml", "inventory": "",
            "freeze_windows-TOTAL_FORMS": 0, "freeze_windows-INITIAL_FORMS": 0}
    response = client.post(url, data)
    assert response.status_code == 200 and b"cycle" in response.content
    data["promotes_from"] = world.qa.pk
    data["auto_deploy"] = "on"
    assert client.post(url, data).status_code == 302
    assert AuditEvent.objects.filter(action="environment.change", object_id=str(world.staging.pk)).exists()


def test_deployment_list_queries_do_not_grow_with_rows(client, world, make_user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.force_login(make_user("root", superuser=True))
    url = reverse(CHANGELIST)

    def count():
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        return len(captured)

    def reviewed_emergency():
        release = world.release()
        world.to_staging(release)
        d = services.deployment_request(actor=person(world.bob), release=release, environment=world.production,
                                        emergency_reason="outage")
        services.deployment_start(deployment_id=d.pk)
        services.deployment_record_result(deployment_id=d.pk, state=Deployment.State.SUCCEEDED)
        services.deployment_review(actor=person(world.carol), deployment_id=d.pk, comment="ok")

    reviewed_emergency()
    few = count()
    for _ in range(5):
        reviewed_emergency()
    assert count() == few


def test_deleting_a_user_with_field_history_is_refused_not_a_500(client, world, make_user):
    admin = make_user("root", superuser=True)
    frank = make_user("frank", superuser=True)
    with set_actor(frank):  # frank changed a setting once: his name is in the field history
        world.qa.auto_deploy = True
        world.qa.save()
    client.force_login(admin)
    url = reverse("admin:auth_user_delete", args=[frank.pk])
    offered = client.get(url, follow=True)
    assert b"deactivate the account instead" in offered.content
    response = client.post(url, {"post": "yes"}, follow=True)
    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("USER_IS_EVIDENCE" in m and "changed settings (field history)" in m and "deactivate" in m
               for m in messages)
    assert get_user_model().objects.filter(pk=frank.pk).exists()
    event = AuditEvent.objects.get(action="user.delete.refused")
    assert (event.code, event.actor_username, event.data["username"]) == ("USER_IS_EVIDENCE", "root", "frank")


def test_delete_selected_refuses_implementers_and_approvers(client, world, make_user):
    release = world.release()  # alice implemented it
    world.to_staging(release)
    world.deploy(release, world.production, actor=person(world.bob))  # bob requested, carol approved
    admin = make_user("root", superuser=True)
    client.force_login(admin)
    ids = [world.alice.pk, world.bob.pk, world.carol.pk]
    response = client.post(reverse("admin:auth_user_changelist"),
                           {"action": "delete_selected", "_selected_action": ids, "post": "yes"}, follow=True)
    assert response.status_code == 200
    messages = " ".join(str(m) for m in response.context["messages"])
    assert "alice implemented releases" in messages and "bob requested or reviewed deployments" in messages
    assert "carol decided on deployments" in messages and "deactivate" in messages
    assert get_user_model().objects.filter(pk__in=ids).count() == 3
    assert AuditEvent.objects.filter(action="user.delete.refused").count() == 3


def test_a_user_outside_the_evidence_is_deleted_and_audited(client, world, make_user):
    admin = make_user("root", superuser=True)
    newbie = make_user("newbie")
    client.force_login(admin)
    response = client.post(reverse("admin:auth_user_delete", args=[newbie.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert not get_user_model().objects.filter(username="newbie").exists()
    event = AuditEvent.objects.get(action="user.delete")
    assert (event.actor_username, event.data["username"]) == ("root", "newbie")
