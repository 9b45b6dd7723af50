"""The audit chain: append-only in the model, the queryset and the database; tampering is found."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction

from audit import chain, triggers
from audit.actors import Actor
from audit.models import AppendOnlyError, AuditEvent
from environments.models import Environment
from releases.models import Application

ACTOR = Actor.system(via="test")


def append_three():
    return [chain.append(actor=ACTOR, action="test.event", data={"n": n, "text": "ünïcode"}) for n in range(3)]


def test_events_are_numbered_and_linked(db):
    first, second, third = append_three()
    assert [e.seq for e in (first, second, third)] == [1, 2, 3]
    assert first.prev_hash == chain.GENESIS_HASH
    assert second.prev_hash == first.hash and third.prev_hash == second.hash
    result = chain.verify()
    assert (result.ok, result.count, result.head_hash) == (True, 3, third.hash)


def test_hash_is_sha256_of_previous_hash_and_canonical_json(db):
    import hashlib

    event = append_three()[1]
    stored = AuditEvent.objects.get(pk=event.pk)
    text = chain.canonical(stored)
    assert json.loads(text)["data"] == {"n": 1, "text": "ünïcode"}
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stored.hash == hashlib.sha256(f"{stored.prev_hash}\n{text}".encode()).hexdigest()


def test_floats_are_refused_in_audit_data(db):
    with pytest.raises(TypeError):
        chain.append(actor=ACTOR, action="test.float", data={"x": 1.5})


def test_model_and_queryset_refuse_changes(db):
    event = append_three()[0]
    event.action = "edited"
    with pytest.raises(AppendOnlyError):
        event.save()
    with pytest.raises(AppendOnlyError):
        event.delete()
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.filter(pk=event.pk).update(action="edited")
    with pytest.raises(AppendOnlyError):
        AuditEvent.objects.all().delete()


@pytest.mark.parametrize("sql", [
    "UPDATE audit_auditevent SET action = 'edited'",
    "DELETE FROM audit_auditevent",
    "UPDATE auditlog_logentry SET object_repr = 'edited'",
    "DELETE FROM auditlog_logentry",
])
def test_database_refuses_update_and_delete(db, sql):
    append_three()
    Application.objects.create(name="HAMS", issue_key_prefix="HAMS")  # gives auditlog an entry
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql)
    assert AuditEvent.objects.filter(action="edited").count() == 0
    assert chain.verify().ok


@pytest.mark.skipif(connection.vendor != "postgresql", reason="TRUNCATE exists on PostgreSQL only")
@pytest.mark.parametrize("table", ["audit_auditevent", "auditlog_logentry", "releases_release"])
def test_database_refuses_truncate(db, table):
    append_three()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {table} CASCADE")
    assert AuditEvent.objects.count() == 3


def tamper(sql, params):
    """Edit the chain the way an attacker with DDL rights would: drop the guard, change, restore it."""
    triggers.drop(connection, "audit_auditevent")
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
    finally:
        triggers.install(connection, "audit_auditevent")


def test_verify_names_the_exact_edited_event(db):
    events = [chain.append(actor=ACTOR, action="test.event", data={"n": n}) for n in range(10)]
    tamper("UPDATE audit_auditevent SET data = %s WHERE seq = %s", [json.dumps({"n": 99}), 7])
    result = chain.verify()
    assert not result.ok and result.bad_seq == 7
    assert result.head_hash == events[5].hash
    err = StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command("verify_audit", stdout=StringIO(), stderr=err)
    assert exit_info.value.code == 1
    assert "seq 7" in err.getvalue()


def test_verify_finds_a_removed_event(db):
    append_three()
    tamper("DELETE FROM audit_auditevent WHERE seq = %s", [2])
    result = chain.verify()
    assert not result.ok and result.bad_seq == 3 and "missing" in result.problem


def test_verify_finds_a_recomputed_hash_that_breaks_the_next_link(db):
    append_three()
    tamper("UPDATE audit_auditevent SET hash = %s WHERE seq = %s", ["f" * 64, 1])
    result = chain.verify()
    assert not result.ok and result.bad_seq == 1


def test_verify_audit_command_prints_ok_count_and_head(db):
    events = append_three()
    out = StringIO()
    call_command("verify_audit", stdout=out)
    assert out.getvalue().strip() == f"OK 3 {events[-1].hash}"


def test_field_history_of_settings_models_enters_the_chain(world):
    world.production.required_approvals = 2
    world.production.save()
    entry = AuditEvent.objects.filter(action="field_history.update", object_type="environments.environment").last()
    assert entry.object_id == str(world.production.pk)
    assert entry.data["changes"]["required_approvals"] == ["1", "2"]
    assert chain.verify().ok


def test_group_membership_and_grants_are_field_history_too(world, make_user):
    frank, grace = make_user("frank"), make_user("grace")
    world.releasers.user_set.add(frank)  # from the group's side
    grace.groups.add(world.releasers)  # from the user's side
    membership = [
        json.dumps(e.data) for e in AuditEvent.objects.filter(action__startswith="field_history")
        if "groups" in e.data["changes"]
    ]
    assert any("frank" in m for m in membership) and any("mac-releasers" in m for m in membership)
    assert AuditEvent.objects.filter(action="field_history.create",
                                     object_type="guardian.groupobjectpermission").count() == 2
    assert Environment.objects.count() == 3
