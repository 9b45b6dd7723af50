"""Seals: an event appended by whoever can write the database, with a hash that links as the portal's
would, is told from the portal's own by `verify_audit` with the seal key (audit/seal.py)."""

import datetime as dt
import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.test import override_settings
from django.urls import reverse

from audit import chain, seal, triggers
from audit.actors import Actor
from audit.models import AuditEvent
from tests.audit.forgery import drop_unique_seals, forge, strip_seals
from tests.processes import ROOT, production_env

ACTOR = Actor.system(via="test")
KEY = b"test-only-audit-seal-key"


def appended(n: int = 3) -> list[AuditEvent]:
    return [chain.append(actor=ACTOR, action="test.event", data={"n": i}) for i in range(n)]


def verify_command(*args) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("verify_audit", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def test_every_event_the_portal_appends_is_sealed_over_its_content(db):
    events = appended()
    for event in events:
        stored = AuditEvent.objects.get(pk=event.pk)
        assert stored.seal == event.seal and len(stored.seal) == 90
        assert seal.holds(stored.seal, seal.at_position_zero(stored.canonical, stored.seq), KEY)
        assert not seal.holds(stored.seal, seal.at_position_zero(stored.canonical, stored.seq), b"another key")
    assert len({e.seal for e in events}) == 3  # each has a nonce of its own
    result = chain.verify()
    assert (result.ok, result.seals_checked, result.unsealed_until) == (True, True, 0)
    code, out, err = verify_command()
    assert code == 0 and out.startswith("OK 3 ") and "Every event (1 to 3) is sealed by the portal's key." in err


@pytest.mark.parametrize("data", [{"n": 1}, {"seq": 7, "via": "x", "note": '"seq":7,"via":'}])
def test_the_text_a_seal_covers_is_the_canonical_text_at_position_zero(data):
    """Both forms of the canonical text (the fast one and the general one) give the same text at
    position 0, whatever the event's data holds."""
    fields = dict(created_at="2026-12-01T05:00:00.000001Z", actor_id=None, actor_username="ci:bench",
                  actor_email="", via='a"pi', action="build.register", object_type="releases.build", object_id="9",
                  object_repr="MAC #9", code="", data=data)
    at_zero = chain.canonical_text(0, **fields)
    assert seal.at_position_zero(chain.canonical_text(123, **fields), 123) == at_zero
    general = chain._canonical_dict(123, *fields.values())
    assert general == chain.canonical_text(123, **fields) and seal.at_position_zero(general, 123) == at_zero
    with pytest.raises(ValueError):
        seal.at_position_zero(at_zero, 123)
    text, value = chain.canonical_text(123, **fields), seal.seal(at_zero, KEY)
    check = seal.checker(KEY)  # verify's own form of holds(value, at_position_zero(text, seq), key)
    assert check(value, text, 123) == 0 and seal.holds(value, at_zero, KEY)
    for other, seq in ((value, 124), (value[:-1] + "é", 123), (value.upper(), 123), (value + "0", 123)):
        assert check(other, text, seq) is None and not (seq == 123 and seal.holds(other, at_zero, KEY))
    assert seal.checker(b"another key")(value, text, 123) is None


def test_an_event_inserted_by_sql_is_told_from_the_portals_own(db):
    appended()
    forged = forge()  # no seal: the attack the auditor showed (a right given by SQL, "given" in the chain)
    assert chain.verify(keys=None).ok  # the chain alone cannot tell it
    result = chain.verify()
    assert (result.ok, result.bad_seq, result.head_seq) == (False, forged.seq, forged.seq - 1)
    assert f"event seq {forged.seq} has no seal, though event seq 1 before it has one" in result.problem
    code, out, err = verify_command()
    assert code == 1 and f"FAILED at seq {forged.seq}" in err and "not written by the portal" in err


def test_a_seal_made_without_the_key_does_not_hold(db):
    appended()
    text = "anything"
    forged = forge(seal_value=seal.seal(text, b"a guessed key"))
    result = chain.verify()
    assert (result.ok, result.bad_seq) == (False, forged.seq)
    assert "its seal does not hold" in result.problem


def test_an_event_copied_to_the_head_with_its_seal_is_refused_or_found(db):
    """An old grant copied to the head (after its revoke, say): its content and seal are genuine. The
    database refuses it while seals are unique; with that constraint dropped, verify finds it."""
    first, *_ = appended()
    with pytest.raises(IntegrityError), transaction.atomic():
        forge(like=first)
    drop_unique_seals()  # what a database administrator can do first
    copy = forge(like=first)
    assert chain.verify(events=AuditEvent.objects.all()).problem == chain.verify().problem
    result = chain.verify()
    assert (result.ok, result.bad_seq, result.count, result.head_seq) == (False, copy.seq, 3, 3)
    assert result.head_hash == AuditEvent.objects.get(seq=3).hash
    assert f"carries the seal of event seq {first.seq}" in result.problem


def test_a_chain_begun_before_the_key_was_set_is_sealed_from_then_on(db):
    with override_settings(PORTAL_AUDIT_SEAL_KEY=None):
        unsealed = appended(2)
        assert all(AuditEvent.objects.get(pk=e.pk).seal is None for e in unsealed)
        code, _, err = verify_command()
        assert code == 0 and "Seals not checked: no seal key" in err
    appended(2)
    result = chain.verify()
    assert (result.ok, result.unsealed_until) == (True, 2)
    code, _, err = verify_command()
    assert code == 0 and "Events 3 to 4 are sealed by the portal's key; events 1 to 2 were written before" in err
    forge()
    assert not chain.verify().ok


def test_a_process_without_the_key_writes_nothing_once_the_chain_is_sealed(db):
    """An unsealed event would stay in the chain and stop verify at it for good: a worker or command
    started without the key fails loudly instead, and its transaction writes nothing."""
    appended(2)
    with override_settings(PORTAL_AUDIT_SEAL_KEY=None), pytest.raises(ImproperlyConfigured, match="no seal key"):
        with transaction.atomic():
            chain.append(actor=ACTOR, action="test.event")
    assert AuditEvent.objects.count() == 2 and chain.verify().ok
    forged = forge()  # one written by SQL is still named
    result = chain.verify()
    assert (result.ok, result.bad_seq) == (False, forged.seq)
    assert "has no seal, though event seq 1 before it has one" in result.problem


def test_verify_with_another_key_fails_at_the_first_sealed_event(db):
    first, *_ = appended()
    result = chain.verify(keys=b"not the portal's")
    assert (result.ok, result.bad_seq, result.count) == (False, first.seq, 0)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
@pytest.mark.parametrize("attack", ["unsealed", "foreign"])  # a copy is found after the ranges, as in one pass
@pytest.mark.parametrize("at", [17, 21])  # the first event of the third range of 8, and one inside it
def test_verify_in_several_processes_finds_what_one_pass_finds(transactional_audit_db, monkeypatch, attack, at):
    appended(at - 1)
    if attack == "unsealed":
        forge()
    else:
        forge(seal_value=seal.seal("x", b"a guessed key"))
    appended(24 - at)
    one_pass = chain.verify(workers=1)
    monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
    split = chain.verify(workers=3)
    assert split == one_pass and not split.ok and split.bad_seq == at
    assert split.count == at - 1 and split.head_hash == AuditEvent.objects.get(seq=at - 1).hash
    if attack == "unsealed":
        assert f"event seq {at} has no seal, though event seq 1 before it has one" in split.problem


@pytest.mark.parametrize("variable, setting, content, read, unset, empty", [
    ("PORTAL_AUDIT_SEAL_KEY_FILE", "PORTAL_AUDIT_SEAL_KEY", "a key off the database\n", "b'a key off the database'",
     "None", None),  # an empty key file is refused
    ("PORTAL_AUDIT_RETIRED_SEAL_KEYS_FILE", "PORTAL_AUDIT_RETIRED_SEAL_KEYS", "the first key\n\n  the second key  \n",
     "(b'the first key', b'the second key')", "()", "()"),  # one made ready before the first change retires none
])
def test_production_settings_read_a_seal_key_file_and_refuse_one_they_cannot_read(tmp_path, variable, setting,
                                                                                  content, read, unset, empty):
    key = tmp_path / "seal.key"
    key.write_text(content)
    script = f"from django.conf import settings; print(settings.{setting})"
    done = production_shell(tmp_path, script, **{variable: str(key)})
    assert done.returncode == 0 and done.stdout.strip() == read, done.stderr
    done = production_shell(tmp_path, script, **{variable: str(tmp_path / "missing.key")})
    assert done.returncode != 0 and f"Cannot read {variable}" in done.stderr
    assert production_shell(tmp_path, script).stdout.strip() == unset
    key.write_text("")
    done = production_shell(tmp_path, script, **{variable: str(key)})
    if empty is None:
        assert done.returncode != 0 and f"{variable} {key} is empty" in done.stderr
    else:
        assert done.returncode == 0 and done.stdout.strip() == empty, done.stderr


def production_shell(tmp_path, script: str, **settings) -> subprocess.CompletedProcess:
    env = production_env(tmp_path, SECRET_KEY="x" * 50, **settings)
    return subprocess.run([sys.executable, "manage.py", "shell", "-v0", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_an_events_page_says_what_its_seal_says(client, make_user):
    client.force_login(make_user("root", superuser=True))
    sealed = appended(1)[0]
    forged, garbage = forge(), forge(seal_value="0123456789abcdef:" + "0" * 64)

    def page(event):
        return client.get(reverse("admin:audit_auditevent_change", args=[event.pk])).content.decode()

    assert "holds: written by the portal" in page(sealed)
    assert "none: written without the seal key" in page(forged)
    assert "does not hold: not written by the portal with its key" in page(garbage)
    with override_settings(PORTAL_AUDIT_SEAL_KEY=None):
        assert "not checked: this portal has no seal key" in page(sealed)


def test_seals_removed_since_a_checkpoint_are_found_by_it(db, tmp_path, monkeypatch):
    """Without seals an event appended by SQL looks older than sealing; a checkpoint keeps where sealing
    began, signed, so `verify_audit --checkpoint` finds the seals removed."""
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY", "the checkpoint key")
    appended(3)
    cp = tmp_path / "cp.json"
    call_command("audit_checkpoint", "-o", str(cp), stdout=StringIO(), stderr=StringIO())
    assert json.loads(cp.read_text())["sealed_from"] == 1
    strip_seals()
    forged = forge()
    code, _, err = verify_command()
    assert code == 0 and "No event is sealed" in err and "a checkpoint taken since says where sealing began" in err
    code, _, err = verify_command("--checkpoint", str(cp))
    assert code == 1 and "says events are sealed from seq 1 on, but the chain's first sealed event is now" in err
    assert forged.seq == 5  # the checkpoint's own event is 4


def test_a_malformed_seal_fails_verify_with_a_sentence(db):
    appended(2)
    forge(seal_value="0123456789abcdef:é" + "0" * 63)
    code, _, err = verify_command()
    assert code == 1 and "FAILED at seq 3: event seq 3: its seal does not hold" in err and "Traceback" not in err


@pytest.mark.skipif(connection.vendor != "postgresql", reason="table inheritance is PostgreSQL's")
def test_events_in_a_table_inheriting_the_audit_table_fail_verify(db):
    """PostgreSQL reads a child table's rows with its parent's, but the parent's unique constraint and
    triggers do not hold them: a copied event could hide there."""
    appended(2)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE audit_extra () INHERITS (audit_auditevent)")
    result = chain.verify()
    assert not result.ok and "the audit table has child tables (audit_extra)" in result.problem
    assert "nothing is proven" in result.problem


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row-level security and rules are PostgreSQL's")
@pytest.mark.parametrize("hiding, sql", [
    ("row-level security", ["ALTER TABLE audit_auditevent ENABLE ROW LEVEL SECURITY",
                            "ALTER TABLE audit_auditevent FORCE ROW LEVEL SECURITY",
                            "CREATE POLICY hide ON audit_auditevent USING (seq >= 1 OR current_query() NOT LIKE "
                            "'%audit_chain_verify%')"]),
    ("rules", ["CREATE RULE quiet AS ON UPDATE TO audit_auditevent DO INSTEAD NOTHING"]),
])
def test_what_could_show_verify_other_rows_than_the_portals_fails_it(db, hiding, sql):
    """A policy can tell verify's query from the portal's (the insider's second review did): the table
    must have none, nor rules."""
    appended(2)
    with connection.cursor() as cursor:
        for statement in sql:
            cursor.execute(statement)
    result = chain.verify()
    assert not result.ok and f"the audit table has {hiding}" in result.problem


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
def test_an_event_before_the_chains_start_fails_verify_in_ranges_too(transactional_audit_db, monkeypatch):
    appended(24)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditevent DROP CONSTRAINT auditevent_seq_positive")
    try:
        AuditEvent.objects.bulk_create([AuditEvent(seq=-1, created_at=dt.datetime.now(dt.UTC),
                                                   action="group.add_member", canonical="{}", prev_hash="x", hash="y")])
        one_pass = chain.verify(workers=1)
        monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
        split = chain.verify(workers=3)
        assert not split.ok and split.bad_seq == -1 and "before the chain's first event" in split.problem
        assert not one_pass.ok and one_pass.bad_seq == -1 and "before the chain's first event" in one_pass.problem
    finally:
        triggers.drop(connection, "audit_auditevent")
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM audit_auditevent WHERE seq < 1")
            cursor.execute("ALTER TABLE audit_auditevent ADD CONSTRAINT auditevent_seq_positive CHECK (seq >= 1)")
        triggers.install(connection, "audit_auditevent")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
def test_a_chain_sealed_partway_verifies_in_ranges_as_in_one_pass(transactional_audit_db, monkeypatch):
    with override_settings(PORTAL_AUDIT_SEAL_KEY=None):
        appended(10)
    appended(14)
    one_pass = chain.verify(workers=1)
    monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
    split = chain.verify(workers=3)
    assert split == one_pass and split.ok and (split.unsealed_until, split.first_sealed) == (10, 11)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the catalog is PostgreSQL's")
def test_the_migrated_unique_constraint_on_seals_is_what_verify_trusts(db):
    """Verify skips looking for copies only while this holds (it reads the index's definition)."""
    assert chain._seals_unique_in_postgresql()
    drop_unique_seals()
    assert not chain._seals_unique_in_postgresql()


def test_the_first_copy_is_named(db):
    first, *_ = appended(3)
    drop_unique_seals()
    copies = [forge(like=first), appended(1)[0], forge(like=first)]
    result = chain.verify()
    assert (result.ok, result.bad_seq, result.head_seq) == (False, copies[0].seq, copies[0].seq - 1)
    assert chain.verify(events=AuditEvent.objects.all()) == result


OLD = b"the seal key before this one"


def test_a_changed_seal_key_keeps_what_the_old_one_sealed_verifying(db, client, make_user):
    """A key that may have leaked must be replaceable: the retired key stays listed (oldest first) so
    its events still verify, and the portal seals with the new one from then on."""
    with override_settings(PORTAL_AUDIT_SEAL_KEY=OLD):
        appended(2)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(2)
        result = chain.verify()
        assert (result.ok, result.seal_keys, result.first_sealed, result.current_from) == (True, 2, 1, 3)
        code, out, err = verify_command()
        assert code == 0 and out.startswith("OK 4 ")
        assert "Every event (1 to 4) is sealed by the portal's keys (2, oldest first). The current key seals from " \
               "event 3 on." in err
        client.force_login(make_user("root", superuser=True))
        pages = [client.get(reverse("admin:audit_auditevent_change", args=[e.pk])).content.decode()
                 for e in AuditEvent.objects.filter(seq__in=(1, 3)).order_by("seq")]
        assert "holds for a retired key (key 1 of 2, oldest first): written by the portal, unless an event before " \
            "it is sealed by a newer key" in pages[0]
        assert "holds: written by the portal with its current key" in pages[1]
    result = chain.verify()  # the retired key forgotten: its events are not the portal's
    assert (result.ok, result.bad_seq) == (False, 1) and "its seal does not hold" in result.problem
    result = chain.verify(keys=(KEY, OLD))  # listed newest first
    assert (result.ok, result.bad_seq) == (False, 3) and "not listed oldest first" in result.problem


def test_an_event_sealed_with_a_retired_key_after_the_change_is_not_the_portals(db):
    """Whoever holds a retired key (the reason to change it) cannot append with it."""
    with override_settings(PORTAL_AUDIT_SEAL_KEY=OLD):
        appended(2)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(1)
        forged = forge(sealed_with=OLD)
        result = chain.verify()
        assert (result.ok, result.bad_seq, result.head_seq) == (False, forged.seq, forged.seq - 1)
        assert f"event seq {forged.seq} is sealed by an older key than event seq 3 before it" in result.problem
        assert chain.verify(events=AuditEvent.objects.all()) == result


def test_seals_written_before_seals_named_their_key_are_the_oldest_keys(db):
    forge(action="test.event", sealed_with=OLD, key_named=False)
    forge(action="test.event", sealed_with=OLD, key_named=False)
    assert len(AuditEvent.objects.get(seq=1).seal) == 81 and chain.verify(keys=OLD).ok
    result = chain.verify(keys=(b"an older key still", OLD))  # a seal naming no key is the oldest key's
    assert (result.ok, result.bad_seq) == (False, 1)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(1)
        assert chain.verify().ok and chain.verify().current_from == 3


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
# ranges of 8: the new key from the first range, or the second, or the third; the event with the retired key
# first in the third range or inside it
@pytest.mark.parametrize("changed_at, at", [(1, 17), (1, 21), (9, 17), (18, 21)])
def test_verify_in_several_processes_finds_a_retired_keys_event_as_one_pass(transactional_audit_db, monkeypatch,
                                                                            changed_at, at):
    with override_settings(PORTAL_AUDIT_SEAL_KEY=OLD):
        appended(changed_at - 1)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(at - changed_at)
        forge(sealed_with=OLD)
        appended(24 - at)
        one_pass = chain.verify(workers=1)
        monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
        split = chain.verify(workers=3)
    assert split == one_pass and not split.ok and split.bad_seq == at
    assert f"event seq {at} is sealed by an older key than event seq {changed_at} before it" in split.problem


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
def test_a_range_sealed_by_a_newer_key_names_its_own_event_as_one_pass(transactional_audit_db, monkeypatch):
    """The insider's review: keys OLD < MID < KEY; the second range begins with KEY and then holds an
    event sealed by OLD, older than MID of the first range too: one pass names the range's own KEY."""
    with override_settings(PORTAL_AUDIT_SEAL_KEY=b"the key between", PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(8)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD, b"the key between")):
        appended(3)
        forge(sealed_with=OLD)
        appended(12)
        one_pass = chain.verify(workers=1)
        monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
        split = chain.verify(workers=3)
    assert split == one_pass and split.bad_seq == 12 and "older key than event seq 9 before it" in split.problem


@pytest.mark.skipif(connection.vendor != "postgresql", reason="verify splits the chain on PostgreSQL only")
def test_a_chain_of_three_keys_verifies_in_ranges_as_in_one_pass(transactional_audit_db, monkeypatch):
    newer = b"the key between"
    with override_settings(PORTAL_AUDIT_SEAL_KEY=OLD):
        appended(5)
    with override_settings(PORTAL_AUDIT_SEAL_KEY=newer, PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        appended(10)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD, newer)):
        appended(9)
        one_pass = chain.verify(workers=1)
        monkeypatch.setattr(chain, "VERIFY_PARALLEL_FROM", 10)
        split = chain.verify(workers=3)
    assert split == one_pass and split.ok and (split.seal_keys, split.current_from) == (3, 16)


def test_the_key_change_procedure_has_the_new_key_seal_the_checkpoints_event(db, tmp_path, monkeypatch):
    """docs/operating.md: right after the change a checkpoint signs the chain as the old key left it,
    and its own event is the first the new key seals; from then on a retired key cannot append."""
    monkeypatch.setenv("PORTAL_CHECKPOINT_KEY", "the checkpoint key")
    with override_settings(PORTAL_AUDIT_SEAL_KEY=OLD):
        appended(3)
    with override_settings(PORTAL_AUDIT_RETIRED_SEAL_KEYS=(OLD,)):
        cp = tmp_path / "seal-key.json"
        call_command("audit_checkpoint", "-o", str(cp), stdout=StringIO(), stderr=StringIO())
        assert json.loads(cp.read_text())["seq"] == 3
        code, _, err = verify_command("--checkpoint", str(cp))
        assert code == 0 and "The current key seals from event 4 on." in err
        forged = forge(sealed_with=OLD)
        code, _, err = verify_command("--checkpoint", str(cp))
        assert code == 1 and f"FAILED at seq {forged.seq}: event seq {forged.seq} is sealed by an older key" in err


def test_a_process_with_the_demos_key_writes_nothing_to_a_chain_another_key_sealed(db, settings):
    """A command run against a real database with the demo's settings (PORTAL_DEMO=1, no key) would seal
    with the demo's public key, and verify would fail at its event for good: it fails loudly instead."""
    appended(2)
    with override_settings(PORTAL_AUDIT_SEAL_KEY=settings.DEMO_SEAL_KEY), \
            pytest.raises(ImproperlyConfigured, match="seals with the demo's public key"), transaction.atomic():
        chain.append(actor=ACTOR, action="test.event")
    assert AuditEvent.objects.count() == 2 and chain.verify().ok


def test_the_demos_own_chain_is_sealed_with_the_demos_key(db, settings):
    with override_settings(PORTAL_AUDIT_SEAL_KEY=settings.DEMO_SEAL_KEY):
        appended(3)
        assert chain.verify().ok and AuditEvent.objects.count() == 3
