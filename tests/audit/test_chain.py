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


TRICKY_DATA = {
    "text": "ünïcode \"quoted\" back\\slash\ttab\nnewline \x01 \u2028 😀",
    "nested": {"b": [1, -2, 10**30, True, False, None], "a": {"z": "", "é": "x"}},
    "list": [], "empty": {},
}


def old_canonical(event: AuditEvent) -> str:
    """The canonical text as the chain first wrote it: json.dumps of the event's fields."""
    body = {
        "seq": event.seq, "created_at": chain.iso(event.created_at), "actor_id": event.actor_id,
        "actor_username": event.actor_username, "actor_email": event.actor_email, "via": event.via,
        "action": event.action, "object_type": event.object_type, "object_id": event.object_id,
        "object_repr": event.object_repr, "code": event.code, "data": event.data,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("actor_id", [None, 7])
def test_canonical_text_is_byte_for_byte_the_sorted_json_form(actor_id):
    import datetime as dt

    event = AuditEvent(seq=12, created_at=dt.datetime(2026, 3, 1, 12, 0, 0, 5, tzinfo=dt.UTC), actor_id=actor_id,
                       actor_username="Zoë \"z\"", actor_email="z@example.com", via="admin", action="test.event",
                       object_type="environments.deployment", object_id="42", object_repr="#42 MAC 1.0 -> QA\\",
                       code="SOD_IMPLEMENTER_APPROVER", data=TRICKY_DATA)
    assert chain.canonical(event) == old_canonical(event)


def test_appended_event_is_stored_as_hashed_and_cannot_be_saved_again(db):
    event = chain.append(actor=ACTOR, action="test.event", data=TRICKY_DATA, object_type="x", object_id="1")
    stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.data == TRICKY_DATA and stored.seq == event.seq and stored.hash == event.hash
    assert stored.canonical == event.canonical == old_canonical(stored)
    with pytest.raises(AppendOnlyError):
        event.save()


def test_verify_accepts_a_chain_written_by_the_first_append(db):
    """Events hashed by the chain's first append (model save, json.dumps form) still verify."""
    import datetime as dt

    prev = chain.GENESIS_HASH
    for seq in (1, 2):
        event = AuditEvent(seq=seq, created_at=dt.datetime(2025, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
                           actor_username="system", via="test", action="test.old", data=json.loads(
                               json.dumps({"n": seq, "text": "ünïcode"})), prev_hash=prev)
        event.canonical = old_canonical(event)
        event.hash = chain.link_hash(prev, event.canonical)
        event.save(force_insert=True)
        prev = event.hash
    newest = chain.append(actor=ACTOR, action="test.new", data={"n": 3})
    result = chain.verify()
    assert (result.ok, result.count, result.head_hash) == (True, 3, newest.hash)


def test_verify_reads_the_chain_in_chunks_and_names_a_bad_event_in_a_later_chunk(db, monkeypatch):
    import threading

    monkeypatch.setattr(chain, "VERIFY_CHUNK", 3)
    events = [chain.append(actor=ACTOR, action="test.event", data={"n": n}) for n in range(11)]
    assert chain.verify().ok and chain.verify().count == 11
    tamper("UPDATE audit_auditevent SET object_repr = %s WHERE seq = %s", ["edited", 8])
    result = chain.verify()
    assert (result.ok, result.bad_seq, result.head_hash) == (False, 8, events[6].hash)
    assert not [t for t in threading.enumerate() if t.name == "audit-verify-fetch"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify renders times in SQL on PostgreSQL only")
def test_postgresql_renders_times_as_iso_does(db):
    import datetime as dt

    moments = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 6, 30, 23, 59, 59, 999999, tzinfo=dt.UTC),
               dt.datetime(1999, 12, 31, 22, 0, 0, 10, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
               dt.datetime(1, 1, 1, 0, 0, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 12, tzinfo=dt.UTC)]
    with connection.cursor() as cursor:
        for moment in moments:
            cursor.execute(f"SELECT {chain.postgresql_iso('t')} FROM (SELECT %s::timestamptz t) x", [moment])
            assert cursor.fetchone()[0] == chain.iso(moment)
        cursor.execute(f"SELECT {chain.postgresql_iso('t')} FROM (SELECT '0001-01-01 BC'::timestamptz t) x")
        assert cursor.fetchone()[0] is None  # no canonical text can match it


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
@pytest.mark.parametrize("bad_seq", [None, 1, 9, 10, 23])
def test_verify_in_several_processes_answers_as_one_pass_does(transactional_audit_db, monkeypatch, bad_seq):
    """Ranges of 8 events in 3 processes (24 events): the same answer as one pass, whether the chain
    is intact or the bad event is the first, inside a range, on a range's first event or the last."""
    events = [chain.append(actor=ACTOR, action="test.event", data={"n": n}) for n in range(24)]
    if bad_seq:
        tamper("UPDATE audit_auditevent SET object_repr = %s WHERE seq = %s", ["edited", bad_seq])
    one_pass = chain.verify(workers=1)
    monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
    split = chain.verify(workers=3)
    assert split == one_pass
    assert (split.ok, split.bad_seq) == (bad_seq is None, bad_seq)
    assert split.head_hash == (events[-1].hash if bad_seq is None else (events[bad_seq - 2].hash if bad_seq > 1
                                                                         else chain.GENESIS_HASH))


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
def test_verify_in_several_processes_finds_a_removed_event_on_a_range_boundary(transactional_audit_db, monkeypatch):
    [chain.append(actor=ACTOR, action="test.event", data={"n": n}) for n in range(24)]
    tamper("DELETE FROM audit_auditevent WHERE seq = %s", [9])
    monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
    split = chain.verify(workers=3)
    assert split == chain.verify(workers=1)
    assert (split.ok, split.count) == (False, 8)
