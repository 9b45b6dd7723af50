"""Every way around separation of duties, tried the way an insider would, on every entry point.
Each attempt is refused, nothing changes, and the refusal is in the audit chain with its rule."""

import re

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.urls import reverse

from access.models import ApiToken
from access.services import group_permissions_change, token_create, user_permissions_change, user_save
from audit import chain
from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments import policy, services
from environments.models import Deployment
from releases.models import VcsAlias
from releases.services import PullRequest
from tests.conftest import SYSTEM, person

CHANGELIST = "admin:environments_deployment_changelist"


@pytest.fixture(autouse=True)
def analysts_see_deployments(world):
    view = Permission.objects.filter(codename__in=["view_deployment", "view_release", "add_deployment"])
    for user in (world.bob, world.carol):
        user.user_permissions.add(*view)


def refused_in_chain(code, *, actor, action_prefix="") -> AuditEvent:
    event = AuditEvent.objects.filter(code=code, actor_username=actor).order_by("-seq").first()
    assert event is not None, f"no {code} refusal by {actor} in the chain"
    assert event.action.endswith(".refused") and event.action.startswith(action_prefix)
    assert event.data["detail"]
    return event


@pytest.fixture
def carols_change(world):
    """A change carol implemented under her VCS alias, waiting in Production for approval by bob."""
    VcsAlias.objects.create(user=world.carol, identity="c.smith-vcs")
    release = world.release(implementers=["c.smith-vcs"])
    world.to_staging(release)
    deployment = services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    return release, deployment


def test_admin_approval_by_the_implementer_under_an_alias(client, world, carols_change):
    _, deployment = carols_change
    client.force_login(world.carol)
    page = client.get(reverse("admin:environments_deployment_change", args=[deployment.pk]))
    assert [o.action for o in page.context["offers"] if o.allowed] == ["cancel"]  # no Approve offered to her
    client.post(reverse("admin:environments_deployment_act", args=[deployment.pk]),
                {"action": "approve", "comment": "mine"}, follow=True)  # the form forged anyway
    deployment.refresh_from_db()
    assert deployment.state == Deployment.State.AWAITING_APPROVAL
    refused_in_chain("SOD_IMPLEMENTER_APPROVER", actor="carol", action_prefix="deployment.approve")


def test_approving_ones_own_requests_in_bulk_or_one_by_one(client, world):
    releases = [world.release(), world.release()]
    mine = []
    for release in releases:
        world.to_staging(release)
        mine.append(services.deployment_request(actor=person(world.bob), release=release,
                                                environment=world.production))
    client.force_login(world.bob)
    listing = client.post(reverse(CHANGELIST), {"action": "approve", "_selected_action": [d.pk for d in mine],
                                                "apply": "1"})
    assert listing.status_code == 200  # the list has no actions: a forged bulk approval does nothing
    for deployment in mine:
        client.post(reverse("admin:environments_deployment_act", args=[deployment.pk]), {"action": "approve"})
    assert set(Deployment.objects.filter(pk__in=[d.pk for d in mine]).values_list("state", flat=True)) == {
        "awaiting_approval"}
    assert AuditEvent.objects.filter(code="SOD_REQUESTER_APPROVER", actor_username="bob").count() == 2


def test_implementer_matched_only_by_email_case_cannot_request(world):
    release = world.release(implementers=["BOB@Example.COM"])
    world.to_staging(release)
    with pytest.raises(PolicyRefusal):
        services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    refused_in_chain("SOD_IMPLEMENTER_REQUESTER", actor="bob", action_prefix="deployment.request")


@pytest.mark.parametrize("identity", [
    "Bob Example <bob@example.com>",  # git's "%an <%ae>"
    "bob+ci@example.com",  # the same mailbox
    "b\u043eb@example.com",  # a Cyrillic 'о'
    "\uff42\uff4f\uff42@example.com",  # full-width letters
    "Bob <B\u03bfb+x@Example.com>",  # all of it, a Greek 'ο'
    "Bob <bob@example.com>\u2800",  # a braille blank after it
    "bob@example.com\ufe0f", "b\u034fob@example.com", "bob@example.com\U000e0001",  # marks and tags that do not show
    "bob@ex\u0251mple.com",  # a Latin alpha
    "Bob <bob@example.com> (work)", "bob@example.com (Bob)", "mailto:bob@example.com", "Bob <bob@example.com>.",
])
def test_implementer_shown_as_bob_is_bob(world, identity):
    """What shows bob's address is bob: the release names him as its implementer, and he may neither
    request nor approve it, nor review it as its pull request's reviewer."""
    release = world.release(implementers=[identity])
    assert list(release.implementers.values_list("user__username", flat=True)) == ["bob"]
    world.to_staging(release)
    with pytest.raises(PolicyRefusal):
        services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    refused_in_chain("SOD_IMPLEMENTER_REQUESTER", actor="bob", action_prefix="deployment.request")
    deployment = services.deployment_request(actor=person(world.erin), release=release, environment=world.production)
    with pytest.raises(PolicyRefusal):
        services.deployment_approve(actor=person(world.bob), deployment_id=deployment.pk)
    refused_in_chain("SOD_IMPLEMENTER_APPROVER", actor="bob", action_prefix="deployment.approve")


@pytest.mark.parametrize("identity", [
    "a\u04c0ice@example.com",  # a Cyrillic capital palochka (stored lower-case: the small one)
    "a\u04cfice@example.com",  # the small palochka, which Unicode's table takes for an i
    "A1ICE@EXAMPLE.COM",  # a one
])
def test_implementer_drawn_as_alice_is_alice(world, identity):
    """An l drawn as a palochka or a 1 is alice's: she may not approve what such an identity implemented.
    (An upper-case I is stored lower-case, an i: 'aiice' shows as what it is.)"""
    release = world.release(implementers=[identity])
    assert list(release.implementers.values_list("user__username", flat=True)) == ["alice"]
    world.to_staging(release)
    deployment = services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    with pytest.raises(PolicyRefusal):
        services.deployment_approve(actor=person(world.alice), deployment_id=deployment.pk)


def test_a_reviewer_shown_as_the_implementer_is_no_independent_review(world):
    world.production.requires_code_review = True
    world.production.save()
    pr = PullRequest(url="https://git.example.com/pr/1", author="alice@example.com",
                     reviewers=("Carol <carol+review@example.com>",), approved_at="2026-11-29T10:00:00+00:00")
    release = world.release(implementers=["c\u0430rol@example.com"], pull_request=pr)  # a Cyrillic 'а'
    world.to_staging(release)
    with pytest.raises(PolicyRefusal) as refused:
        services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    assert refused.value.refusal.code == "NO_CODE_REVIEW"


def test_identities_of_other_scripts_name_nobody_they_do_not_show(world, make_user):
    """One script throughout is any script: иван is not ivan, and 'Name <e-mail>' names the address only."""
    ivan = make_user("ivan")
    release = world.release(implementers=["\u0438\u0432\u0430\u043d@example.com", "Ivan <alice@example.com>"])
    assert dict(release.implementers.values_list("identity", "user__username")) == {
        "иван@example.com": None, "ivan <alice@example.com>": "alice"}
    assert not policy.implementers_of(release).match(ivan)


@pytest.mark.parametrize("kind", ["ci", "implementer", "requester"])
def test_the_api_with_each_kind_of_token(client, world, carols_change, kind):
    _, deployment = carols_change
    if kind == "ci":
        _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.CI, name="ci", applications=[world.app])
        expected, who = "CI_TOKEN_RESTRICTED", "ci:ci"
    else:
        user = world.carol if kind == "implementer" else world.bob
        _, raw = token_create(actor=SYSTEM, kind=ApiToken.Kind.PERSONAL, name=user.username, user=user)
        expected = "SOD_IMPLEMENTER_APPROVER" if kind == "implementer" else "SOD_REQUESTER_APPROVER"
        who = user.username
    response = client.post(f"/api/v1/deployments/{deployment.pk}/approve", {"comment": "x"},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 403 and response.json()["code"] == expected
    refused_in_chain(expected, actor=who, action_prefix="deployment.approve")


def test_a_token_made_with_a_management_command_acts_with_its_users_rights_only(client, world, carols_change, capsys):
    _, deployment = carols_change
    call_command("create_token", "--user", "carol")
    raw = capsys.readouterr().out.strip().splitlines()[-1]
    response = client.post(f"/api/v1/deployments/{deployment.pk}/approve", {},
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.json()["code"] == "SOD_IMPLEMENTER_APPROVER"
    refused_in_chain("SOD_IMPLEMENTER_APPROVER", actor="carol")


def test_a_superuser_has_no_bypass(world, make_user):
    root = make_user("root", superuser=True)
    release = world.release(implementers=["root@example.com"])
    world.to_staging(release)
    with pytest.raises(PolicyRefusal):
        services.deployment_request(actor=person(root), release=release, environment=world.production)
    refused_in_chain("NOT_RELEASER", actor="root", action_prefix="deployment.request")
    pending = services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    with pytest.raises(PolicyRefusal):
        services.deployment_approve(actor=person(root), deployment_id=pending.pk)
    refused_in_chain("NOT_RELEASER", actor="root", action_prefix="deployment.approve")


def test_granting_oneself_or_ones_group_the_right_to_deploy_approve_or_grant(client, world, make_user):
    root = make_user("root", superuser=True)
    for grantee in ({"user": root}, {"group": world.releasers}):
        if "group" in grantee:
            services.group_membership_change(actor=SYSTEM, group=world.releasers, user=root, add=True)
        for codename in ("deploy_environment", "approve_environment"):
            with pytest.raises(PolicyRefusal):
                services.environment_grant(actor=person(root), environment=world.production, codename=codename,
                                           **grantee)
    assert AuditEvent.objects.filter(code="SELF_GRANT", action="environment.grant.refused").count() == 4
    helpdesk = make_user("helpdesk", perms=["auth.change_user"])
    grant = Permission.objects.get(codename="change_environment")
    with pytest.raises(PolicyRefusal):
        user_permissions_change(actor=person(helpdesk), user=helpdesk, permissions=[grant])
    refused_in_chain("SELF_GRANT", actor="helpdesk", action_prefix="user.permissions")
    assert not helpdesk.has_perm("environments.change_environment")


def test_an_account_administrator_does_not_take_over_a_superuser(client, world, make_user):
    """Setting a superuser's password or e-mail is becoming them: only a superuser may."""
    root = make_user("root", superuser=True)
    eve = make_user("eve", perms=["auth.change_user", "auth.view_user"])
    client.force_login(eve)
    page = client.post(reverse("admin:auth_user_password_change", args=[root.pk]),
                       {"usable_password": "true", "password1": "Takeover-2026!", "password2": "Takeover-2026!"},
                       follow=True)
    assert "Only a superuser may change the account of root" in page.content.decode()
    root.refresh_from_db()
    assert root.check_password("root")
    refused_in_chain("NOT_PERMITTED", actor="eve", action_prefix="user.set_password")
    client.post(reverse("admin:auth_user_change", args=[root.pk]), {
        "username": "root", "email": "eve@example.com", "is_active": "on", "is_staff": "on", "is_superuser": "on",
        "last_login_0": "", "last_login_1": "", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"})
    root.refresh_from_db()
    assert root.email == "root@example.com"
    refused_in_chain("NOT_PERMITTED", actor="eve", action_prefix="user.change")


def test_a_new_e_mail_does_not_take_an_implementer_out_of_separation_of_duties(client, world, make_user):
    """CI names implementers by the identities they committed under; an administrator changing carol's
    e-mail (or user name) afterwards does not make her a stranger to her own change."""
    root = make_user("root", superuser=True)
    client.force_login(root)
    client.post(reverse("admin:auth_user_change", args=[world.carol.pk]), {
        "username": "carol.s", "email": "carol+x@example.com", "is_active": "on", "is_staff": "on",
        "groups": [world.releasers.pk], "last_login_0": "", "last_login_1": "",
        "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
    })
    world.carol.refresh_from_db()
    assert (world.carol.username, world.carol.email) == ("carol.s", "carol+x@example.com")
    assert set(VcsAlias.objects.filter(user=world.carol).values_list("identity", flat=True)) == {
        "carol", "carol@example.com"}
    for implementer in ("Carol@Example.com", "carol"):
        release = world.release(implementers=[implementer])
        world.to_staging(release)
        with pytest.raises(PolicyRefusal):
            services.deployment_request(actor=person(world.carol), release=release, environment=world.production)
        refused_in_chain("SOD_IMPLEMENTER_REQUESTER", actor="carol.s", action_prefix="deployment.request")
    assert AuditEvent.objects.filter(action="vcs_alias.add", actor_username="root").count() == 2


def test_an_identity_cannot_be_handed_to_someone_else_first(client, world, make_user):
    """eve makes bob's e-mail dave's alias, then gives bob a new e-mail: bob would no longer be the
    implementer of what he committed. An alias names nobody who is someone else already."""
    eve = make_user("eve", perms=["releases.add_vcsalias", "releases.view_vcsalias", "auth.change_user"])
    client.force_login(eve)
    url = reverse("admin:releases_vcsalias_add")
    for identity in ("BOB@Example.com", "bob"):
        page = client.post(url, {"user": world.dave.pk, "identity": identity}, follow=True)
        assert page.status_code == 200 and "IDENTITY_TAKEN" in page.content.decode()
    assert not VcsAlias.objects.exists()
    refused_in_chain("IDENTITY_TAKEN", actor="eve", action_prefix="vcs_alias.add")
    client.post(url, {"user": world.dave.pk, "identity": "d.vcs"})
    page = client.post(url, {"user": world.dave.pk, "identity": "D.VCS"}, follow=True)  # the same, in other case
    assert page.status_code == 200 and "is already a VCS alias of dave" in page.content.decode()
    assert list(VcsAlias.objects.values_list("identity", flat=True)) == ["d.vcs"]


def test_a_group_admin_gives_their_own_group_no_more_rights_and_joins_no_group(client, world, make_user):
    """An auditor trusted with editing groups: their own group's permissions (the right to grant among
    them) and a group of their own choosing stay out of reach; another administrator may, on record."""
    from django.contrib.auth.models import Group

    auditors = Group.objects.create(name="auditors")
    analysts = Group.objects.create(name="analysts")  # model permissions only, no environment grant
    analysts.permissions.add(Permission.objects.get(codename="add_deployment"))
    dave = make_user("dave2", groups=[auditors], perms=["auth.change_group", "auth.view_group", "auth.change_user",
                                                        "auth.view_user"])
    grant = Permission.objects.get(codename="change_environment")
    client.force_login(dave)
    page = client.post(reverse("admin:auth_group_change", args=[auditors.pk]),
                       {"name": "auditors", "permissions": [grant.pk]}, follow=True)
    shown = [str(m) for m in page.context["messages"]]
    assert any("SELF_GRANT" in m and "auditors" in m for m in shown), shown
    assert not any("successfully" in m for m in shown), shown  # the page does not claim a change it refused
    assert not auditors.permissions.exists() and not dave.has_perm("environments.change_environment")
    from django.contrib.admin.models import LogEntry
    assert not LogEntry.objects.filter(object_id=str(auditors.pk)).exists()  # no "Changed Permissions." either
    refused_in_chain("SELF_GRANT", actor="dave2", action_prefix="group.permissions")
    page = client.post(reverse("admin:auth_user_change", args=[dave.pk]), {
        "username": "dave2", "email": dave.email, "is_active": "on", "is_staff": "on",
        "groups": [auditors.pk, analysts.pk], "last_login_0": "", "last_login_1": "",
        "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
    }, follow=True)
    assert list(dave.groups.all()) == [auditors], page.content.decode()[:2000]
    joined = refused_in_chain("SELF_GRANT", actor="dave2", action_prefix="group.add_member")
    assert joined.via == "admin" and joined.data["remote_addr"] == "127.0.0.1"  # from where, as every admin event
    root = make_user("root", superuser=True)
    client.force_login(root)
    client.post(reverse("admin:auth_group_change", args=[auditors.pk]), {"name": "auditors", "permissions": [grant.pk]})
    assert list(auditors.permissions.all()) == [grant]
    event = AuditEvent.objects.filter(action="group.permissions", actor_username="root").get()
    assert event.data["added"] == ["environments.change_environment"] and event.data["removed"] == []
    # a rename is on the chain too: the grants' and memberships' events name the group as it was called
    client.post(reverse("admin:auth_group_change", args=[auditors.pk]), {"name": "audit", "permissions": [grant.pk]})
    renamed = AuditEvent.objects.get(action="group.rename")
    assert (renamed.actor_username, renamed.data["from"], renamed.data["to"]) == ("root", "auditors", "audit")
    assert Group.objects.get(pk=auditors.pk).name == "audit"
    assert chain.verify().ok


def test_weakening_the_control_to_ship_ones_own_change_needs_a_second_person(world, make_user):
    root = make_user("root", superuser=True)
    world.production.restricted, world.production.required_approvals = False, 0
    proposal = services.environment_save(actor=person(root), environment=world.production, reason="speed")
    assert proposal.state == "proposed"
    with pytest.raises(PolicyRefusal):
        services.control_change_approve(actor=person(root), change_id=proposal.pk)
    refused_in_chain("SOD_PROPOSER_APPROVER", actor="root", action_prefix="control_change.approve")
    assert chain.verify().ok


def test_two_tags_of_one_shared_mailbox_are_two_people(world, make_user):
    """bob+ci@ is bob@'s mailbox; dev+alice@ and dev+bob@ of a shared mailbox are not each other."""
    ann, ben = make_user("ann", email="dev+ann@example.com"), make_user("ben", email="dev+ben@example.com")
    release = world.release(implementers=["dev+ann@example.com"])
    assert policy.implementers_of(release).match(ann) and not policy.implementers_of(release).match(ben)
    plain = world.release(implementers=["Dev <dev@example.com>"])
    assert policy.implementers_of(plain).match(ann) and policy.implementers_of(plain).match(ben)  # the mailbox itself


def test_the_access_reports_index_says_what_match_says(world):
    """The access report asks which of a year's releases each holder implemented at once
    (ImplementersIndex); it answers what Implementers.match answers release by release."""
    releases = [world.release(implementers=ids) for ids in (
        ["Bob Example <bob@example.com>"], ["c\u0430rol+x@example.com"], ["alice@example.com", "erin"], ["nobody"],
        ["dev+x@example.com"])]
    index = policy.ImplementersIndex(
        (r.version, i.identity, i.user_id) for r in releases for i in r.implementers.all())
    for user in (world.alice, world.bob, world.carol, world.erin, world.dave):
        by_match = {r.version for r in releases if policy.implementers_of(r).match(user)}
        assert index.implemented_by(user, policy.person_identities(user)) == by_match, user
    assert index.implemented_by(world.carol, policy.person_identities(world.carol)) == {releases[1].version}


def test_an_administrator_does_not_empower_an_account_they_made(client, world, make_user):
    """One person, two accounts: root makes "sock" in the admin, then tries to make it a superuser (to
    approve root's own control changes), a releaser (to approve root's deployments), to give it a
    permission or a grant. Each is refused on record, and the pages offer none of it; otto, another
    administrator, may (four eyes between making an account and empowering it)."""
    from django.contrib.auth import get_user_model

    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    client.force_login(root)
    client.post(reverse("admin:auth_user_add"), {"username": "sock", "password1": "Sock-puppet-2026",
                                                 "password2": "Sock-puppet-2026", "usable_password": "true"})
    sock = get_user_model().objects.get(username="sock")
    page = client.get(reverse("admin:auth_user_change", args=[sock.pk])).content.decode()
    assert "You made the account sock; another administrator must give it rights" in page
    assert re.search(r'<input type="checkbox" name="is_superuser"[^>]*disabled', page)
    access = client.get(reverse("admin:environments_environment_access", args=[world.production.pk]))
    assert f'<option value="{sock.pk}">' not in access.content.decode()
    sock.is_staff, sock.is_superuser = True, True
    with pytest.raises(PolicyRefusal):
        user_save(actor=person(root), user=sock)
    with pytest.raises(PolicyRefusal):
        services.group_membership_change(actor=person(root), group=world.releasers, user=sock, add=True)
    with pytest.raises(PolicyRefusal):
        services.environment_grant(actor=person(root), environment=world.production,
                                   codename="approve_environment", user=sock)
    with pytest.raises(PolicyRefusal):
        user_permissions_change(actor=person(root), user=sock,
                                permissions=[Permission.objects.get(codename="change_environment")])
    made = AuditEvent.objects.filter(code="SOD_ACCOUNT_MAKER", actor_username="root")
    assert set(made.values_list("action", flat=True)) == {
        "user.change.refused", "group.add_member.refused", "environment.grant.refused", "user.permissions.refused"}
    sock.refresh_from_db()
    assert not (sock.is_staff or sock.is_superuser or sock.groups.exists())
    assert not sock.has_perm("environments.approve_environment", world.production)
    # revoking from it is no empowering; and another administrator may give it rights, on record
    services.environment_revoke(actor=person(root), environment=world.production, codename="deploy_environment",
                                user=sock)
    services.group_membership_change(actor=person(otto), group=world.releasers, user=sock, add=True)
    assert sock.groups.filter(pk=world.releasers.pk).exists()
    # nor through a group sock is in: the group's rights are sock's (a second walk found this way)
    with pytest.raises(PolicyRefusal) as info:
        group_permissions_change(actor=person(root), group=world.releasers,
                                 permissions=[Permission.objects.get(codename="change_user")])
    assert info.value.refusal.code == "SOD_ACCOUNT_MAKER" and "holds the account sock" in info.value.refusal.detail
    with pytest.raises(PolicyRefusal):
        services.environment_grant(actor=person(root), environment=world.staging, codename="deploy_environment",
                                   group=world.releasers)
    assert not world.releasers.permissions.filter(codename="change_user").exists()
    assert chain.verify().ok


def test_an_account_administrator_raises_nobody_above_themselves(client, world, make_user):
    """Someone trusted with accounts but not a superuser (a second walk, as an account holding only
    "Can change user", made alice a superuser): only a superuser makes a superuser or gives a right
    they do not hold, through the admin's form or the services, each refusal on record."""
    eve = make_user("eve", perms=["auth.change_user", "auth.view_user", "auth.change_group", "auth.view_group"])
    client.force_login(eve)
    data = {"username": "alice", "email": world.alice.email, "is_active": "on", "is_staff": "on",
            "is_superuser": "on", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}
    client.post(reverse("admin:auth_user_change", args=[world.alice.pk]), data)  # forged: the box is disabled
    world.alice.refresh_from_db()
    assert not world.alice.is_superuser
    assert refused_in_chain("NOT_PERMITTED", actor="eve", action_prefix="user.change").data["detail"] == (
        "Only a superuser may make a superuser.")
    grant = Permission.objects.get(codename="change_environment")
    with pytest.raises(PolicyRefusal):
        user_permissions_change(actor=person(eve), user=world.alice, permissions=[grant])
    with pytest.raises(PolicyRefusal):
        group_permissions_change(actor=person(eve), group=world.releasers, permissions=[grant])
    assert not world.alice.has_perm("environments.change_environment")
    with pytest.raises(PolicyRefusal) as info:  # joining the releasers is receiving their grants
        services.group_membership_change(actor=person(eve), group=world.releasers, user=world.alice, add=True)
    assert "only someone who may grant them adds members" in info.value.refusal.detail
    user_permissions_change(actor=person(eve), user=world.alice,  # a right eve holds: given, on record
                            permissions=[Permission.objects.get(codename="view_user")])
    assert AuditEvent.objects.filter(action="user.permissions", actor_username="eve").exists()
