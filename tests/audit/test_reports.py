"""SOX reports: the population, its exceptions, who can deploy, the chain itself, and the checks an
auditor runs without the portal."""

import csv
import datetime as dt
import io
import json
import re
import subprocess
import zipfile
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone
from guardian.shortcuts import assign_perm, remove_perm

from access.services import group_delete, group_permissions_change, group_rename, user_delete, user_save
from audit import chain, triggers
from audit.actors import Actor
from audit.models import AuditEvent
from core.decisions import PolicyRefusal
from core.times import iso
from environments import services
from environments.models import Approval, Deployment, Environment, FreezeWindow
from evidence import checkpoint as checkpoints
from evidence import reconcile
from evidence.reports import Export, Period, safe_cell
from portal.management.demo_history import moved_time
from releases.models import Build, Release, VcsAlias
from releases.services import PullRequest, vcs_alias_add
from tests.audit.forgery import forge, strip_seals
from tests.conftest import SYSTEM, person

State = Deployment.State
DOCS = Path(__file__).resolve().parents[2] / "docs" / "auditors.md"


def whole_year():
    now = timezone.now()
    return Period(now - dt.timedelta(days=1), now + dt.timedelta(days=1))


def export(report, period=None, actor=SYSTEM):
    e = Export(report, period or whole_year(), actor)
    data = b"".join(e.chunks())
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return e, data, rows


def prod_request(world, release, user=None, **kw):
    return services.deployment_request(actor=person(user or world.bob), release=release,
                                       environment=world.production, **kw)


@pytest.fixture
def history(world):
    """Production attempts of every kind, refusals, and grants."""
    w = world
    ok = w.release(pull_request=PullRequest("https://vcs/pr/1", "alice@example.com", ("erin",)),
                   issue_keys=["BIZPLAT-2", "BIZPLAT-1"], implementers=["alice@example.com", "dev2@example.com"])
    w.to_staging(ok)
    done = w.deploy(ok, w.production, actor=person(w.bob))
    rejected_rel, cancelled_rel, emergency_rel, reviewed_rel = (w.release() for _ in range(4))
    for r in (rejected_rel, cancelled_rel, emergency_rel, reviewed_rel):
        w.to_staging(r)
    rejected = prod_request(w, rejected_rel)
    services.deployment_reject(actor=person(w.carol), deployment_id=rejected.pk, comment="wrong ticket")
    cancelled = prod_request(w, cancelled_rel)
    services.deployment_cancel(actor=person(w.bob), deployment_id=cancelled.pk)
    now = timezone.now()
    freeze = FreezeWindow.objects.create(environment=w.production, starts_at=now - dt.timedelta(hours=1),
                                         ends_at=now + dt.timedelta(hours=1), reason="close")
    unreviewed = prod_request(w, emergency_rel, emergency_reason="=HYPERLINK(\"http://evil\"), payments down")
    services.deployment_start(deployment_id=unreviewed.pk)
    services.deployment_record_result(deployment_id=unreviewed.pk, state=State.FAILED)
    reviewed = prod_request(w, reviewed_rel, w.carol, emergency_reason="hotfix, \"quoted\"\nsecond line")
    services.deployment_review(actor=person(w.erin), deployment_id=reviewed.pk, comment="fine")
    services.deployment_start(deployment_id=reviewed.pk)
    services.deployment_record_result(deployment_id=reviewed.pk, state=State.SUCCEEDED)
    with pytest.raises(PolicyRefusal):
        prod_request(w, ok, w.dave)
    freeze.delete()
    services.group_membership_change(actor=SYSTEM, group=w.releasers, user=w.dave, add=True)
    return {"done": done, "rejected": rejected, "cancelled": cancelled, "unreviewed": unreviewed,
            "reviewed": reviewed, "release": ok}


def test_changes_is_the_population_of_restricted_attempts(world, history):
    e, data, rows = export("changes")
    assert [int(r["deployment_id"]) for r in rows] == sorted(d.pk for k, d in history.items() if k != "release")
    done = next(r for r in rows if int(r["deployment_id"]) == history["done"].pk)
    staging = Deployment.objects.get(release=history["release"], environment=world.staging)
    assert done["issue_keys"] == "BIZPLAT-1;BIZPLAT-2" and done["implementers"] == "alice@example.com;dev2@example.com"
    assert (done["approvers"], done["required_approvals"], done["result"]) == ("carol", "1", "succeeded")
    assert done["code_reviewers"] == "erin" and done["pull_request_url"] == "https://vcs/pr/1"
    assert done["promoted_from_deployment_id"] == str(staging.pk)
    assert done["promoted_from_finished_at"] == iso(staging.finished_at)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", done["requested_at"])
    assert set(done["sod_checks"].split(";")) == {"requester_not_implementer", "approver_not_implementer",
                                                  "approver_not_requester", "approver_distinct"}
    seqs = AuditEvent.objects.filter(object_type="environments.deployment", object_id=str(history["done"].pk))
    assert (int(done["audit_seq_first"]), int(done["audit_seq_last"])) == (seqs.first().seq, seqs.last().seq)
    results = {int(r["deployment_id"]): r["result"] for r in rows}
    assert results[history["rejected"].pk] == "rejected" and results[history["cancelled"].pk] == "cancelled"
    emergency = next(r for r in rows if int(r["deployment_id"]) == history["unreviewed"].pk)
    assert emergency["emergency"] == "true" and emergency["emergency_reason"].startswith("'=HYPERLINK")
    # who decided an attempt that did not go ahead, and why; what the reviewer of an emergency wrote
    details = {int(r["deployment_id"]): (r["result_detail"], r["review_comment"]) for r in rows}
    assert details[history["rejected"].pk] == ("Rejected by carol: wrong ticket", "")
    assert details[history["cancelled"].pk] == ("Cancelled by bob", "")
    assert details[history["reviewed"].pk][1] == "fine"


def test_csv_is_rfc4180_and_formula_safe(world, history):
    _, data, rows = export("changes")
    assert data.count(b"\r\n") >= len(rows) + 1
    reviewed = next(r for r in rows if int(r["deployment_id"]) == history["reviewed"].pk)
    assert reviewed["emergency_reason"] == 'hotfix, "quoted"\nsecond line'
    for value, expected in [("=1+2", "'=1+2"), ("+x", "'+x"), ("-x", "'-x"), ("@x", "'@x"), ("\tx", "'\tx"),
                            ("\rx", "'\rx"), ("x=1", "x=1"), (None, ""), (True, "true"), (["a", "b"], "a;b")]:
        assert safe_cell(value) == expected


def test_exceptions_lists_emergencies_refusals_and_grants(world, history):
    _, _, rows = export("exceptions")
    kinds = [r["kind"] for r in rows]
    assert kinds[:2] == ["emergency", "emergency"]
    assert rows[0]["status"] == "UNREVIEWED, 0 days old" and int(rows[0]["deployment_id"]) == history["unreviewed"].pk
    assert rows[1]["status"].startswith("reviewed by erin") and rows[1]["status"].endswith("after 0 days")
    # both went past the freeze that held Production (the request's audit event says so)
    assert re.fullmatch(r"'=HYPERLINK\(\"http://evil\"\), payments down \(it went past a freeze: frozen until "
                        r"20\d\d-\d\d-\d\d \d\d:\d\d UTC \(close\)\)", rows[0]["detail"]), rows[0]["detail"]
    asked = AuditEvent.objects.get(action="deployment.request", object_id=str(history["unreviewed"].pk))
    assert rows[0]["audit_seq"] == str(asked.seq)  # the request's event, to look up in the audit report
    refusals = [r for r in rows if r["kind"] == "refusal"]
    assert any(r["rule"] == "NOT_RELEASER" and r["actor"] == "dave" for r in refusals)
    requested = next(r for r in refusals if r["detail"].startswith("deployment.request.refused"))
    assert (requested["application"], requested["environment"]) == ("MAC", "Production") and requested["version"]
    grants = [r for r in rows if r["kind"] == "grant"]
    assert any("deploy_environment on MAC Production to group mac-releasers" in r["detail"] for r in grants)
    assert any("dave added to group mac-releasers" in r["detail"] for r in grants)
    assert "sod_incomplete" not in kinds


def test_exceptions_catch_a_deployment_without_its_separation_of_duties(world, history):
    Deployment.objects.filter(pk=history["done"].pk).update(sod_checks=["requester_not_implementer"])
    _, _, rows = export("exceptions")
    (row,) = [r for r in rows if r["kind"] == "sod_incomplete"]
    assert int(row["deployment_id"]) == history["done"].pk and "approver_not_implementer" in row["detail"]


def test_access_shows_who_can_deploy_since_when_and_conflicts(world, history, make_user):
    carol_impl = world.release(implementers=["carol@example.com"])
    world.to_staging(carol_impl)
    pending = prod_request(world, carol_impl)
    services.deployment_approve(actor=person(world.erin), deployment_id=pending.pk)  # carol may not
    _, _, rows = export("access")
    table = {(r["username"], r["permission"]): r for r in rows if r["environment"]}
    assert set(table) == {(u, p) for u in ("bob", "carol", "dave", "erin")
                          for p in ("approve_environment", "deploy_environment")}
    joined = [r for r in rows if not r["environment"] and r["permission"] == "group"]
    assert [(r["username"], r["change"]) for r in joined] == [
        (u, "added to mac-releasers") for u in ("bob", "carol", "erin", "dave")]  # the world's people, then dave
    assert table[("bob", "deploy_environment")]["via"] == "group mac-releasers"
    dave = table[("dave", "approve_environment")]
    added = AuditEvent.objects.get(action="group.add_member", data__user="dave")
    assert int(dave["since_audit_seq"]) == added.seq and dave["since"] == iso(added.created_at)
    world.releasers.user_set.add(world.alice)  # joined outside the services: since when is unknown
    table = {(r["username"], r["permission"]): r for r in export("access")[2] if r["environment"]}
    assert (table[("alice", "deploy_environment")]["since"], table[("dave", "deploy_environment")]["since"]) == (
        "", iso(added.created_at))
    assert table[("carol", "approve_environment")]["conflict"] == "true"
    assert table[("carol", "approve_environment")]["conflict_releases"] == carol_impl.version
    assert table[("bob", "approve_environment")]["conflict"] == "false"


def test_access_lists_what_changed_the_rights_of_a_group(world, history, make_user):
    """A group's members hold what it holds: its permissions changed, and the group deleted with who lost
    what, are among the administrator actions."""
    root = make_user("root", superuser=True)
    ops = Group.objects.create(name="ops")
    services.group_membership_change(actor=person(root), group=ops, user=world.dave, add=True)
    group_permissions_change(actor=person(root), group=ops,
                             permissions=[Permission.objects.get(codename="change_environment")])
    group_delete(actor=person(root), group=ops)
    _, _, rows = export("access")
    changes = [(r["username"], r["permission"], r["change"], r["changed_by"]) for r in rows
               if r["username"] in ("group ops", "dave") and not r["environment"]]
    assert changes[-3:] == [
        ("dave", "group", "added to ops", "root"),
        ("group ops", "group_permissions", "added: environments.change_environment", "root"),
        ("group ops", "group_deleted", "members: dave; permissions: environments.change_environment; "
                                       "environment grants: none", "root"),
    ]


def test_access_times_rights_given_and_taken_away_and_keeps_people_through_renames(world, history, make_user):
    """The removal of access can be timed (a grant and its revoke are among the administrator actions);
    a renamed person keeps their e-mail, and a right held through a renamed group its `since`."""
    root = make_user("root", superuser=True)
    frank = make_user("frank")
    prod = str(world.production)
    services.environment_grant(actor=person(root), environment=world.production, codename="approve_environment",
                               user=frank)
    services.environment_revoke(actor=person(root), environment=world.production, codename="approve_environment",
                                user=frank)
    revoked = AuditEvent.objects.get(action="environment.revoke", data__user="frank").seq
    assign_perm("environments.approve_environment", frank, world.production)  # back by SQL
    group_rename(actor=person(root), group=world.releasers, name="mac-approvers")
    world.carol.username = "carolk"
    user_save(actor=person(root), user=world.carol)
    _, _, rows = export("access")
    actions = [(r["username"], r["email"], r["permission"], r["change"]) for r in rows if not r["environment"]]
    assert ("frank", "frank@example.com", "environment_grant", f"granted approve_environment on {prod}") in actions
    assert ("frank", "frank@example.com", "environment_grant", f"revoked approve_environment on {prod}") in actions
    assert ("carol", "carol@example.com", "username", "carol -> carolk") in actions
    held = {(r["username"], r["permission"], r["via"]): r for r in rows if r["environment"]}
    # the revoked right put back by SQL has no event behind it (the exceptions report names it)
    assert held[("frank", "approve_environment", "direct")]["since_audit_seq"] == ""
    assert f"the right of frank is 'held' in the table, 'environment.revoke at seq {revoked}'" in " ".join(
        r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch")
    dave = held[("dave", "approve_environment", "group mac-approvers")]
    added = AuditEvent.objects.get(action="group.add_member", data__user="dave")
    assert dave["since_audit_seq"] == str(added.seq)
    assert held[("carolk", "approve_environment", "group mac-approvers")]["since_audit_seq"] != ""


def test_exceptions_show_a_restricted_environments_settings_changed_outside_the_portal(world, history, make_user):
    """Where a restricted environment deploys from and to, and how strictly, is what its events set:
    changed through the portal (at once when stricter, by a second administrator when weaker) it agrees;
    changed or made by SQL, it does not."""
    def settings_mismatches():
        return {r["detail"] for r in export("exceptions")[2]
                if r["kind"] == "evidence_mismatch" and r["detail"].startswith("environment ")}

    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    production = Environment.objects.get(pk=world.production.pk)
    production.required_approvals = 2  # stricter: at once
    services.environment_save(actor=person(root), environment=production)
    production.inventory = "hosts-2026.ini"  # weaker: proposed, then approved by another administrator
    proposal = services.environment_save(actor=person(root), environment=production, reason="new hosts")
    services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    assert settings_mismatches() == set()

    prod = str(world.production)
    Environment.objects.filter(pk=world.production.pk).update(inventory="/tmp/elsewhere.ini", required_approvals=1)
    Environment.objects.create(application=world.app, name="Shadow", restricted=True, required_approvals=1)
    assert settings_mismatches() == {
        f"environment {prod}: inventory is '/tmp/elsewhere.ini' in the table, 'hosts-2026.ini' in the audit chain",
        f"environment {prod}: required_approvals is '1' in the table, '2' in the audit chain",
        "environment MAC Shadow: its creation is 'exists' in the table, 'no environment.create event' in the audit "
        "chain",
    }


def test_a_control_change_row_names_its_proposal_and_decision_events(world, history, make_user):
    """An auditor traces a weakened control to the chain: the row's audit_seq is the proposal's event and
    its detail names the second administrator's decision and its event (a helper found no audit_seq)."""
    root, otto = make_user("root", superuser=True), make_user("otto", superuser=True)
    production = Environment.objects.get(pk=world.production.pk)
    production.inventory = "hosts-2026.ini"  # weaker: proposed, then approved by another administrator
    proposal = services.environment_save(actor=person(root), environment=production, reason="new hosts")
    services.control_change_approve(actor=person(otto), change_id=proposal.pk)
    production.playbook = "other.yml"
    waiting = services.environment_save(actor=person(root), environment=production, reason="a new playbook")
    def seq(change, action):
        return AuditEvent.objects.get(object_type="environments.controlchange", object_id=str(change.pk),
                                      action=action).seq

    proposed, approved = seq(proposal, "control_change.propose"), seq(proposal, "control_change.approve")
    pending = seq(waiting, "control_change.propose")
    rows = {r["detail"].split(";")[0]: r for r in export("exceptions")[2] if r["kind"] == "control_change"}
    assert len(rows) == 2
    done, open_ = (next(r for r in rows.values() if r["status"] == state) for state in ("applied", "proposed"))
    assert done["audit_seq"] == str(proposed) and done["rule"] == "CONTROL_WEAKENED"
    assert "approved and applied by otto at " in done["detail"] and f"(audit event {approved})" in done["detail"]
    assert open_["audit_seq"] == str(pending) and "waiting for a second administrator" in open_["detail"]


def test_exceptions_still_read_what_sql_moved_out_of_a_restricted_environment(world, history):
    """A deployment moved to another environment or release, or Production no longer restricted, by SQL:
    the reports read restricted environments, so these would leave them; the chain says where each
    deployment was requested and that Production was made restricted."""
    def mismatches():
        return {r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"}

    done, unreviewed = history["done"], history["unreviewed"]
    other = world.release()
    Deployment.objects.filter(pk=unreviewed.pk).update(environment=world.qa)
    Deployment.objects.filter(pk=done.pk).update(release=other)
    assert mismatches() == {
        f"deployment #{unreviewed.pk}: environment is 'QA' in the table, 'Production' in the audit chain",
        f"deployment #{done.pk}: release is '{other.version} ({other.artifact_sha256})' in the table, "
        f"'{done.release.version} ({done.release.artifact_sha256})' in the audit chain",
    }
    Deployment.objects.filter(pk=unreviewed.pk).update(environment=world.production)
    Deployment.objects.filter(pk=done.pk).update(release=done.release)
    Environment.objects.filter(pk=world.production.pk).update(restricted=False, required_approvals=0)
    assert mismatches() == {
        f"environment {world.production}: restricted is 'False' in the table, 'True' in the audit chain",
        f"environment {world.production}: required_approvals is '0' in the table, '1' in the audit chain",
    }


def test_exceptions_show_a_deployed_release_or_its_build_changed_outside_the_portal(world, history):
    """What was deployed is what was registered: a release's implementers or reviewers, or its build's
    test results, changed by SQL (past the append-only triggers, by the database's owner) disagree with
    the events that registered them."""
    def release_mismatches():
        return {r["detail"] for r in export("exceptions")[2]
                if r["kind"] == "evidence_mismatch" and r["detail"].startswith(("release ", "build "))}

    done = history["done"]
    release, build = done.release, done.release.build
    assert release_mismatches() == set()
    implementers = sorted(release.implementers.values_list("identity", flat=True))
    Build.objects.filter(pk=build.pk).update(tests_failed=12)
    for table in ("releases_implementer", "releases_release"):
        triggers.drop(connection, table)
    try:
        release.implementers.filter(identity=implementers[0]).delete()
        Release.objects.filter(pk=release.pk).update(pull_request_reviewers=["erin", "nobody"])
    finally:
        for table in ("releases_implementer", "releases_release"):
            triggers.install(connection, table)
    reviewers = Release.objects.get(pk=release.pk)
    said = AuditEvent.objects.get(action="release.register", object_id=str(release.pk)).data
    assert release_mismatches() == {
        f"build {build}: tests_failed is '12' in the table, '{build.tests_failed}' in the audit chain",
        f"release {release}: implementers is {str(implementers[1:])!r} in the table, {str(implementers)!r} in the "
        "audit chain",
        f"release {release}: pull_request_reviewers is {str(reviewers.pull_request_reviewers)!r} in the table, "
        f"{str((said.get('pull_request') or {}).get('reviewers', []))!r} in the audit chain",
    }


def test_audit_report_and_manifest_let_anyone_recompute_the_chain(world, history):
    e, data, rows = export("audit")
    import hashlib

    assert e.manifest["row_count"] == len(rows) and e.manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert e.manifest["chain_head"]["seq"] == int(rows[-1]["seq"])
    assert e.manifest["chain_head"]["hash"] == rows[-1]["hash"]
    for row in rows:
        assert hashlib.sha256(f"{row['prev_hash']}\n{row['canonical']}".encode()).hexdigest() == row["hash"]
    event = AuditEvent.objects.order_by("-seq").first()
    assert event.action == "report.export" and event.data["sha256"] == e.manifest["sha256"]


def test_sox_report_command_writes_csv_and_manifest(world, history, tmp_path):
    out = StringIO()
    call_command("sox_report", "changes", "--since", "2000-01-01", "--until", timezone.now().date().isoformat(),
                 "-o", str(tmp_path / "changes.csv"), stdout=out)
    manifest = json.loads((tmp_path / "changes.manifest.json").read_text())
    import hashlib

    assert manifest["sha256"] == hashlib.sha256((tmp_path / "changes.csv").read_bytes()).hexdigest()
    assert manifest["row_count"] == 5 and manifest["parameters"]["until"].endswith("T00:00:00.000000Z")
    assert "5 rows" in out.getvalue()


def test_a_period_beyond_the_days_anyone_means_is_refused_with_a_sentence(client, world, make_user):
    from django.contrib.auth.models import Permission
    from django.core.management import CommandError

    auditor = make_user("auditor")
    auditor.user_permissions.add(Permission.objects.get(codename="export_reports"))
    client.force_login(auditor)
    response = client.get(reverse("admin:audit_reports"), {"report": "changes", "since": "2026-01-01",
                                                           "until": "9999-12-31"})
    assert response.status_code == 200 and not response.streaming
    assert "Choose a day between 2000-01-01 and 2099-12-31." in response.content.decode()
    with pytest.raises(CommandError, match="choose a day between 2000-01-01 and 2099-12-31"):
        call_command("sox_report", "changes", "--since", "2026-01-01", "--until", "9999-12-31")


def test_reports_page_for_auditors(client, world, history, make_user):
    from django.contrib.auth.models import Permission

    auditor = make_user("auditor")
    auditor.user_permissions.add(*Permission.objects.filter(codename__in=["export_reports", "view_auditevent",
                                                                          "view_deployment"]))
    client.force_login(auditor)
    url = reverse("admin:audit_reports")
    page = client.get(url).content.decode()
    assert "SOX reports" in page
    for name in ("since", "until"):  # the browser's calendar, as on the metrics page
        assert re.search(rf'<input type="date" name="{name}"', page), name
    today = timezone.now().date().isoformat()
    head = client.head(url, {"report": "changes", "since": "2000-01-01", "until": today})
    assert head.status_code in (200, 405) and not AuditEvent.objects.filter(action="report.export").exists()
    response = client.get(url, {"report": "changes", "since": "2000-01-01", "until": today})
    assert response.status_code == 200 and response.streaming
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    names = sorted(archive.namelist())
    assert names == [f"changes-20000101-{today.replace('-', '')}.csv",
                     f"changes-20000101-{today.replace('-', '')}.manifest.json"]
    manifest = json.loads(archive.read(names[1]))
    assert manifest["row_count"] == 5 and manifest["generated_by"] == "auditor"
    waiting = world.release()
    world.to_staging(waiting)
    pending = prod_request(world, waiting)
    events = AuditEvent.objects.count()
    client.post(reverse("admin:environments_deployment_changelist"),
                {"action": "approve", "_selected_action": [pending.pk], "apply": "1"})
    pending.refresh_from_db()
    assert pending.state == State.AWAITING_APPROVAL and not pending.approvals.exists()
    assert not AuditEvent.objects.filter(seq__gt=events, action__startswith="deployment.approve").exists()
    client.force_login(world.alice)
    assert client.get(url).status_code == 403


# --- checkpoints and the auditor's own script ------------------------------------------------------

@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.key"
    path.write_text("an HMAC key the database never sees\n")
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY_FILE", str(path))
    return path


def checkpoint(tmp_path, name="cp.json"):
    call_command("audit_checkpoint", "-o", str(tmp_path / name), stdout=StringIO(), stderr=StringIO())
    return tmp_path / name


def verify(cp=None):
    out, err = StringIO(), StringIO()
    try:
        call_command("verify_audit", *(["--checkpoint", str(cp)] if cp else []), stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, err.getvalue()
    return 0, out.getvalue()


def rewrite_all_hashes_from(seq):
    """What someone with write access could do: edit an event and recompute every later hash."""
    triggers.drop(connection, "audit_auditevent")
    try:
        events = list(AuditEvent.objects.filter(seq__gte=seq - 1).order_by("seq"))
        prev = events[0].hash
        with connection.cursor() as cursor:
            for e in events[1:]:
                if e.seq == seq:
                    e.data = {**e.data, "comment": "nothing to see"}
                e.prev_hash, e.canonical = prev, chain.canonical(e)
                e.hash = chain.link_hash(prev, e.canonical)
                cursor.execute("UPDATE audit_auditevent SET data = %s, canonical = %s, prev_hash = %s, hash = %s"
                               " WHERE id = %s", [json.dumps(e.data), e.canonical, e.prev_hash, e.hash, e.pk])
                prev = e.hash
    finally:
        triggers.install(connection, "audit_auditevent")


def test_checkpoint_detects_a_rewritten_chain(world, history, tmp_path, key_file):
    cp = checkpoint(tmp_path)
    assert verify(cp)[0] == 0
    err = StringIO()
    call_command("verify_audit", "--checkpoint", str(cp), stdout=StringIO(), stderr=err)
    assert f"The chain holds checkpoint {cp} (seq {json.loads(cp.read_text())['seq']}) unchanged." in err.getvalue()
    rewrite_all_hashes_from(5)
    code, message = verify()  # the edited event's seal no longer holds ...
    assert code == 1 and "event seq 5: its seal does not hold" in message
    with override_settings(PORTAL_AUDIT_SEAL_KEY=None):
        assert verify()[0] == 0  # ... without the seal key the chain alone looks fine after a full rewrite ...
        code, message = verify(cp)  # ... the checkpoint does not
    assert code == 1 and "rewritten" in message


def test_a_checkpoint_from_before_seals_still_holds(world, history, tmp_path, key_file):
    """Checkpoints written before seals sign seq, hash and time only: verify_audit and the auditors'
    script still accept them (and read nothing of seals from them)."""
    cp = checkpoint(tmp_path)
    old = {k: v for k, v in json.loads(cp.read_text()).items() if k != "sealed_from"}
    old["hmac"] = checkpoints.sign(old["seq"], old["hash"], old["created_at"], checkpoints.checkpoint_key())
    cp.write_text(json.dumps(old))
    assert verify(cp)[0] == 0
    csv_path, manifest = write_export(tmp_path)
    code, out = run_script(auditor_script(tmp_path), csv_path, manifest, cp, key_file)
    assert code == 0 and out.startswith("OK "), out


def test_checkpoint_detects_a_cut_tail_and_a_wrong_key(world, history, tmp_path, key_file, monkeypatch):
    cp = checkpoint(tmp_path)
    seq = json.loads(cp.read_text())["seq"]
    triggers.drop(connection, "audit_auditevent")
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent WHERE seq >= %s", [seq - 2])
    triggers.install(connection, "audit_auditevent")
    code, message = verify(cp)
    assert code == 1 and "cut short" in message
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY_FILE", "")
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY", "another key")
    code, message = verify(cp)
    assert code == 1


def test_an_empty_checkpoint_key_file_is_refused(world, tmp_path, monkeypatch):
    """An HMAC by an empty key is one anybody can make: the seal key's file is refused so too."""
    from django.core.management import CommandError

    (empty := tmp_path / "checkpoint.key").write_text("\n")
    monkeypatch.delenv("PORTAL_CHECKPOINT_KEY", raising=False)
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY_FILE", str(empty))
    with pytest.raises(CommandError, match=f"The checkpoint key file {empty} is empty"):
        checkpoint(tmp_path)
    assert not list(tmp_path.glob("*.json")) and not AuditEvent.objects.filter(action="evidence.checkpoint").exists()


def test_a_checkpoint_is_never_overwritten_nor_written_into_a_folder_nobody_made(world, tmp_path, key_file):
    from django.core.management import CommandError

    first = checkpoint(tmp_path)
    kept = first.read_text()
    chain.append(actor=SYSTEM, action="test.more")
    with pytest.raises(CommandError, match="exists already: a checkpoint is never overwritten"):
        checkpoint(tmp_path)
    assert first.read_text() == kept
    with pytest.raises(CommandError, match="No folder"):
        call_command("audit_checkpoint", "-o", str(tmp_path / "missing" / "cp.json"), stdout=StringIO(),
                     stderr=StringIO())
    assert not (tmp_path / "missing").exists()


def auditor_script(tmp_path) -> Path:
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    path = tmp_path / "verify_export.py"
    path.write_text(code)
    return path


def run_script(script, csv_path, manifest, cp=None, key=None, seal_key=None, retired=None):
    args = ["python3", "-I", str(script), str(csv_path), str(manifest)]
    if cp:
        args += ["--checkpoint", str(cp), "--key-file", str(key)]
    if seal_key:
        args += ["--seal-key-file", str(seal_key)]
    if retired:
        args += ["--retired-seal-keys-file", str(retired)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    return result.returncode, result.stdout + result.stderr


def write_export(tmp_path, name="audit"):
    e, data, _ = export("audit")
    (tmp_path / f"{name}.csv").write_bytes(data)
    (tmp_path / f"{name}.manifest.json").write_text(e.manifest_json())
    return tmp_path / f"{name}.csv", tmp_path / f"{name}.manifest.json"


def fake_manifest(manifest_path, csv_path):
    """The forger's move: make the manifest fit the edited CSV."""
    import hashlib

    manifest = json.loads(manifest_path.read_text())
    data = csv_path.read_bytes()
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["row_count"] = data.count(b"\r\n") - 1
    manifest_path.write_text(json.dumps(manifest))


def test_auditor_script_accepts_an_honest_export(world, history, tmp_path, key_file):
    cp = checkpoint(tmp_path)
    csv_path, manifest = write_export(tmp_path)
    code, out = run_script(auditor_script(tmp_path), csv_path, manifest, cp, key_file)
    assert code == 0 and out.startswith("OK "), out


def test_auditor_script_checks_the_seals_with_the_seal_key(world, history, tmp_path):
    seal_key = tmp_path / "seal.key"
    seal_key.write_bytes(settings.PORTAL_AUDIT_SEAL_KEY + b"\n")
    script = auditor_script(tmp_path)
    csv_path, manifest = write_export(tmp_path)
    code, out = run_script(script, csv_path, manifest, seal_key=seal_key)
    rows = json.loads(manifest.read_text())["row_count"]
    assert code == 0 and out.startswith(f"OK {rows} events") and f"; {rows} sealed (from seq " in out, out
    assert out.endswith(", 0 without a seal\n"), out
    forged = forge()  # a grant "given" by SQL, hashed into the chain as the portal would
    csv_path, manifest = write_export(tmp_path, "forged")
    assert run_script(script, csv_path, manifest)[0] == 0  # the chain alone holds it
    code, out = run_script(script, csv_path, manifest, seal_key=seal_key)
    assert code == 1 and f"seq {forged.seq}: no seal, though seq 1 before it has one" in out, out


def test_auditor_script_checks_the_seals_of_retired_keys_in_their_order(world, history, tmp_path):
    """The seal key changed: the export verifies with the new key and the retired one, not with the
    new one alone, and an event sealed with the retired key after the change is refused."""
    old_key, new_key = settings.PORTAL_AUDIT_SEAL_KEY, b"the seal key since the change"
    (seal_key := tmp_path / "seal.key").write_bytes(new_key)
    (retired := tmp_path / "retired.keys").write_bytes(b"an older key never used\n" + old_key + b"\n")
    script = auditor_script(tmp_path)
    with override_settings(PORTAL_AUDIT_SEAL_KEY=new_key, PORTAL_AUDIT_RETIRED_SEAL_KEYS=(old_key,)):
        changed = chain.append(actor=Actor.system(via="test"), action="test.event")
        chain.append(actor=Actor.system(via="test"), action="test.event")
        csv_path, manifest = write_export(tmp_path)
        code, out = run_script(script, csv_path, manifest, seal_key=seal_key, retired=retired)
        assert code == 0 and f"the newest seal key used is key 3 of 3, from seq {changed.seq}" in out, out
        code, out = run_script(script, csv_path, manifest, seal_key=seal_key)
        assert code == 1 and "seq 1: its seal does not hold" in out, out
        forged = forge(sealed_with=old_key)
        csv_path, manifest = write_export(tmp_path, "forged")
        code, out = run_script(script, csv_path, manifest, seal_key=seal_key, retired=retired)
        assert code == 1 and f"seq {forged.seq}: sealed by an older key than seq {changed.seq} before it" in out, out


def test_auditor_script_finds_seals_removed_since_a_checkpoint(world, history, tmp_path, key_file):
    seal_key = tmp_path / "seal.key"
    seal_key.write_bytes(settings.PORTAL_AUDIT_SEAL_KEY)
    cp = checkpoint(tmp_path)
    strip_seals()
    csv_path, manifest = write_export(tmp_path)
    script = auditor_script(tmp_path)
    assert run_script(script, csv_path, manifest, cp, key_file)[0] == 0  # the hashes still link
    code, out = run_script(script, csv_path, manifest, cp, key_file, seal_key=seal_key)
    assert code == 1 and "no seal, though the checkpoint says events are sealed from seq 1 on" in out, out


@pytest.mark.parametrize("needle, message", [
    (b"wrong ticket", "does not match its hash"),  # inside the hashed content
    (b"deployment.reject", "column action differs"),  # a readable column
])
def test_auditor_script_catches_one_changed_byte(world, history, tmp_path, needle, message):
    csv_path, manifest = write_export(tmp_path)
    data = bytearray(csv_path.read_bytes())
    data[data.index(needle)] ^= 0x20  # flip the case of one letter
    csv_path.write_bytes(bytes(data))
    script = auditor_script(tmp_path)
    code, out = run_script(script, csv_path, manifest)
    assert code == 1 and "SHA-256 differs" in out, out
    fake_manifest(manifest, csv_path)
    code, out = run_script(script, csv_path, manifest)
    assert code == 1 and message in out, out


def test_auditor_script_reads_a_cell_with_line_breaks(world, history, tmp_path):
    """CI may send a build number or branch with a line break: the CSV quotes it, and the script reads it."""
    build = world.build(number="77\nsecond\r\nthird")
    assert "\n" in AuditEvent.objects.get(action="build.register", object_id=str(build.pk)).object_repr
    csv_path, manifest = write_export(tmp_path)
    code, out = run_script(auditor_script(tmp_path), csv_path, manifest)
    assert code == 0 and out.startswith("OK "), out


def test_auditor_script_catches_a_removed_row(world, history, tmp_path):
    csv_path, manifest = write_export(tmp_path)
    lines = csv_path.read_bytes().split(b"\r\n")
    del lines[5]
    csv_path.write_bytes(b"\r\n".join(lines))
    script = auditor_script(tmp_path)
    assert run_script(script, csv_path, manifest)[0] == 1
    fake_manifest(manifest, csv_path)
    code, out = run_script(script, csv_path, manifest)
    assert code == 1 and "not linked" in out, out


def test_auditor_script_catches_a_truncated_tail(world, history, tmp_path, key_file):
    cp = checkpoint(tmp_path)
    csv_path, manifest = write_export(tmp_path)
    lines = csv_path.read_bytes().split(b"\r\n")
    csv_path.write_bytes(b"\r\n".join(lines[:-6] + [b""]))
    fake_manifest(manifest, csv_path)
    script = auditor_script(tmp_path)
    assert run_script(script, csv_path, manifest)[0] == 0  # a clean cut passes without a checkpoint ...
    code, out = run_script(script, csv_path, manifest, cp, key_file)
    assert code == 1 and "cut short" in out, out  # ... not with one


def test_changes_name_what_each_attempt_replaced_and_mark_a_rollback(world, history):
    """A person took production back to the first release after a later one ran there."""
    back = world.deploy(history["release"], world.production, actor=person(world.bob))
    for fast in (True, False):  # the fast path is PostgreSQL's COPY; elsewhere both are the same one
        data = b"".join(Export("changes", whole_year(), SYSTEM, fast=fast).chunks())
        rows = {int(r["deployment_id"]): r for r in csv.DictReader(io.StringIO(data.decode()))}
        seen = {k: (rows[history[k].pk]["replaced_version"], rows[history[k].pk]["rollback"])
                for k in ("done", "rejected", "reviewed")}
        assert seen == {"done": ("", "false"), "rejected": ("", "false"),  # the first; one that never started
                        "reviewed": (history["release"].version, "false")}, fast
        assert (rows[back.pk]["replaced_version"], rows[back.pk]["rollback"]) == (
            history["reviewed"].release.version, "true"), fast


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the fast path exists on PostgreSQL")
def test_postgres_fast_changes_export_gives_the_same_bytes(world, history):
    fast, slow = Export("changes", whole_year(), SYSTEM), Export("changes", whole_year(), SYSTEM, fast=False)
    fast_bytes, slow_bytes = b"".join(fast.chunks()), b"".join(slow.chunks())
    assert b"'=HYPERLINK" in fast_bytes and b'"hotfix, ""quoted""\nsecond line"' in fast_bytes
    assert fast_bytes == slow_bytes
    assert fast.manifest["row_count"] == slow.manifest["row_count"] == 5


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the fast path exists on PostgreSQL")
def test_postgres_fast_audit_export_gives_the_same_bytes(world, history, make_user):
    formula = make_user("=cmd|calc")
    services.group_membership_change(actor=person(make_user("root", superuser=True)), group=world.releasers,
                                     user=formula, add=True)
    fast, slow = Export("audit", whole_year(), SYSTEM), Export("audit", whole_year(), SYSTEM, fast=False)
    fast_bytes, slow_bytes = b"".join(fast.chunks()), b"".join(slow.chunks())
    assert b"'=cmd|calc" in fast_bytes
    fast_lines, slow_lines = fast_bytes.split(b"\r\n"), slow_bytes.split(b"\r\n")
    assert fast_lines[-1] == b"" and fast_lines[:-1] == slow_lines[: len(fast_lines) - 1]
    (extra,) = slow_lines[len(fast_lines) - 1 : -1]  # the first export is itself on record
    assert b"report.export" in extra
    assert slow.manifest["row_count"] == fast.manifest["row_count"] + 1


def test_exceptions_show_the_age_of_an_unreviewed_emergency_and_a_late_review(world, history, settings):
    """An emergency not reviewed within PORTAL_REVIEW_DUE_DAYS (default 5) is overdue; one reviewed after
    it is listed as late. Times moved with the rows (Deployment is not append-only)."""
    assert settings.PORTAL_REVIEW_DUE_DAYS == 5
    old = timezone.now() - dt.timedelta(days=9)
    Deployment.objects.filter(pk=history["unreviewed"].pk).update(requested_at=old)
    Deployment.objects.filter(pk=history["reviewed"].pk).update(requested_at=old - dt.timedelta(days=1, hours=1))
    period = Period(old - dt.timedelta(days=2), timezone.now() + dt.timedelta(days=1))
    _, _, rows = export("exceptions", period)
    emergencies = {int(r["deployment_id"]): r["status"] for r in rows if r["kind"] == "emergency"}
    assert emergencies[history["unreviewed"].pk] == "UNREVIEWED, 9 days old (OVERDUE)"
    assert emergencies[history["reviewed"].pk].endswith("after 10 days (LATE)")


def test_the_audit_report_is_a_run_of_consecutive_events_when_a_time_steps_back(db, tmp_path):
    """An event is timed as its writer asks for the chain's lock, so a later event can carry a time a
    moment before the one before it, even across midnight. The report of the day holds every event from
    its first to its last, the stepped-back one included, and the auditor's script checks each link."""
    midnight = dt.datetime(2026, 11, 10, tzinfo=dt.UTC)
    for action, moment in (("test.before", midnight - dt.timedelta(hours=1)), ("test.first", midnight),
                           ("test.stepped_back", midnight - dt.timedelta(milliseconds=3)),
                           ("test.last", midnight + dt.timedelta(hours=1)),
                           ("test.next_day", midnight + dt.timedelta(days=1, hours=1))):
        with moved_time(moment):
            chain.append(actor=SYSTEM, action=action)
    e, data, rows = export("audit", Period(midnight, midnight + dt.timedelta(days=1)))
    assert [r["action"] for r in rows] == ["test.first", "test.stepped_back", "test.last"]
    (tmp_path / "day.csv").write_bytes(data)
    (tmp_path / "day.manifest.json").write_text(e.manifest_json())
    code, out = run_script(auditor_script(tmp_path), tmp_path / "day.csv", tmp_path / "day.manifest.json")
    assert code == 0 and out.startswith("OK "), out
    assert export("audit", Period(midnight + dt.timedelta(days=3), midnight + dt.timedelta(days=4)))[2] == []


@pytest.mark.parametrize("fast", [True, False], ids=["copy", "orm"])
@pytest.mark.parametrize(("since", "until", "expected"), [
    (-2, 30, ["before", "first", "stepped_back", "last", "next_day"]),  # from the chain's first event to its head
    (-2, 0.5, ["before", "first", "stepped_back"]),  # the first event, not the head
    (0.5, 30, ["last", "next_day"]),  # the head, not the first event
    (-0.5, 0.5, ["first", "stepped_back"]),  # neither
    (50, 60, []),  # none
])
def test_the_audit_reports_run_is_bounded_wherever_the_period_lies(db, fast, since, until, expected):
    """The run's first and last events are found as the chain's own first event and head where they are
    in the period, else from the period's events (hours from midnight; the COPY path decides this in
    SQL)."""
    if fast and connection.vendor != "postgresql":
        pytest.skip("the COPY path is PostgreSQL's")
    midnight = dt.datetime(2026, 11, 10, tzinfo=dt.UTC)
    for action, moment in (("before", midnight - dt.timedelta(hours=1)), ("first", midnight),
                           ("stepped_back", midnight - dt.timedelta(milliseconds=3)),
                           ("last", midnight + dt.timedelta(hours=1)), ("next_day", midnight + dt.timedelta(hours=25))):
        with moved_time(moment):
            chain.append(actor=SYSTEM, action=f"test.{action}")
    period = Period(midnight + dt.timedelta(hours=since), midnight + dt.timedelta(hours=until))
    e = Export("audit", period, SYSTEM, fast=fast)
    rows = list(csv.DictReader(io.StringIO(b"".join(e.chunks()).decode())))
    assert [r["action"] for r in rows] == [f"test.{action}" for action in expected]


def test_a_value_that_starts_with_a_quote_reads_back_as_it_was(world, tmp_path):
    """The formula guard's own prefix is "'": a value that starts with one ("'=dave", an alias an
    administrator typed) is prefixed too, so the auditor's script reads back exactly what was hashed."""
    for value in ("'=dave", "'plain", "''", "=sum(a1)"):
        chain.append(actor=SYSTEM, action="test.quoted", object_type="releases.vcsalias", object_repr=value)
    e, data, rows = export("audit")
    quoted = [r["object_repr"] for r in rows if r["action"] == "test.quoted"]
    assert quoted == ["''=dave", "''plain", "'''", "'=sum(a1)"]
    (tmp_path / "q.csv").write_bytes(data)
    (tmp_path / "q.manifest.json").write_text(e.manifest_json())
    code, out = run_script(auditor_script(tmp_path), tmp_path / "q.csv", tmp_path / "q.manifest.json")
    assert code == 0 and out.startswith("OK "), out
    if connection.vendor == "postgresql":  # the COPY path writes the same cells
        slow = Export("audit", whole_year(), SYSTEM, fast=False)
        assert b"".join(slow.chunks()).startswith(data[:-2])


def test_an_open_emergency_stays_in_later_periods_and_a_group_addition_in_every_application(world, history):
    """The exceptions of a period list every emergency still open in it, even one requested before
    (an unreviewed exception does not drop out of next month's report), but no emergency closed before
    it; and a person added to a group, whatever the application asked for."""
    old = timezone.now() - dt.timedelta(days=40)
    Deployment.objects.filter(pk=history["unreviewed"].pk).update(requested_at=old)
    Deployment.objects.filter(pk=history["reviewed"].pk).update(
        requested_at=old, reviewed_at=old + dt.timedelta(days=1))
    later = Period(timezone.now() - dt.timedelta(days=10), timezone.now() + dt.timedelta(days=1), "MAC")
    _, _, rows = export("exceptions", later)
    emergencies = {int(r["deployment_id"]): r["status"] for r in rows if r["kind"] == "emergency"}
    assert emergencies == {history["unreviewed"].pk: "UNREVIEWED, 40 days old (OVERDUE)"}
    grants = [r["detail"] for r in rows if r["kind"] == "grant"]
    assert "dave added to group mac-releasers" in grants


def test_exceptions_show_where_a_table_was_changed_outside_the_portal(world, history):
    """The reports read the working tables; someone who writes the database directly changes those and
    not the chain. The exceptions report reads each restricted deployment and every VCS alias against
    their audit events and lists what disagrees (nothing, as long as only the portal wrote)."""

    alias = vcs_alias_add(actor=SYSTEM, user=world.carol, identity="carol-old@example.com")
    world.carol.username = "caroline"  # a rename, through the portal: her old name becomes her alias
    user_save(actor=SYSTEM, user=world.carol)
    assert [r for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"] == []

    done, unreviewed = history["done"], history["unreviewed"]
    Deployment.objects.filter(pk=done.pk).update(requested_by=world.carol, requested_by_label="carol")
    Deployment.objects.filter(pk=unreviewed.pk).update(emergency=False, emergency_reason="")
    Approval.objects.create(deployment=unreviewed, approver=world.erin, decision=Approval.Decision.APPROVE)
    VcsAlias.objects.filter(pk=alias.pk).delete()
    rows = [r for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"]
    assert {(r["deployment_id"], r["detail"]) for r in rows} == {
        (str(done.pk), f"deployment #{done.pk}: requested by is 'carol (user id {world.carol.pk})' in the table, "
                       f"'bob (user id {world.bob.pk})' in the audit chain"),
        (str(unreviewed.pk), f"deployment #{unreviewed.pk}: emergency (and its reason) is \"(False, '')\" in the "
                             "table, '(True, \\'=HYPERLINK(\"http://evil\"), payments down\\')' in the audit chain"),
        (str(unreviewed.pk), f"deployment #{unreviewed.pk}: approved by (user ids) is '[{world.erin.pk}]' in the "
                             "table, '[]' in the audit chain"),
        ("", f"VCS alias #{alias.pk}: identity is '(no row)' in the table, 'carol-old@example.com of carol, added "
             f"at seq {AuditEvent.objects.get(action='vcs_alias.add', object_id=str(alias.pk)).seq}' in the audit "
             "chain"),
    }
    assert {r["rule"] for r in rows} == {"TABLE_DIFFERS_FROM_AUDIT_CHAIN"}

    # the name alone, or an alias given to someone else
    Deployment.objects.filter(pk=done.pk).update(requested_by=world.bob, requested_by_label="carol")
    other = vcs_alias_add(actor=SYSTEM, user=world.alice, identity="alice-old@example.com")
    VcsAlias.objects.filter(pk=other.pk).update(user=world.bob)
    details = {r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"}
    assert f"deployment #{done.pk}: requested by is 'carol (user id {world.bob.pk})' in the table, 'bob (user id " \
           f"{world.bob.pk})' in the audit chain" in details
    assert f"VCS alias #{other.pk}: the owner of alias alice-old@example.com is 'bob' in the table, 'alice' in the " \
           "audit chain" in details

    # a request moved out of the period by SQL leaves the changes report, not this check
    Deployment.objects.filter(pk=done.pk).update(requested_at=done.requested_at - dt.timedelta(days=400))
    assert str(done.pk) not in {r["deployment_id"] for r in export("changes")[2]}
    moved = [r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"
             and r["deployment_id"] == str(done.pk)]
    assert any(d.startswith(f"deployment #{done.pk}: requested at is ") for d in moved), moved


def test_exceptions_show_a_right_to_deploy_or_approve_given_outside_the_portal(world, history):
    """Who may deploy to or approve for a restricted environment is read from guardian's tables and
    the groups; a grant or a membership written there directly has no audit event behind it."""
    def mismatches():
        return {r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"}

    group_rename(actor=SYSTEM, group=world.releasers, name="mac-approvers")  # through the portal: both names
    world.bob.username = "robert"
    user_save(actor=SYSTEM, user=world.bob)
    services.environment_revoke(actor=SYSTEM, environment=world.production, codename="deploy_environment",
                                group=world.releasers)
    services.group_membership_change(actor=SYSTEM, group=world.releasers, user=world.erin, add=False)
    assert mismatches() == set()

    world.releasers.user_set.add(world.alice, world.erin)  # alice never added, erin removed before
    assign_perm("environments.deploy_environment", world.dave, world.production)
    assign_perm("environments.deploy_environment", world.releasers, world.production)
    prod = str(world.production)
    seq = {a: AuditEvent.objects.filter(action=a).order_by("-seq").first().seq
           for a in ("environment.revoke", "group.remove_member")}
    expected = {
        "group mac-approvers: the membership of alice is 'member' in the table, 'never added' in the audit chain",
        f"group mac-approvers: the membership of erin is 'member' in the table, 'group.remove_member at seq "
        f"{seq['group.remove_member']}' in the audit chain",
        f"deploy_environment on {prod}: the right of dave is 'held' in the table, 'never granted' in the audit chain",
    } | {f"deploy_environment on {prod}: the right of {u} through group mac-approvers is 'held' in the table, "
         f"'environment.revoke at seq {seq['environment.revoke']}' in the audit chain"
         for u in ("alice", "carol", "dave", "erin", "robert")}
    assert mismatches() == expected

    # a group deleted through the portal, and one of the same name made again with its rights by SQL:
    # the grants the chain gave were the deleted group's (by its id), not the name's
    group_delete(actor=SYSTEM, group=world.releasers)
    again = Group.objects.create(name="mac-approvers")
    again.user_set.add(world.carol)
    assign_perm("environments.approve_environment", again, world.production)
    assert mismatches() == {
        f"deploy_environment on {prod}: the right of dave is 'held' in the table, 'never granted' in the audit chain",
        f"approve_environment on {prod}: the right of carol through group mac-approvers is 'held' in the table, "
        "'never granted' in the audit chain",
        "group mac-approvers: the membership of carol is 'member' in the table, 'never added' in the audit chain",
    }


def _rights_mismatches():
    return {r["detail"] for r in export("exceptions")[2] if r["kind"] == "evidence_mismatch"}


def test_a_right_is_matched_by_whose_it_is_not_by_a_name_someone_else_can_take(world, history, make_user):
    """Grant and membership events record the grantee's id: a name taken by someone else (by SQL) does
    not bring its old grants, and a name someone else had and lost does not take away a right."""
    prod = str(world.production)
    frank = make_user("frank")
    services.environment_grant(actor=SYSTEM, environment=world.production, codename="deploy_environment", user=frank)
    frank.username = "franklin"  # through the portal
    user_save(actor=SYSTEM, user=frank)
    group_rename(actor=SYSTEM, group=world.releasers, name="mac-approvers")
    assert _rights_mismatches() == set()

    # by SQL: mallory takes the free name "frank" and its right; then erin's name, and erin's membership
    mallory = make_user("mallory")
    users = type(mallory).objects
    users.filter(pk=mallory.pk).update(username="frank")
    assign_perm("environments.deploy_environment", mallory, world.production)
    assert _rights_mismatches() == {
        f"deploy_environment on {prod}: the right of frank is 'held' in the table, 'never granted' in the audit chain"}
    remove_perm("environments.deploy_environment", mallory, world.production)
    users.filter(pk=world.erin.pk).update(username="erin-gone")
    users.filter(pk=mallory.pk).update(username="erin")
    world.releasers.user_set.add(mallory)
    assert {m for m in _rights_mismatches() if "membership" in m} == {
        "group mac-approvers: the membership of erin is 'member' in the table, 'never added' in the audit chain"}
    world.releasers.user_set.remove(mallory)

    # a new group takes the group's old name and is deleted through the portal: the renamed group's
    # rights stand
    old_name = Group.objects.create(name="mac-releasers")
    group_delete(actor=SYSTEM, group=old_name)
    assert _rights_mismatches() == set()


def test_a_deleted_users_rights_do_not_come_back_with_their_id(world, history, make_user):
    """A user deleted through the portal ends their grants and memberships; the same row written back
    by SQL with a right has none the chain gave."""
    prod = str(world.production)
    gina = make_user("gina", groups=[world.releasers])
    services.environment_grant(actor=SYSTEM, environment=world.production, codename="deploy_environment", user=gina)
    pk, password = gina.pk, gina.password
    services.group_membership_change(actor=SYSTEM, group=world.releasers, user=gina, add=False)
    user_delete(actor=SYSTEM, user=gina)
    assert _rights_mismatches() == set()

    back = type(gina).objects.create(pk=pk, username="gina", password=password, is_staff=True)
    assign_perm("environments.deploy_environment", back, world.production)
    world.releasers.user_set.add(back)
    deleted = AuditEvent.objects.get(action="user.delete").seq
    assert _rights_mismatches() == {
        f"deploy_environment on {prod}: the right of gina is 'held' in the table, 'user.delete at seq {deleted}' in "
        "the audit chain",
        f"group mac-releasers: the membership of gina is 'member' in the table, 'user.delete at seq {deleted}' in the "
        "audit chain",
        "account gina: is_staff is 'True' in the table, 'no user.create event' in the audit chain",  # since deleted
    }


def test_grants_written_before_ids_were_recorded_are_matched_by_name(world, history, make_user):
    """An event written before grantees' ids were recorded names them only: it is matched by every name
    the chain knows them by, and a deletion of a user or group of that name ends it."""
    prod = str(world.production)
    hank = make_user("hank")
    assign_perm("environments.approve_environment", hank, world.production)
    chain.append(actor=SYSTEM, action="environment.grant", obj=world.production, data={
        "environment": prod, "permission": "approve_environment", "user": "hank", "group": None})
    hank.username = "henry"
    user_save(actor=SYSTEM, user=hank)
    legacy = Group.objects.create(name="legacy-approvers")
    assign_perm("environments.approve_environment", legacy, world.production)
    chain.append(actor=SYSTEM, action="environment.grant", obj=world.production, data={
        "environment": prod, "permission": "approve_environment", "user": None, "group": "legacy-approvers"})
    legacy.user_set.add(world.carol)
    chain.append(actor=SYSTEM, action="group.add_member", obj=legacy, data={"group": "legacy-approvers",
                                                                             "user": "carol"})
    assert _rights_mismatches() == set()
    table = {(r["username"], r["via"]): r for r in export("access")[2] if r["environment"]}
    granted = AuditEvent.objects.filter(action="environment.grant", data__user="hank").get()
    assert table[("henry", "direct")]["since_audit_seq"] == str(granted.seq)

    group_delete(actor=SYSTEM, group=legacy)
    again = Group.objects.create(name="legacy-approvers")
    again.user_set.add(world.carol)
    assign_perm("environments.approve_environment", again, world.production)
    deleted = AuditEvent.objects.get(action="group.delete").seq
    assert _rights_mismatches() == {
        f"approve_environment on {prod}: the right of carol through group legacy-approvers is 'held' in the table, "
        f"'group.delete at seq {deleted}' in the audit chain",
        "group legacy-approvers: the membership of carol is 'member' in the table, 'never added' in the audit chain",
    }


def test_exceptions_show_account_rights_given_outside_the_portal(world, history, make_user):
    """A superuser or staff flag, a model permission (a person's or a group's) or a membership of a group
    that holds one, written to the tables directly, has no event behind it: the right to change
    accounts, groups or environments, and so to grant deploy and approve, given by SQL."""
    users, perm = get_user_model().objects, lambda app, codename: Permission.objects.get(
        content_type__app_label=app, codename=codename)
    make_user("root", superuser=True)
    admins = Group.objects.create(name="account-admins")  # as the admin makes one: its rights through the portal
    group_permissions_change(actor=SYSTEM, group=admins, permissions=[perm("auth", "change_user")])
    services.group_membership_change(actor=SYSTEM, group=admins, user=world.carol, add=True)
    world.erin.is_active = False
    user_save(actor=SYSTEM, user=world.erin)
    assert _rights_mismatches() == set()

    users.filter(pk=world.dave.pk).update(is_superuser=True)
    world.alice.user_permissions.add(perm("auth", "change_group"))
    admins.permissions.add(perm("environments", "change_environment"))
    admins.user_set.add(world.bob)
    users.filter(pk=world.erin.pk).update(is_active=True)
    users.create_user("mallory", is_staff=True)  # as `createsuperuser` or an INSERT would
    assert _rights_mismatches() == {
        "account dave: is_superuser is 'True' in the table, 'False' in the audit chain",
        "account alice: the model permission auth.change_group is 'held' in the table, 'never given' in the audit "
        "chain",
        "group account-admins: the model permission environments.change_environment is 'held' in the table, 'never "
        "given' in the audit chain",
        "group account-admins: the membership of bob is 'member' in the table, 'never added' in the audit chain",
        "account erin: is_active is 'True' in the table, 'False' in the audit chain",
        "account mallory: is_staff is 'True' in the table, 'no user.create event' in the audit chain",
    }

    # adopted, with a reason: on the chain, listed once in the exceptions of their period, then no longer
    assert len(reconcile.adopt_rights(actor=SYSTEM, reason="made before the portal audited accounts",
                                      dry_run=True)) == 6 and _rights_mismatches() != set()
    adopted = reconcile.adopt_rights(actor=SYSTEM, reason="made before the portal audited accounts")
    assert len(adopted) == 6 and _rights_mismatches() == set()
    rows = [r for r in export("exceptions")[2] if r["kind"] == "adopted_right"]
    assert {r["rule"] for r in rows} == {"RIGHT_MADE_OUTSIDE_PORTAL"} and len(rows) == 6
    assert any(r["detail"] == "user.change dave: is_superuser False -> True; reason: made before the portal audited "
               "accounts" for r in rows), [r["detail"] for r in rows]
    assert any(r["detail"].startswith("group.add_member account-admins: bob a member") for r in rows)
    assert not [r for r in export("exceptions")[2] if r["detail"] == "bob added to group account-admins"]
    assert reconcile.adopt_rights(actor=SYSTEM, reason="again") == [] and chain.verify().ok

    # a membership bringing a right to deploy or approve on a restricted environment is never adopted
    group_permissions_change(actor=SYSTEM, group=world.releasers, permissions=[perm("environments", "view_deployment")])
    world.releasers.user_set.add(make_user("frank"))  # by SQL
    assert "group mac-releasers: the membership of frank is 'member' in the table, 'never added' in the audit " \
           "chain" in _rights_mismatches()
    assert reconcile.adopt_rights(actor=SYSTEM, reason="frank too") == []
    assert "group mac-releasers: the membership of frank is 'member' in the table, 'never added' in the audit " \
           "chain" in _rights_mismatches()
    with pytest.raises(ValueError, match="Say why"):
        reconcile.adopt_rights(actor=SYSTEM, reason=" ")


def test_an_id_deleted_through_the_portal_and_written_again_by_sql_has_nothing_the_deleted_one_had(world, history,
                                                                                                 make_user):
    """The insider's review: a user or group deleted through the portal and inserted again by SQL on its
    id (with a superuser flag, the right to change environments, a member) is not the one the chain
    gave those rights to."""
    perm = Permission.objects.get
    root = make_user("root2", superuser=True, perms=["auth.change_user"])
    admins = Group.objects.create(name="admins2")
    group_permissions_change(actor=SYSTEM, group=admins, permissions=[perm(codename="change_environment")])
    services.group_membership_change(actor=SYSTEM, group=admins, user=world.carol, add=True)
    user_pk, group_pk = root.pk, admins.pk
    user_delete(actor=SYSTEM, user=root)
    group_delete(actor=SYSTEM, group=admins)
    assert _rights_mismatches() == set()
    mallory = get_user_model().objects.create(pk=user_pk, username="mallory", is_superuser=True)
    mallory.user_permissions.add(perm(codename="change_user"))
    other = Group.objects.create(pk=group_pk, name="other")
    other.permissions.add(perm(codename="change_environment"))
    other.user_set.add(world.carol)
    deleted = AuditEvent.objects.get(action="group.delete").seq
    assert _rights_mismatches() == {
        "account mallory: is_superuser is 'True' in the table, 'no user.create event' in the audit chain",
        "account mallory: the model permission auth.change_user is 'held' in the table, 'never given' in the audit "
        "chain",
        "group other: the model permission environments.change_environment is 'held' in the table, 'never given' in "
        "the audit chain",
        f"group other: the membership of carol is 'member' in the table, 'group.delete at seq {deleted}' in the audit "
        "chain",
    }


def test_a_membership_adopted_while_its_group_held_no_grant_gives_no_right_on_a_restricted_environment(world,
                                                                                                       history,
                                                                                                       make_user):
    """The insider's review: the group's grants removed by SQL for a moment, a member added by SQL and
    adopted, the grants put back: the adopted membership still brings no right to deploy or approve."""
    from guardian.models import GroupObjectPermission

    group_permissions_change(actor=SYSTEM, group=world.releasers,
                             permissions=[Permission.objects.get(codename="view_deployment")])
    frank = make_user("frank")
    world.releasers.user_set.add(frank)
    grants = list(GroupObjectPermission.objects.filter(group=world.releasers).values())
    GroupObjectPermission.objects.filter(group=world.releasers).delete()
    assert len(reconcile.adopt_rights(actor=SYSTEM, reason="frank")) == 1
    for row in grants:
        GroupObjectPermission.objects.create(**row)
    adopted = AuditEvent.objects.get(action="group.add_member", data__adopted="frank").seq
    assert f"group mac-releasers: the membership of frank is 'member' in the table, 'adopted at seq {adopted}, never " \
           "given through the portal' in the audit chain" in _rights_mismatches()
