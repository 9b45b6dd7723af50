"""Four eyes on the controls themselves: a weaker control of a restricted environment is a proposal
that a different administrator must approve; a stricter one applies at once."""

import datetime as dt
import re

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from audit import chain
from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from environments import services
from environments.models import ControlChange, Deployment, Environment, FreezeWindow
from evidence.reports import Period, exceptions_rows
from tests.conftest import person

FORM = "admin:environments_environment_change"


def change_form(environment: Environment, windows=(), **changes) -> dict:
    """The environment's admin form as the browser posts it, with `changes` applied."""
    data = {
        "application": environment.application_id, "name": environment.name,
        "promotes_from": environment.promotes_from_id or "", "required_approvals": environment.required_approvals,
        "playbook": environment.playbook, "inventory": environment.inventory,
        "playbook_repo": environment.playbook_repo, "playbook_ref": environment.playbook_ref,
        "change_reason": "",
        "freeze_windows-TOTAL_FORMS": len(windows), "freeze_windows-INITIAL_FORMS": len(windows),
        "freeze_windows-MIN_NUM_FORMS": 0, "freeze_windows-MAX_NUM_FORMS": 1000,
    }
    for flag in ("restricted", "auto_deploy", "requires_code_review"):
        if getattr(environment, flag):
            data[flag] = "on"
    for i, (window, fields) in enumerate(windows):
        data.update({f"freeze_windows-{i}-id": window.pk, f"freeze_windows-{i}-environment": environment.pk,
                     f"freeze_windows-{i}-starts_at_0": window.starts_at.strftime("%Y-%m-%d"),
                     f"freeze_windows-{i}-starts_at_1": window.starts_at.strftime("%H:%M:%S"),
                     f"freeze_windows-{i}-ends_at_0": window.ends_at.strftime("%Y-%m-%d"),
                     f"freeze_windows-{i}-ends_at_1": window.ends_at.strftime("%H:%M:%S"),
                     f"freeze_windows-{i}-reason": window.reason, f"freeze_windows-{i}-recurrence": "",
                     f"freeze_windows-{i}-duration": "", f"freeze_windows-{i}-timezone": "UTC", **fields})
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        else:
            data[name] = "on" if value is True else value
    return data


@pytest.fixture
def admins(world, make_user):
    root = make_user("root", superuser=True)
    other = make_user("otto", superuser=True)
    return root, other


def test_a_change_that_can_never_apply_is_not_asked_for_a_reason(client, world, admins):
    """Production with no approval is invalid while it stays restricted: the form says that, not also
    "say why" (a reason could not make it valid; an administrator's walk found the two errors side by side)."""
    root, _ = admins
    client.force_login(root)
    url = reverse(FORM, args=[world.production.pk])
    errors = client.post(url, change_form(world.production, required_approvals=0)).context["adminform"].form.errors
    assert errors == {"required_approvals": ["A restricted environment needs at least one approval."]}
    errors = client.post(url, change_form(world.production, required_approvals=0, change_reason="faster")
                         ).context["adminform"].form.errors
    assert errors == {"required_approvals": ["A restricted environment needs at least one approval."]}
    assert not ControlChange.objects.exists()


def test_a_superuser_cannot_weaken_production_alone_then_ship_his_own_change(client, world, admins):
    root, otto = admins
    world.production.requires_code_review = True
    world.production.save(update_fields=["requires_code_review"])
    client.force_login(root)
    url = reverse(FORM, args=[world.production.pk])
    weaker = change_form(world.production, restricted=False, required_approvals=0, requires_code_review=False)
    refused = client.post(url, weaker)
    assert refused.status_code == 200 and "say why" in refused.content.decode()  # a reason is required

    response = client.post(url, {**weaker, "change_reason": "faster releases"}, follow=True)
    assert "Proposed, not applied yet" in response.content.decode()
    production = Environment.objects.get(pk=world.production.pk)
    assert (production.restricted, production.required_approvals, production.requires_code_review) == (True, 1, True)
    proposal = ControlChange.objects.get()
    assert proposal.changes == {"restricted": [True, False], "required_approvals": [1, 0],
                                "requires_code_review": [True, False]}
    assert AuditEvent.objects.filter(action="control_change.propose", actor_username="root").exists()

    # root implemented a change: with Production still restricted he can neither request nor approve it
    release = world.release(implementers=["root@example.com"])
    world.to_staging(release)
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_request(actor=person(root), release=release, environment=world.production)
    assert info.value.refusal.code == "NOT_RELEASER"

    # nor approve his own proposal, through the admin action: the confirmation offers nothing and says why
    asked = client.post(reverse("admin:environments_controlchange_changelist"),
                        {"action": "approve", "_selected_action": [proposal.pk]}).content.decode()
    assert 'name="apply"' not in asked and "Nothing selected is yours to act on" in asked
    assert re.search(r'class="why-not">Not offered: You proposed this change[^<]*different administrator', asked)
    client.post(reverse("admin:environments_controlchange_changelist"),
                {"action": "approve", "_selected_action": [proposal.pk], "apply": "1", "comment": "me"})
    proposal.refresh_from_db()
    assert proposal.state == ControlChange.State.PROPOSED
    refusal = AuditEvent.objects.get(action="control_change.approve.refused")
    assert (refusal.code, refusal.actor_username) == ("SOD_PROPOSER_APPROVER", "root")

    # a different administrator approves: applied, both in the chain and in the exceptions report
    client.force_login(otto)
    asked = client.post(reverse("admin:environments_controlchange_changelist"),
                        {"action": "approve", "_selected_action": [proposal.pk]}).content.decode()
    assert 'name="apply"' in asked and "Not offered" not in asked
    page = client.get(reverse("admin:environments_controlchange_change", args=[proposal.pk])).content.decode()
    assert "restricted: True -&gt; False" in page and '{"restricted"' not in page  # in words, as in the list
    client.post(reverse("admin:environments_controlchange_changelist"),
                {"action": "approve", "_selected_action": [proposal.pk], "apply": "1", "comment": "agreed"})
    production.refresh_from_db()
    assert (production.restricted, production.required_approvals, production.requires_code_review) == (
        False, 0, False)
    approved = AuditEvent.objects.get(action="control_change.approve")
    assert (approved.actor_username, approved.data["proposed_by"]) == ("otto", "root")
    now = timezone.now()
    rows = [r for r in exceptions_rows(Period(now - dt.timedelta(days=1), now + dt.timedelta(days=1)))
            if r[0] == "control_change"]
    assert len(rows) == 1 and "proposed by root" in rows[0][9] and "by otto" in rows[0][9]
    assert chain.verify().ok


def test_reject_first_then_a_new_proposal_is_approved(world, make_user):
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    world.production.required_approvals = 2
    world.production.save(update_fields=["required_approvals"])
    world.production.required_approvals = 1
    proposal = services.environment_save(actor=person(root), environment=world.production, reason="two is slow")
    with pytest.raises(PolicyRefusal) as info:
        services.control_change_reject(actor=person(root), change_id=proposal.pk, comment="hm")
    assert info.value.refusal.code == "SOD_PROPOSER_APPROVER"
    services.control_change_reject(actor=person(otto), change_id=proposal.pk, comment="keep two")
    assert Environment.objects.get(pk=world.production.pk).required_approvals == 2
    with pytest.raises(PolicyRefusal) as info:
        services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert info.value.refusal.code == "NOT_PROPOSED"

    production = Environment.objects.get(pk=world.production.pk)
    production.required_approvals = 1
    again = services.environment_save(actor=person(otto), environment=production, reason="agreed in the CAB")
    services.control_change_approve(actor=person(root), change_id=again.pk, comment="ok")
    assert Environment.objects.get(pk=world.production.pk).required_approvals == 1


def test_stricter_applies_at_once_and_a_stale_proposal_is_refused(world, make_user):
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    world.production.playbook = "rolling_upgrade.yml"
    proposal = services.environment_save(actor=person(root), environment=world.production, reason="new playbook")
    assert isinstance(proposal, ControlChange) and proposal.changes == {"playbook": ["deploy_demo.yml",
                                                                                      "rolling_upgrade.yml"]}
    stricter = Environment.objects.get(pk=world.production.pk)
    stricter.required_approvals = 2
    assert services.environment_save(actor=person(root), environment=stricter) == stricter  # applied at once
    event = AuditEvent.objects.filter(action="environment.change").latest("seq")
    assert event.data["changed"] == {"required_approvals": [1, 2]}
    stricter.playbook = "other.yml"
    Environment.objects.filter(pk=stricter.pk).update(playbook="other.yml")  # changed outside the proposal
    with pytest.raises(PolicyRefusal) as info:
        services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert info.value.refusal.code == "STALE_PROPOSAL"
    # a stale proposal does not wait for ever: it is rejected (nothing changes), on record
    rejected = services.control_change_reject(actor=person(otto), change_id=proposal.pk, comment="overtaken")
    assert rejected.state == ControlChange.State.REJECTED
    assert Environment.objects.get(pk=stricter.pk).playbook == "other.yml"
    assert AuditEvent.objects.filter(action="control_change.reject", actor_username="otto").exists()


def test_the_path_to_a_restricted_environment_changes_only_with_a_second_administrator(world, make_user):
    """Staging taking releases that skipped QA would weaken Production's path: four eyes, as on Production."""
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    world.staging.promotes_from = None
    proposal = services.environment_save(actor=person(root), environment=world.staging, reason="QA is down")
    assert isinstance(proposal, ControlChange)
    assert proposal.changes == {"promotes_from": [world.qa.pk, None], "path": [["QA"], []]}
    assert Environment.objects.get(pk=world.staging.pk).promotes_from_id == world.qa.pk
    services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert Environment.objects.get(pk=world.staging.pk).promotes_from_id is None
    dev = Environment.objects.create(application=world.app, name="Dev")  # no restricted environment below it
    dev.promotes_from = world.qa
    assert services.environment_save(actor=person(root), environment=dev) == dev  # applied at once


@pytest.mark.parametrize("switch", ["path cut", "cycle"])
def test_a_proposed_path_is_approved_only_as_it_was_proposed(world, make_user, switch):
    """Bait and switch: propose Production <- Hotfix (Hotfix <- Staging), then change Hotfix's own path
    while nothing restricted depends on it yet. The approval finds the path changed and refuses."""
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    hotfix = Environment.objects.create(application=world.app, name="Hotfix", promotes_from=world.staging)
    world.production.promotes_from = hotfix
    proposal = services.environment_save(actor=person(root), environment=world.production, reason="hotfix lane")
    assert proposal.changes["path"] == [["Staging", "QA"], ["Hotfix", "Staging", "QA"]]
    assert proposal.summary() == "environments passed before it: QA then Staging -> QA then Staging then Hotfix"
    hotfix.promotes_from = None if switch == "path cut" else world.production
    if switch == "cycle":  # a cycle through the proposal is only there once it is applied
        Environment.objects.filter(pk=hotfix.pk).update(promotes_from=world.production)
    else:
        services.environment_save(actor=person(root), environment=hotfix)  # feeds nothing restricted yet
    with pytest.raises(PolicyRefusal) as info:
        services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert info.value.refusal.code == "STALE_PROPOSAL" and "path" in info.value.refusal.detail
    assert Environment.objects.get(pk=world.production.pk).promotes_from_id == world.staging.pk


def test_a_restricted_environment_is_renamed_only_with_a_second_administrator(world, make_user):
    """Renamed away, its name could be taken by an environment that is not restricted."""
    root = make_user("root", superuser=True)
    world.production.name = "Production-old"
    proposal = services.environment_save(actor=person(root), environment=world.production, reason="tidy up")
    assert isinstance(proposal, ControlChange) and proposal.changes == {"name": ["Production", "Production-old"]}
    assert Environment.objects.get(pk=world.production.pk).name == "Production"


def test_someone_without_the_right_cannot_even_propose(world):
    world.production.restricted, world.production.required_approvals = False, 0
    with pytest.raises(PolicyRefusal) as info:
        services.environment_save(actor=person(world.bob), environment=world.production, reason="x")
    assert info.value.refusal.code == "NOT_PERMITTED"
    assert AuditEvent.objects.filter(action="control_change.propose.refused", actor_username="bob").exists()


def test_a_running_freeze_is_shortened_or_ended_only_with_a_reason_and_a_second_administrator(world, make_user):
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    now = timezone.now()
    window = services.freeze_window_save(actor=person(root), window=FreezeWindow(
        environment=world.production, starts_at=now - dt.timedelta(hours=1), ends_at=now + dt.timedelta(hours=3),
        reason="quarter close"))
    assert AuditEvent.objects.filter(action="freeze.create").exists()
    with pytest.raises(ValidationError, match="needs a stated reason"):
        services.freeze_window_end(actor=person(root), window=window)
    proposal = services.freeze_window_end(actor=person(root), window=window, reason="close done early")
    assert isinstance(proposal, ControlChange) and FreezeWindow.objects.get(pk=window.pk).ends_at == window.ends_at
    services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert FreezeWindow.objects.get(pk=window.pk).ends_at <= timezone.now()

    later = services.freeze_window_save(actor=person(root), window=FreezeWindow(
        environment=world.production, starts_at=now + dt.timedelta(days=1), ends_at=now + dt.timedelta(days=2),
        reason="release freeze"))
    services.freeze_window_end(actor=person(root), window=later)  # not begun: withdrawn at once
    assert not FreezeWindow.objects.filter(pk=later.pk).exists()
    assert AuditEvent.objects.filter(action="freeze.remove").exists()


def test_moving_a_running_freeze_elsewhere_lifts_it_so_it_needs_a_reason_and_a_second_administrator(world,
                                                                                                      make_user):
    root = make_user("root", superuser=True)
    now = timezone.now()
    window = services.freeze_window_save(actor=person(root), window=FreezeWindow(
        environment=world.production, starts_at=now - dt.timedelta(hours=1), ends_at=now + dt.timedelta(hours=3),
        reason="quarter close"))
    window.environment = world.qa
    with pytest.raises(ValidationError, match="needs a stated reason"):
        services.freeze_window_save(actor=person(root), window=window)
    proposal = services.freeze_window_save(actor=person(root), window=window, reason="wrong environment")
    assert isinstance(proposal, ControlChange)
    assert FreezeWindow.objects.get(pk=window.pk).environment_id == world.production.pk
    release = world.release()
    world.to_staging(release)
    with pytest.raises(PolicyRefusal) as info:
        services.deployment_request(actor=person(world.bob), release=release, environment=world.production)
    assert info.value.refusal.code == "FREEZE_WINDOW"
    widened = FreezeWindow.objects.get(pk=window.pk)
    widened.environment, widened.application = None, world.app  # every environment of MAC: stricter, at once
    assert services.freeze_window_save(actor=person(root), window=widened).application_id == world.app.pk


def test_a_freeze_edited_in_the_admin_goes_through_the_service(client, world, make_user):
    root = make_user("root", superuser=True)
    Group.objects.create(name="unused")
    now = timezone.now().replace(microsecond=0)
    window = FreezeWindow.objects.create(environment=world.production, starts_at=now - dt.timedelta(hours=1),
                                         ends_at=now + dt.timedelta(hours=3), reason="quarter close")
    client.force_login(root)
    shorter = {"freeze_windows-0-ends_at_1": (now + dt.timedelta(minutes=5)).strftime("%H:%M:%S"),
               "freeze_windows-0-ends_at_0": (now + dt.timedelta(minutes=5)).strftime("%Y-%m-%d")}
    response = client.post(reverse(FORM, args=[world.production.pk]),
                           {**change_form(world.production, windows=[(window, shorter)]),
                            "change_reason": "done early"}, follow=True)
    assert "Proposed, not applied yet" in response.content.decode()
    assert FreezeWindow.objects.get(pk=window.pk).ends_at == window.ends_at
    assert ControlChange.objects.get().freeze_window_id == window.pk
    assert not Deployment.objects.exists()


def test_the_board_tells_an_administrator_what_waits_for_a_second_one(client, world, admins):
    """A proposal waits where the second administrator looks first (an administrators' walk found them
    piling up unseen): the board counts it for every other administrator, and tells its proposer it waits."""
    root, otto = admins
    client.force_login(root)
    client.post(reverse(FORM, args=[world.production.pk]),
                change_form(world.production, restricted=False, change_reason="reviewers away"))
    assert ControlChange.objects.filter(state=ControlChange.State.PROPOSED).count() == 1
    mine = client.get(reverse("admin:index"))
    assert mine.context["waiting_count"] == 0
    assert "1 control change you proposed</a> waits for another administrator." in mine.content.decode()
    client.force_login(otto)
    theirs = client.get(reverse("admin:index"))
    assert theirs.context["waiting_count"] == 1
    assert "1 control change proposed by another administrator</a>" in theirs.content.decode()
    client.force_login(world.bob)  # an analyst administers nothing: no word of it
    assert "control change" not in client.get(reverse("admin:index")).content.decode()
