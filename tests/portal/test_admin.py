"""The admin as analysts use it: actions call services, refusals show the rule's sentence."""

import csv
import datetime as dt
import io
import re

import pytest
from auditlog.context import set_actor
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEvent
from environments import services
from environments.models import Deployment
from evidence.reports import Export, Period
from tests.conftest import SYSTEM, person

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


def act(client, user, action, deployment, comment=""):
    client.force_login(user)
    return client.post(reverse("admin:environments_deployment_act", args=[deployment.pk]),
                       {"action": action, "comment": comment}, follow=True)


def test_refusal_shows_the_rules_sentence(client, analysts):
    deployment = pending_production(analysts)
    response = act(client, analysts.bob, "approve", deployment)
    messages = [str(m) for m in response.context["messages"]]
    assert any("SOD_REQUESTER_APPROVER" in m and "You requested this deployment" in m for m in messages)
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.AWAITING_APPROVAL
    event = AuditEvent.objects.get(action="deployment.approve.refused")
    assert (event.code, event.actor_username, event.via, event.object_id) == (
        "SOD_REQUESTER_APPROVER", "bob", "admin", str(deployment.pk))
    assert event.data["detail"] in " ".join(messages)


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
    refusal = AuditEvent.objects.get(action="group.add_member.refused")
    assert (refusal.code, refusal.actor_username, refusal.data["user"]) == ("SELF_GRANT", "root", "root")
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
    granted = client.post(url, {"permission": "approve_environment", "user": world.dave.pk, "grant": "1"}, follow=True)
    assert "Granted approve_environment on MAC Production to user dave." in granted.content.decode()
    assert AuditEvent.objects.filter(action="environment.grant", data__user="dave").count() == 1
    events = AuditEvent.objects.count()  # again, and a revoke of what alice never held: nothing to change
    again = client.post(url, {"permission": "approve_environment", "user": world.dave.pk, "grant": "1"}, follow=True)
    assert "Nothing changed: user dave holds approve_environment on MAC Production already." in again.content.decode()
    never = client.post(url, {"permission": "approve_environment", "user": world.alice.pk, "grant": "0"}, follow=True)
    assert ("Nothing changed: user alice holds no grant of approve_environment on MAC Production to revoke."
            in never.content.decode())
    assert AuditEvent.objects.count() == events  # no event says a right changed hands when none did
    revoked = client.post(url, {"permission": "approve_environment", "user": world.dave.pk, "grant": "0"}, follow=True)
    assert "Revoked approve_environment on MAC Production from user dave." in revoked.content.decode()
    assert not world.dave.has_perm("environments.approve_environment", world.production)


def test_access_page_offers_the_form_only_to_whom_the_policy_allows(client, world):
    from django.contrib.auth.models import Permission

    world.dave.user_permissions.add(Permission.objects.get(codename="view_environment"))
    client.force_login(world.dave)
    url = reverse("admin:environments_environment_access", args=[world.production.pk])
    page = client.get(url).content.decode()
    assert "mac-releasers" in page and 'value="Apply"' not in page
    assert "Refused (NOT_PERMITTED). You may not change who can deploy or approve." in page
    client.post(url, {"permission": "approve_environment", "user": world.dave.pk, "grant": "1"})  # forged
    assert AuditEvent.objects.filter(action="environment.grant.refused", code="NOT_PERMITTED",
                                     actor_username="dave").exists()


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


def test_deployment_pages_show_the_queue(client, world, make_user):
    first, second = world.release(), world.release()
    running = services.deployment_request(actor=person(world.alice), release=first, environment=world.qa)
    waiting = services.deployment_request(actor=person(world.alice), release=second, environment=world.qa)
    client.force_login(make_user("root", superuser=True))
    listing = client.get(reverse(CHANGELIST)).content.decode()
    assert "Queued, 1 in line" in listing
    page = client.get(reverse("admin:environments_deployment_change", args=[waiting.pk])).content.decode()
    assert f"1 in line; waiting behind #{running.pk}" in page
    env_page = client.get(reverse("admin:environments_environment_change", args=[world.qa.pk])).content.decode()
    assert f"#{waiting.pk}</a> {second.version} queued: waiting behind #{running.pk}" in env_page

def change_form_data(client, user) -> dict:
    form = client.get(reverse("admin:auth_user_change", args=[user.pk])).context["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None and k not in ("groups", "user_permissions",
                                                                                 "password", "last_login",
                                                                                 "date_joined")}
    data.update({"date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    data.update({k: "on" for k in ("is_active", "is_staff", "is_superuser") if data.pop(k, False)})
    data["user_permissions"] = list(user.user_permissions.values_list("pk", flat=True))
    data["groups"] = list(user.groups.values_list("pk", flat=True))
    return data


def access_report():
    now = timezone.now()
    export = Export("access", Period(now - dt.timedelta(days=1), now + dt.timedelta(days=1)), SYSTEM)
    return list(csv.DictReader(io.StringIO(b"".join(export.chunks()).decode())))


def test_password_reset_by_a_superuser_is_in_the_chain_and_the_access_report(client, world, make_user):
    root = make_user("root", superuser=True)
    client.force_login(root)
    old_hash = world.bob.password
    url = reverse("admin:auth_user_password_change", args=[world.bob.pk])
    assert client.get(url).status_code == 200
    mismatch = client.post(url, {"password1": "N3w-secret-pass", "password2": "other", "set_usable_password": "true"})
    assert mismatch.status_code == 200 and not AuditEvent.objects.filter(action="user.set_password").exists()
    for weak, why in (("bob", "too short"), ("bob@example.com", "too similar"), ("123456789012", "entirely numeric"),
                      ("password1234", "too common")):
        answer = client.post(url, {"password1": weak, "password2": weak, "set_usable_password": "true"})
        assert why in " ".join(answer.context["form"].errors["password2"]), weak
    assert not AuditEvent.objects.filter(action="user.set_password").exists()
    response = client.post(url, {"password1": "N3w-secret-pass", "password2": "N3w-secret-pass",
                                 "set_usable_password": "true"})
    assert response.status_code == 302
    world.bob.refresh_from_db()
    assert world.bob.check_password("N3w-secret-pass")
    event = AuditEvent.objects.get(action="user.set_password")
    assert (event.actor_username, event.via, event.object_repr) == ("root", "admin", "bob")
    assert event.data["user"] == "bob" and event.data["by_another_person"] is True
    assert old_hash not in event.canonical and world.bob.password not in event.canonical
    assert "N3w-secret-pass" not in event.canonical
    (row,) = [r for r in access_report() if r["permission"] == "password"]
    assert (row["username"], row["email"], row["changed_by"], row["change"]) == (
        "bob", "bob@example.com", "root", "set by another person")
    assert row["conflict"] == "true" and int(row["since_audit_seq"]) == event.seq
    assert client.login(username="bob", password="N3w-secret-pass")


def test_own_password_change_is_audited_but_not_an_administrator_action(client, world, make_user):
    root = make_user("root", superuser=True)
    client.force_login(root)
    url = reverse("admin:auth_user_password_change", args=[root.pk])
    client.post(url, {"password1": "N3w-secret-pass", "password2": "N3w-secret-pass", "set_usable_password": "true"})
    assert AuditEvent.objects.get(action="user.set_password").data["by_another_person"] is False
    assert not [r for r in access_report() if r["permission"] == "password"]


def test_account_flags_and_permissions_changed_in_the_user_admin_are_audited(client, world, make_user):
    root = make_user("root", superuser=True)
    client.force_login(root)
    dave = world.dave
    data = change_form_data(client, dave)
    data.pop("is_active")
    data.update({"is_superuser": "on", "email": "dave@corp.example.com"})
    data["user_permissions"] = [Permission.objects.get(codename="view_auditevent").pk]
    response = client.post(reverse("admin:auth_user_change", args=[dave.pk]), data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    dave.refresh_from_db()
    assert (dave.is_active, dave.is_superuser, dave.email) == (False, True, "dave@corp.example.com")
    change = AuditEvent.objects.get(action="user.change")
    assert change.actor_username == "root" and change.data["user"] == "dave"
    assert change.data["changed"]["is_active"] == {"from": True, "to": False}
    assert change.data["changed"]["is_superuser"] == {"from": False, "to": True}
    assert change.data["changed"]["email"] == {"from": "dave@example.com", "to": "dave@corp.example.com"}
    assert "password" not in change.data["changed"]
    perms = AuditEvent.objects.filter(action="user.permissions", actor_username="root").get()
    assert perms.data == {"user": "dave", "added": ["audit.view_auditevent"], "removed": [],
                          "by_another_person": True, "remote_addr": "127.0.0.1"}
    rows = {r["permission"]: r for r in access_report() if r["username"] == "dave" and r["changed_by"]
            and r["changed_by"] != "system"}  # the test's world made the account through the portal before
    assert rows["is_active"]["change"] == "true -> false" and rows["is_superuser"]["change"] == "false -> true"
    assert rows["user_permissions"]["change"] == "added: audit.view_auditevent"
    assert rows["email"]["change"] == "dave@example.com -> dave@corp.example.com"
    assert {r["changed_by"] for r in rows.values()} == {"root"}

    data = change_form_data(client, dave)
    data.update({"is_active": "on"})
    data["user_permissions"] = []
    client.post(reverse("admin:auth_user_change", args=[dave.pk]), data)
    rows = [r for r in access_report() if r["username"] == "dave" and r["changed_by"]]
    assert [(r["permission"], r["change"]) for r in rows][-2:] == [
        ("is_active", "false -> true"), ("user_permissions", "removed: audit.view_auditevent")]


def test_nobody_raises_their_own_rights_in_the_user_admin(client, world, make_user):
    admin = make_user("helpdesk", perms=["auth.change_user", "auth.view_user"])
    client.force_login(admin)
    data = change_form_data(client, admin)
    data["is_superuser"] = "on"
    data["user_permissions"] = [*data["user_permissions"],
                                Permission.objects.get(codename="change_environment").pk]
    response = client.post(reverse("admin:auth_user_change", args=[admin.pk]), data, follow=True)
    assert "SELF_GRANT" in response.content.decode()
    admin.refresh_from_db()
    assert not admin.is_superuser and not admin.has_perm("environments.change_environment")
    refusals = AuditEvent.objects.filter(code="SELF_GRANT", actor_username="helpdesk")
    assert set(refusals.values_list("action", flat=True)) == {"user.change.refused", "user.permissions.refused"}
    assert not [r for r in access_report() if r["permission"] == "is_superuser"]


def offered(page: str, name: str) -> set[str]:
    """The options a page's <select name=...> offers (their values, the empty choice left out)."""
    select = re.search(rf'<select name="{name}"[^>]*>(.*?)</select>', page, re.S)
    return set(re.findall(r'<option value="([^"]+)"', select.group(1))) if select else set()


def test_ones_own_account_page_offers_no_raise_of_ones_rights(client, world, make_user):
    """Rule 4 where it is offered: the helpdesk's own page offers leaving a group or a permission, not
    joining or gaining one, and says why in the rule's sentence; a forged post is refused on record
    (test_nobody_raises_their_own_rights_in_the_user_admin)."""
    helpdesk = make_user("helpdesk", perms=["auth.change_user", "auth.view_user", "auth.add_group"])
    client.force_login(helpdesk)
    page = client.get(reverse("admin:auth_user_change", args=[helpdesk.pk])).content.decode()
    held = {str(pk) for pk in helpdesk.user_permissions.values_list("pk", flat=True)}
    assert offered(page, "user_permissions") == held and len(held) == 3
    assert offered(page, "groups") == set()
    assert f"Not offered: {world.releasers.name}. Nobody can add themselves to a group; another administrator" in page
    assert "Nobody can raise their own rights (new permissions); another administrator must do it." in page
    assert re.search(r'<input type="checkbox" name="is_superuser"[^>]*disabled', page)
    assert "add_id_groups" not in page  # no "+" making a group to join
    assert "Nobody can raise their own rights (is_superuser)" in page
    other = client.get(reverse("admin:auth_user_change", args=[world.alice.pk])).content.decode()
    assert str(world.releasers.pk) not in offered(other, "groups")  # joining it is receiving its grants:
    assert "mac-releasers holds rights to deploy or approve; only someone who may grant them" in other
    rights = {str(p.pk) for p in Permission.objects.select_related("content_type")
              if helpdesk.has_perm(f"{p.content_type.app_label}.{p.codename}")}
    alices = {str(pk) for pk in world.alice.user_permissions.values_list("pk", flat=True)}
    assert offered(other, "user_permissions") == rights | alices  # what the helpdesk holds, and what alice does
    assert "Only a superuser gives a right they do not hold themselves." in other
    assert re.search(r'<input type="checkbox" name="is_superuser"[^>]*disabled', other)  # not a superuser:
    assert "Only a superuser may make a superuser." in other  # they make nobody one
    assert "Nobody can" not in other and "add_id_groups" in other


def test_access_page_offers_neither_oneself_nor_ones_group(client, world, make_user):
    root = make_user("root", superuser=True, groups=[world.releasers])
    client.force_login(root)
    page = client.get(reverse("admin:environments_environment_access", args=[world.production.pk])).content.decode()
    assert str(root.pk) not in offered(page, "user") and str(world.dave.pk) in offered(page, "user")
    assert str(world.releasers.pk) not in offered(page, "group")
    assert "Not offered: root. Nobody can grant deploy or approve rights to themselves." in page
    assert (f"Not offered: {world.releasers.name}. You belong to {world.releasers.name}; nobody can grant rights to "
            "a group they belong to.") in page
    client.post(reverse("admin:environments_environment_access", args=[world.production.pk]),
                {"permission": "deploy_environment", "group": world.releasers.pk, "grant": "0"})  # forged
    assert AuditEvent.objects.filter(code="SELF_GRANT", action="environment.revoke.refused").exists()
    assert world.releasers.groupobjectpermission_set.exists()


def test_a_group_page_offers_its_member_no_new_rights_for_it(client, world, make_user):
    from django.contrib.auth.models import Group

    auditors = Group.objects.create(name="auditors")
    auditors.permissions.add(Permission.objects.get(codename="view_auditevent"))
    member = make_user("dave2", groups=[auditors], perms=["auth.change_group", "auth.view_group"])
    client.force_login(member)
    page = client.get(reverse("admin:auth_group_change", args=[auditors.pk])).content.decode()
    assert offered(page, "permissions") == {str(Permission.objects.get(codename="view_auditevent").pk)}
    assert ("Not offered: the permissions it does not hold. You belong to auditors; nobody can give a group they "
            "belong to more rights (new permissions); another administrator must do it.") in page
    stranger = Group.objects.create(name="strangers")
    page = client.get(reverse("admin:auth_group_change", args=[stranger.pk])).content.decode()
    rights = {str(p.pk) for p in Permission.objects.select_related("content_type")
              if member.has_perm(f"{p.content_type.app_label}.{p.codename}")}
    assert offered(page, "permissions") == rights and len(rights) == 3  # what they hold, by their group too
    assert "You belong to" not in page and "Only a superuser gives a right they do not hold" in page


def test_account_created_in_the_admin_is_audited(client, world, make_user):
    root = make_user("root", superuser=True)
    client.force_login(root)
    response = client.post(reverse("admin:auth_user_add"), {
        "username": "newcomer", "password1": "N3w-secret-pass", "password2": "N3w-secret-pass",
        "usable_password": "true"})
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="user.create", data__user="newcomer")
    assert event.data["user"] == "newcomer" and event.data["usable_password"] is True
    assert event.actor_username == "root"


def test_deleting_a_user_with_field_history_is_refused_not_a_500(client, world, make_user):
    admin = make_user("root", superuser=True)
    frank = make_user("frank", superuser=True)
    with set_actor(frank):  # frank changed a setting once: his name is in the field history
        world.qa.auto_deploy = True
        world.qa.save()
    client.force_login(admin)
    page = client.get(reverse("admin:auth_user_change", args=[frank.pk])).content.decode()
    assert "deletelink" not in page  # not offered, and the page says why
    assert re.search(r"Not offered: Delete\. frank [^<]*changed settings \(field history\)[^<]*deactivate", page)
    newcomer = make_user("newcomer")  # part of nothing: offered
    assert "deletelink" in client.get(reverse("admin:auth_user_change", args=[newcomer.pk])).content.decode()
    url = reverse("admin:auth_user_delete", args=[frank.pk])  # typed, or a forged post: refused, on record
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
    newcomer = make_user("newcomer")  # deletable, selected with one who is not: nobody is deleted, and said so
    response = client.post(reverse("admin:auth_user_changelist"),
                           {"action": "delete_selected", "_selected_action": [world.alice.pk, newcomer.pk]},
                           follow=True)
    messages = " ".join(str(m) for m in response.context["messages"])
    assert "Nobody was deleted: 1 of the 2 selected is part of the evidence." in messages
    assert get_user_model().objects.filter(pk=newcomer.pk).exists()
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


def test_a_token_page_shows_the_token_and_how_to_revoke_it_with_no_save_button(client, world, make_user):
    from access.models import ApiToken
    from access.services import token_create

    token, _ = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="jenkins", applications=[world.app])
    client.force_login(make_user("root", superuser=True))
    page = client.get(reverse("admin:access_apitoken_change", args=[token.pk])).content.decode()
    assert "Revoke it from the list" in page and "jenkins" in page
    assert 'name="_save"' not in page and 'name="_continue"' not in page


def test_an_environment_stays_with_its_application(client, world, make_user):
    from django.core.exceptions import ValidationError

    from environments import services
    from releases.models import Application

    other = Application.objects.create(name="HAMS", issue_key_prefix="HAMS")
    root = make_user("root", superuser=True)
    world.qa.application = other
    with pytest.raises(ValidationError, match="stays with its application"):
        services.environment_save(actor=person(root), environment=world.qa)
    client.force_login(root)
    page = client.get(reverse("admin:environments_environment_change", args=[world.qa.pk])).content.decode()
    assert 'name="application"' not in page  # shown, not editable


def test_deleting_a_group_says_who_lost_what(client, world, make_user):
    from environments import services as env_services

    root = make_user("root", superuser=True)
    env_services.group_membership_change(actor=SYSTEM, group=world.releasers, user=world.dave, add=True)
    world.releasers.permissions.add(Permission.objects.get(codename="view_deployment"))
    client.force_login(root)
    client.post(reverse("admin:auth_group_delete", args=[world.releasers.pk]), {"post": "yes"})
    event = AuditEvent.objects.get(action="group.delete")
    assert event.data["group"] == world.releasers.name and event.actor_username == "root"
    assert {"bob", "carol", "dave"} <= set(event.data["members"])
    assert event.data["permissions"] == ["environments.view_deployment"]
    assert event.data["environment_grants"] == ["approve_environment on MAC Production",
                                                "deploy_environment on MAC Production"]


def test_administrators_lists_say_what_they_show_in_words(client, world, make_user):
    """An administrator's walk: the audit list's "otto (admin)" read as the account admin, the token list
    had a "created by label" column and no application, a revoked token revoked again said "revoked.",
    the environment's queue said "awaiting_approval", deactivated accounts looked like active ones."""
    from access.models import ApiToken
    from access.services import token_create

    root = make_user("root", superuser=True)
    client.force_login(root)
    release = world.release()
    world.to_staging(release)
    services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    page = client.get(reverse("admin:environments_environment_change", args=[world.production.pk])).content.decode()
    assert "awaiting approval: waiting for approval (0 of 1)" in page and "awaiting_approval" not in page
    ci, _ = token_create(actor=person(root), kind=ApiToken.Kind.CI, name="builder", applications=[world.app])
    tokens = client.get(reverse("admin:access_apitoken_changelist")).content.decode()
    assert "column-created_by" in tokens and "created_by_label" not in tokens
    assert re.search(r'<td class="field-scope">MAC</td>', tokens)
    client.post(reverse("admin:access_apitoken_changelist"), {"action": "revoke", "_selected_action": [ci.pk]})
    again = client.post(reverse("admin:access_apitoken_changelist"),
                        {"action": "revoke", "_selected_action": [ci.pk]}, follow=True)
    assert "builder" in again.content.decode() and "revoked already, at" in again.content.decode()
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1
    audit = client.get(reverse("admin:audit_auditevent_changelist")).content.decode()
    assert "root (in the admin)" in audit and "bob (admin)" not in audit
    users = client.get(reverse("admin:auth_user_changelist")).content.decode()
    assert "column-is_active" in users and "column-is_superuser" in users


def test_permission_lists_offer_only_what_gives_a_right(client, world, make_user):
    """The model-wide "Can approve deployments to this environment" gives nothing (only a grant on the
    environment counts), nor may anyone delete audit events: not offered, and said why; one already held
    (written outside the portal) stays shown, so that saving the form does not drop it unseen."""
    root = make_user("root", superuser=True)
    client.force_login(root)
    approve = Permission.objects.get(content_type__app_label="environments", codename="approve_environment")
    delete_event = Permission.objects.get(content_type__app_label="audit", codename="delete_auditevent")
    view_event = Permission.objects.get(content_type__app_label="audit", codename="view_auditevent")
    world.alice.user_permissions.add(delete_event)  # outside the portal
    page = client.get(reverse("admin:auth_user_change", args=[world.alice.pk])).content.decode()
    shown = offered(page, "user_permissions")
    assert str(approve.pk) not in shown and str(view_event.pk) in shown and str(delete_event.pk) in shown
    assert "Not offered: the right to deploy to or approve for an environment (given per environment" in page
    page = client.get(reverse("admin:auth_group_change", args=[world.releasers.pk])).content.decode()
    assert str(approve.pk) not in offered(page, "permissions") and str(view_event.pk) in offered(page, "permissions")
    assert str(delete_event.pk) not in offered(page, "permissions")


def test_a_group_page_asks_the_policy_of_each_right_without_a_query_each(client, world, make_user):
    """The page asks the policy of every permission it could offer (~100): what the policy reads of the
    person and the group is read once, not once per permission (it was 138 queries)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for person_ in (make_user("root", superuser=True), make_user("grp", perms=["auth.change_group",
                                                                                "auth.view_group"])):
        client.force_login(person_)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(reverse("admin:auth_group_change", args=[world.releasers.pk])).status_code == 200
        assert len(queries) <= 15, [q["sql"][:80] for q in queries]


def test_the_access_page_asks_of_every_group_in_a_fixed_number_of_queries(client, world, make_user):
    """Each user and group is asked of the policy (decide_grant); what it reads of the person (their
    groups, the accounts they made, where those are members) is read once: the same queries for 1 group
    and for 21 (it was one more query per group)."""
    from django.contrib.auth.models import Group
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    root = make_user("root", superuser=True)
    client.force_login(root)
    client.post(reverse("admin:auth_user_add"), {"username": "made", "password1": "Made-by-root-2026",
                                                 "password2": "Made-by-root-2026", "usable_password": "true"})
    url = reverse("admin:environments_environment_access", args=[world.production.pk])
    counts = []
    for extra in (0, 20):
        for n in range(extra):
            Group.objects.create(name=f"team-{n}")
        with CaptureQueriesContext(connection) as queries:
            page = client.get(url).content.decode()
        counts.append(len(queries))
        assert "You made the account made" in page  # asked, and said
    assert counts[0] == counts[1], counts
