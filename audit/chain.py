"""The hash chain: canonical serialization, append and verify."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, replace
from decimal import Decimal
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, transaction
from django.db.models import Max, Min
from django.utils import timezone
from psycopg.types.string import TextLoader

from audit import seal
from audit.actors import Actor
from audit.models import AuditEvent
from core.compiled import insert_sql, inserted_fields, prepared
from core.times import iso

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the advisory lock that serializes appends on PostgreSQL.
CHAIN_LOCK_KEY = 7_341_120_001
# On PostgreSQL every append starts with these (_lock_sql): the checks of the foreign keys the
# transaction has written so far, the acting person's account locked as a foreign key's check locks it,
# then the chain's lock (held until commit), then the head. Django's foreign keys are checked at commit
# (DEFERRABLE INITIALLY DEFERRED), and a check locks the row it points at (FOR KEY SHARE): at commit it
# would be asked for under the chain's lock, and wait for a transaction holding that row (a build being
# updated, an application or an account being saved) which itself waits for the chain: a deadlock. So
# they run first, outside the chain's lock, and the rest of the transaction's checks are deferred again
# (_AFTER_LOCK_SQL, after the append's own statement). The rows written after the append that point at
# the acting person (the field history django-auditlog writes as a service saves) find that person's
# account locked already. An audit event itself has no foreign key: its actor is a plain number, so
# that it outlives the account.
_CHECK_SQL = "SET CONSTRAINTS ALL IMMEDIATE; "
_CHAIN_LOCK_SQL = f"SELECT pg_advisory_xact_lock({int(CHAIN_LOCK_KEY)}); "
_AFTER_LOCK_SQL = "; SET CONSTRAINTS ALL DEFERRED"
_HEAD_SQL = "SELECT seq, hash, seal FROM audit_auditevent ORDER BY seq DESC LIMIT 1"
# Once the chain is sealed, a process without the seal key writes nothing (an unsealed event would stay in
# the chain, and verify would stop at it for good).
_NO_KEY = ("The audit chain is sealed, and this process has no seal key (PORTAL_AUDIT_SEAL_KEY or "
           "PORTAL_AUDIT_SEAL_KEY_FILE): it records nothing until it has the portal's key.")
# Nor does a process that seals with the demo's public key (PORTAL_DEMO or PORTAL_DEBUG without a key) a
# chain another key sealed: a command pointed at a real database with the demo's settings.
_DEMO_KEY = ("This process seals with the demo's public key (PORTAL_DEMO or PORTAL_DEBUG without a seal key), and "
             "the audit chain is sealed by another key: it records nothing (an event sealed with the demo's key "
             "would fail verify_audit for good). Set PORTAL_AUDIT_SEAL_KEY_FILE to the portal's key.")


def _plain(value):
    """Turn a value into JSON-safe data with one representation only (no floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, dt.datetime):
        return iso(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, float):
        raise TypeError("Audit data may not hold floats: they have no single canonical form.")
    return str(value)


def postgresql_iso(column: str) -> str:
    """SQL giving, on PostgreSQL, the same text as `iso` for a timestamptz column (verify reads times
    so, without building a datetime per event); NULL outside the years Python can represent, which
    no canonical text then matches. tests/audit/test_chain.py holds the two to the same output."""
    return (f"CASE WHEN {column} >= '0001-01-01 00:00:00+00' AND {column} < '10000-01-01 00:00:00+00'"
            f" THEN to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') END")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_string = json.encoder.encode_basestring  # the encoder's own string form (ensure_ascii=False)


def canonical_text(seq: int, created_at: str, actor_id: int | None, actor_username: str, actor_email: str,
                   via: str, action: str, object_type: str, object_id: str, object_repr: str, code: str,
                   data) -> str:
    """The exact text that is hashed: the JSON object of these twelve fields with sorted keys, no
    whitespace, UTF-8 (not ASCII-escaped), times in UTC (`created_at` as given by `iso`).

    Byte for byte what `json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`
    gives for the dict of these fields; written out in sorted key order because it is twice as fast,
    and verify builds it once per event.
    """
    if type(seq) is int and (parts := _canonical_parts(actor_id, actor_username, actor_email, via, action,
                                                       object_type, object_id, object_repr, code, data)):
        try:
            return f"{parts[0]}{_string(created_at)}{parts[1]}{seq}{parts[2]}"
        except TypeError:  # created_at is not a string: the general form decides
            pass
    return _canonical_dict(seq, created_at, actor_id, actor_username, actor_email, via, action, object_type,
                           object_id, object_repr, code, data)


def _canonical_parts(actor_id, actor_username, actor_email, via, action, object_type, object_id, object_repr, code,
                     data) -> tuple[str, str, str] | None:
    """The canonical text around the two values an append learns only under the chain's lock: the text
    is `before + <created_at as a JSON string> + between + <seq> + after`. None where a value is not of
    the type the sorted form expects (the general form then decides)."""
    if not (actor_id is None or type(actor_id) is int):
        return None
    try:
        return (
            f'{{"action":{_string(action)},"actor_email":{_string(actor_email)},'
            f'"actor_id":{"null" if actor_id is None else actor_id},"actor_username":{_string(actor_username)},'
            f'"code":{_string(code)},"created_at":',
            f',"data":{_ENCODER.encode(data)},"object_id":{_string(object_id)},"object_repr":{_string(object_repr)},'
            f'"object_type":{_string(object_type)},"seq":',
            f',"via":{_string(via)}}}',
        )
    except TypeError:
        return None


def _canonical_dict(seq, created_at, actor_id, actor_username, actor_email, via, action, object_type, object_id,
                    object_repr, code, data) -> str:
    body = {
        "seq": seq, "created_at": created_at, "actor_id": actor_id, "actor_username": actor_username,
        "actor_email": actor_email, "via": via, "action": action, "object_type": object_type,
        "object_id": object_id, "object_repr": object_repr, "code": code, "data": data,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(event: AuditEvent) -> str:
    """The exact text that is hashed for one event (see canonical_text)."""
    return canonical_text(
        event.seq, iso(event.created_at), event.actor_id, event.actor_username, event.actor_email, event.via,
        event.action, event.object_type, event.object_id, event.object_repr, event.code, event.data,
    )


def link_hash(prev_hash: str, text: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{text}".encode()).hexdigest()


@functools.cache
def _person_lock_sql() -> str:
    users = get_user_model()._meta
    quote = connection.ops.quote_name
    return f"SELECT 1 FROM {quote(users.db_table)} WHERE {quote(users.pk.column)} = %s FOR KEY SHARE; "


def _lock_sql(actor_id: int | None) -> tuple[str, list, int]:
    """The statements that go before an append's own, their parameters, and how many results they give."""
    if actor_id is None:
        return _CHECK_SQL + _CHAIN_LOCK_SQL, [], 2
    return _CHECK_SQL + _person_lock_sql() + _CHAIN_LOCK_SQL, [actor_id], 3


def _lock_chain_and_read_head(actor_id: int | None) -> tuple[int, str, str | None] | None:
    """Serialize appends and read the head of the chain: (seq, hash, seal), or None for an empty chain.

    PostgreSQL: a transaction-scoped advisory lock held until commit. The lock and the read go in
    one round trip as two statements of one simple query: each statement takes its own snapshot
    (READ COMMITTED), so the read, which starts once the lock is granted, sees the event that the
    previous holder committed. (One statement would read with the snapshot it took before waiting for
    the lock, and number its event like the previous holder's.)
    SQLite: the settings open every transaction with BEGIN IMMEDIATE, so the writer holds the
    database write lock already.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            lock_sql, lock_params, results = _lock_sql(actor_id)
            cursor.execute(lock_sql + _HEAD_SQL + _AFTER_LOCK_SQL, lock_params or None)
            _skip_results(cursor, results, "The chain head query returned no result set.")
            return cursor.fetchone()
    return AuditEvent.objects.order_by("-seq").values_list("seq", "hash", "seal").first()


def head() -> AuditEvent | None:
    return AuditEvent.objects.order_by("-seq").first()


def naming(obj) -> dict:
    """How an event names the object it is about (append's object_type, object_id and object_repr): for
    an event written after the object is deleted, taken before."""
    return {"object_type": obj._meta.label_lower, "object_id": str(obj.pk), "object_repr": str(obj)}


def append(
    *,
    actor: Actor,
    action: str,
    obj=None,
    data: dict | None = None,
    code: str = "",
    object_type: str = "",
    object_id: str = "",
    object_repr: str = "",
) -> AuditEvent:
    """Append one event to the chain in the caller's transaction.

    What runs under the chain lock is kept to one round trip for the lock and the head, one INSERT,
    and the caller's commit: appends are serialized, so each round trip there is paid by every writer.
    """
    if obj is not None:
        about = naming(obj)
        object_type, object_id = object_type or about["object_type"], object_id or about["object_id"]
        object_repr = object_repr or about["object_repr"]
    user = actor.user
    if actor.is_ci:
        username, email, actor_id = actor.label, "", None
    elif user is not None:
        username, email, actor_id = user.get_username(), user.email or "", user.pk
    else:
        username, email, actor_id = "system", "", None
    # _plain gives exactly what the database gives back from the JSON column (string keys, lists,
    # no floats), so hashing it is hashing what verify will read.
    payload = _plain(dict(data or {}))
    if actor.token_id is not None:
        payload.setdefault("token_id", actor.token_id)
    if actor.remote_addr:
        payload.setdefault("remote_addr", actor.remote_addr)
    if actor.os_account:
        payload.setdefault("os_account", actor.os_account)
    event = AuditEvent(
        actor_id=actor_id,
        actor_username=username[:150],
        actor_email=email[:254],
        via=actor.via[:20],
        action=action,
        object_type=object_type[:100],
        object_id=object_id[:64],
        object_repr=object_repr[:300],
        code=code,
        data=payload,
    )
    # No savepoint: an append that fails leaves the caller's transaction to roll back as a whole.
    with transaction.atomic(savepoint=False):
        parts = _canonical_parts(event.actor_id, event.actor_username, event.actor_email, event.via, event.action,
                                 event.object_type, event.object_id, event.object_repr, event.code, event.data)
        demo = seal.sealing_with_demo_key()
        if connection.vendor == "postgresql" and parts is not None and not _server_side_binding() and not demo:
            _append_postgresql(event, parts)
            return event
        last = _lock_chain_and_read_head(event.actor_id)
        if last and last[2] is not None and settings.PORTAL_AUDIT_SEAL_KEY is None:
            raise ImproperlyConfigured(_NO_KEY)
        if demo and last and last[2] is not None and not seal.may_be_by(last[2], settings.PORTAL_AUDIT_SEAL_KEY):
            raise ImproperlyConfigured(_DEMO_KEY)
        event.seq, event.prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
        event.created_at = timezone.now()
        event.canonical = canonical(event)
        event.hash = link_hash(event.prev_hash, event.canonical)
        event.seal = _seal_of(seal.at_position_zero(event.canonical, event.seq))
        _insert(event)
    return event


def _server_side_binding() -> bool:
    """Server-side binding sends each query on its own (extended protocol): no two statements in one."""
    return bool(connection.settings_dict.get("OPTIONS", {}).get("server_side_binding"))


def _append_postgresql(event: AuditEvent, parts: tuple[str, str, str]) -> None:
    """Lock, read the head and insert the event in one round trip, so that under the chain's lock there
    are only this round trip and the caller's commit.

    The canonical text is built here but for the event's position, which only the lock holder knows:
    PostgreSQL puts it in and hashes the text as `link_hash` does. The hash it returns is checked
    against `link_hash` of the text this process expects; a mismatch raises and the caller's
    transaction rolls back, so what the chain holds is always what this module defines. The time is
    taken just before the lock is asked for. Two statements of one simple query, as in
    `_lock_chain_and_read_head`: the INSERT takes its snapshot once the lock is granted.
    """
    before, between, after = parts
    event.created_at = timezone.now()
    prefix = f"{before}{_string(iso(event.created_at))}{between}"
    event.seal = _seal_of(f"{prefix}0{after}")
    fields = [f for f in inserted_fields(AuditEvent) if f.attname not in _POSITION]
    params = [field.get_db_prep_save(getattr(event, field.attname), connection) for field in fields]
    sql, params = prepared(_append_sql(_typed_columns(tuple(fields))), [prefix, after, *params,
                                                                          event.seal is not None])
    with connection.cursor() as cursor:
        lock_sql, lock_params, results = _lock_sql(event.actor_id)
        cursor.execute(lock_sql + sql + _AFTER_LOCK_SQL, [*lock_params, *params])
        _skip_results(cursor, results, "The chain append returned no result.")
        if (row := cursor.fetchone()) is None:  # the guard below: a sealed head, an unsealed event
            raise ImproperlyConfigured(_NO_KEY)
        event.pk, event.seq, event.prev_hash, event.hash = row
    event.canonical = f"{prefix}{event.seq}{after}"
    if link_hash(event.prev_hash, event.canonical) != event.hash:
        raise RuntimeError(f"The database hashed audit event {event.seq} differently from audit.chain.link_hash.")
    event._state.adding, event._state.db = False, connection.alias


def _skip_results(cursor, results: int, missing: str) -> None:
    """Move the cursor past the results of _lock_sql's statements to the statement's own."""
    for _ in range(results):
        if not cursor.nextset():
            raise RuntimeError(missing)


_POSITION = ("seq", "canonical", "prev_hash", "hash")  # what the database fills in under the lock


def _seal_of(text_at_zero: str) -> str | None:
    key = settings.PORTAL_AUDIT_SEAL_KEY
    return None if key is None else seal.seal(text_at_zero, key)


@functools.cache
def _typed_columns(fields: tuple) -> tuple[tuple[str, str], ...]:
    return tuple((field.column, field.db_type(connection)) for field in fields)


@functools.cache
def _append_sql(columns: tuple[tuple[str, str], ...]) -> str:
    """The INSERT of one event at the head (run after the lock): prepared once per session, so that
    under the lock PostgreSQL neither parses nor plans it; each value typed as its column is."""
    quote, table = connection.ops.quote_name, connection.ops.quote_name(AuditEvent._meta.db_table)
    return (
        f"WITH head AS ({_HEAD_SQL}), "
        f"n AS (SELECT COALESCE((SELECT seq FROM head), 0) + 1 AS seq, "
        f"COALESCE((SELECT hash FROM head), '{GENESIS_HASH}') AS prev_hash), "
        f"e AS (SELECT n.seq, n.prev_hash, CAST(%s AS text) || n.seq || CAST(%s AS text) AS canonical FROM n) "
        f"INSERT INTO {table} ({', '.join(quote(c) for c, _ in columns)}, seq, canonical, prev_hash, hash) "
        f"SELECT {', '.join(f'CAST(%s AS {kind})' for _, kind in columns)}, e.seq, e.canonical, e.prev_hash, "
        f"encode(sha256(convert_to(e.prev_hash || E'\\n' || e.canonical, 'UTF8')), 'hex') FROM e "
        f"WHERE CAST(%s AS boolean) OR (SELECT seal FROM head) IS NULL "
        f"RETURNING {quote(AuditEvent._meta.pk.column)}, seq, prev_hash, hash"
    )


def _insert(event: AuditEvent) -> None:
    """One INSERT ... RETURNING id, without the model's save machinery (no signal listens to audit
    events); the instance is then as if saved, so saving it again raises AppendOnlyError."""
    fields = inserted_fields(AuditEvent)
    sql = _insert_sql(connection.vendor)
    params = [field.get_db_prep_save(getattr(event, field.attname), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        event.pk = cursor.fetchone()[0]
    event._state.adding, event._state.db = False, connection.alias


@functools.cache
def _insert_sql(vendor: str) -> str:
    return f"{insert_sql(AuditEvent, connection)} RETURNING {connection.ops.quote_name(AuditEvent._meta.pk.column)}"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problem: str = ""
    bad_seq: int | None = None
    seals_checked: bool = False  # a seal key was given
    unsealed_until: int = 0  # the last event without a seal: sealing began after it
    first_sealed: int | None = None  # the first sealed event (None: none is)
    seal_keys: int = 0  # the keys seals were checked with (the retired ones and the current one)
    current_from: int | None = None  # the first event sealed by the newest of them (None: none is)


_FROM_SETTINGS = object()


# The columns verify reads, in this order: the twelve hashed fields, then the stored text and links.
VERIFY_COLUMNS = ("seq", "created_at", "actor_id", "actor_username", "actor_email", "via", "action", "object_type",
                  "object_id", "object_repr", "code", "data", "canonical", "prev_hash", "hash", "seal")
VERIFY_CHUNK = 2000


def _event_rows(events: Iterable[AuditEvent]) -> Iterator[tuple]:
    for event in events:
        yield tuple(getattr(event, column) for column in VERIFY_COLUMNS)


def verify(events: Iterable[AuditEvent] | None = None, *, workers: int | None = None,
           keys: tuple[bytes, ...] | bytes | None = _FROM_SETTINGS) -> VerifyResult:
    """Recompute the whole chain; report the first event whose link or content does not match, and
    with seal `keys` (oldest first; default: seal.keys(), the retired keys and the current one; None:
    seals are not read) the first event the portal did not write: one without a valid seal after the
    first sealed event, one sealed by an older key than an event before it, or one carrying the seal
    of another (audit/seal.py).

    Reads plain rows in chunks and builds each canonical text from the columns, without model
    instances, so memory stays flat whatever the length of the chain. On PostgreSQL: a server-side
    cursor inside one transaction (so it streams rather than being materialized, as a cursor
    declared WITH HOLD is), times rendered by the database as `iso` renders them (postgresql_iso),
    JSON decoded here; a chain of more than VERIFY_PARALLEL_FROM events is split into one range per
    worker process (`workers`, default one per core), see _verify_parallel.
    """
    keys = seal.keys() if keys is _FROM_SETTINGS else (keys,) if isinstance(keys, bytes) else tuple(keys or ())
    if events is not None:
        events = list(events)
        hashes = {e.seq: e.hash for e in events}
        return _with_copies(_verify_rows(_event_rows(events), keys=keys).result, keys, _copied_seal_in(events),
                            hashes.get)
    if connection.vendor == "postgresql":
        if hiding := _what_may_hide_rows():
            return VerifyResult(False, 0, 0, GENESIS_HASH, f"the audit table has {hiding}: events could be read "
                                "by the portal and not by verify (or the other way round), so nothing is proven")
        workers = workers or os.cpu_count() or 1
        ends = AuditEvent.objects.aggregate(first=Min("seq"), head=Max("seq"))
        head_seq, first_seq = ends["head"] or 0, ends["first"]
        if first_seq is not None and first_seq < 1:  # ranges read 1..head: a row before would go unread
            return VerifyResult(False, 0, 0, GENESIS_HASH, _before_start(first_seq), first_seq)
        # Inside a transaction the other processes would not see what it wrote: one process then.
        if workers > 1 and head_seq >= VERIFY_PARALLEL_FROM and not connection.in_atomic_block:
            return _with_copies(_verify_parallel(head_seq, workers, keys), keys, _copied_seal)
        with transaction.atomic(), closing(_postgresql_rows()) as rows:
            return _with_copies(_verify_rows(rows, from_text=True, keys=keys).result, keys, _copied_seal)
    # SQLite: no transaction here, it would take the database's write lock.
    rows = AuditEvent.objects.order_by("seq").values_list(*VERIFY_COLUMNS)
    return _with_copies(_verify_rows(rows.iterator(chunk_size=VERIFY_CHUNK), keys=keys).result, keys, _copied_seal)


def _what_may_hide_rows() -> str:
    """What could make PostgreSQL show verify other rows than the portal's reads (or hold rows that its
    constraints and triggers do not guard): tables inheriting the audit table, row-level security or
    its policies, rules. "" when there is none."""
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT string_agg(inhrelid::regclass::text, ', ' ORDER BY 1) FROM pg_inherits"
            " WHERE inhparent = c.oid), c.relrowsecurity OR c.relforcerowsecurity"
            " OR EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = c.oid),"
            " EXISTS (SELECT 1 FROM pg_rewrite WHERE ev_class = c.oid)"
            " FROM pg_class c WHERE c.oid = %s::regclass", [table])
        children, row_security, rules = cursor.fetchone()
    found = [f"child tables ({children})" if children else "", "row-level security" if row_security else "",
             "rules" if rules else ""]
    return " and ".join(f for f in found if f)


def _before_start(seq: int) -> str:
    return f"event seq {seq}: before the chain's first event (seq 1): not an event the portal wrote"


def _with_copies(result: VerifyResult, keys: tuple[bytes, ...], copied, hash_of=None) -> VerifyResult:
    """The result, failed where an event carries another's seal (an event copied to a later place:
    its content, and so its seal, are the other's) before any other problem, and saying whether seals
    were read. `copied`: the first copy (or a function finding it); `hash_of`: an event's hash by seq."""
    if keys and (pair := copied() if callable(copied) else copied) and (
            result.ok or result.bad_seq is None or pair[1] < result.bad_seq):
        first, copy = pair  # the chain is intact up to the copy (the events before it verified)
        hash_of = hash_of or (lambda seq: AuditEvent.objects.filter(seq=seq).values_list("hash", flat=True).first())
        result = VerifyResult(False, copy - 1, copy - 1, hash_of(copy - 1) or GENESIS_HASH,
                              f"event seq {copy} carries the seal of event seq {first}: a copy of it, not "
                              "written by the portal", copy)
    return replace(result, seals_checked=bool(keys), seal_keys=len(keys))


def _copied_seal() -> tuple[int, int] | None:
    """The first event that carries the seal of an event before it, as (that event, the copy), or None.
    On PostgreSQL the unique constraint on seals, while it is in place and valid, answers at once: no
    copy can be there (one made while it was dropped keeps it from being built again)."""
    if connection.vendor == "postgresql" and _seals_unique_in_postgresql():
        return None
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT first, seq FROM (SELECT seq, min(seq) OVER (PARTITION BY seal) AS first FROM {table}"
                       " WHERE seal IS NOT NULL) s WHERE seq > first ORDER BY seq LIMIT 1")
        return cursor.fetchone()


def _seals_unique_in_postgresql() -> bool:
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = %s::regclass AND i.indisunique"
            " AND i.indisvalid AND i.indisready AND pg_get_indexdef(i.indexrelid) LIKE %s)",
            [table, "% USING btree (seal) WHERE (seal IS NOT NULL)"])
        return cursor.fetchone()[0]


def _copied_seal_in(events: list[AuditEvent]) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for event in sorted(events, key=lambda e: e.seq):
        if event.seal is not None:
            if event.seal in seen:
                return seen[event.seal], event.seq
            seen[event.seal] = event.seq
    return None


# Below this many events one process verifies (starting processes costs more than it saves).
VERIFY_PARALLEL_FROM = 200_000


def _verify_parallel(head_seq: int, workers: int, keys: tuple[bytes, ...]) -> VerifyResult:
    """The chain 1..head_seq in `workers` consecutive ranges, each verified by a process of its own with
    its own connection, from the `prev_hash` stored in the range's first event; then the ranges are
    joined in order: each range's first `prev_hash` must be the hash the range before ends on, no
    range may hold an unsealed event once a range before it held a sealed one, nor an event sealed by
    an older key than one a range before it used. The answer is the one a single pass gives: the first
    bad event, the events verified before it, and the head the chain is intact up to. Events appended
    while it runs are after head_seq and not read."""
    size = -(-head_seq // workers)
    ranges = [(lo, min(lo + size - 1, head_seq)) for lo in range(1, head_seq + 1, size)]
    connections.close_all()  # no connection crosses the fork; each process opens its own
    with multiprocessing.get_context("fork").Pool(len(ranges)) as pool:
        parts = pool.starmap(_verify_range, [(lo, hi, keys) for lo, hi in ranges])
    count, prev_hash, sealed_since, unsealed_until, newest, current_from = 0, GENESIS_HASH, None, 0, None, None
    for (lo, _hi), (first_prev, scan) in zip(ranges, parts, strict=True):
        result = scan.result
        if first_prev is not None and first_prev != prev_hash:
            return VerifyResult(False, count, lo - 1, prev_hash,
                                f"event seq {lo}: prev_hash does not match the hash of event {lo - 1}", lo)
        # what the ranges before make wrong in this one, before any failure of its own
        wrong = [(*scan.first_unsealed, _unsealed(scan.first_unsealed[0], sealed_since))
                 if sealed_since is not None and scan.first_unsealed is not None else None,
                 (*scan.first_below[newest[0]], _older_key(scan.first_below[newest[0]][0], newest[1]))
                 if newest is not None and scan.first_below[newest[0]] is not None else None]
        found = min((w for w in wrong if w is not None), default=None)
        if found and found[0] == result.bad_seq and scan.newest is not None and newest is not None \
                and scan.newest[0] > newest[0]:
            found = None  # the range's own newer key came first: its own answer names the right event
        if found:
            seq, before, problem = found
            return VerifyResult(False, count + seq - lo, seq - 1, before, problem, seq)
        if not result.ok:  # intact up to the range's last good event, or up to the range before
            head = (result.head_seq, result.head_hash) if result.count else (lo - 1, prev_hash)
            problem = result.problem
            if sealed_since is not None and scan.sealed_since is not None \
                    and problem == _unsealed(result.bad_seq, scan.sealed_since):
                problem = _unsealed(result.bad_seq, sealed_since)  # the first sealed event of the chain
            return VerifyResult(False, count + result.count, *head, problem, result.bad_seq)
        count, prev_hash = count + result.count, result.head_hash
        sealed_since = sealed_since if sealed_since is not None else result.first_sealed
        unsealed_until = max(unsealed_until, result.unsealed_until)
        if scan.newest is not None and (newest is None or scan.newest[0] > newest[0]):
            newest = scan.newest
        current_from = current_from if current_from is not None else result.current_from
    return VerifyResult(True, count, head_seq, prev_hash, unsealed_until=unsealed_until, first_sealed=sealed_since,
                        current_from=current_from)


def _verify_range(lo: int, hi: int, keys: tuple[bytes, ...]) -> tuple[str | None, _Scan]:
    """In a worker process: the stored prev_hash of event `lo` (None if it is missing) and the range
    verified from it."""
    try:
        first_prev = AuditEvent.objects.filter(seq=lo).values_list("prev_hash", flat=True).first()
        with transaction.atomic(), closing(_postgresql_rows(lo, hi)) as rows:
            return first_prev, _verify_rows(rows, from_text=True, start_seq=lo, prev_hash=first_prev or GENESIS_HASH,
                                            keys=keys)
    finally:
        connections.close_all()


def _postgresql_rows(lo: int | None = None, hi: int | None = None) -> Iterator[tuple]:
    """The chain's rows in seq order (those from `lo` to `hi`), from a server-side cursor read by a
    second thread: while this thread hashes one chunk, that one waits for the next (at most two
    chunks are held)."""
    connection.ensure_connection()
    raw = connection.connection
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    chunks: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    columns = ", ".join(postgresql_iso(c) if c == "created_at" else c for c in VERIFY_COLUMNS)

    def fetch() -> None:
        try:
            with raw.cursor(name="audit_chain_verify") as cursor:
                cursor.adapters.register_loader("jsonb", TextLoader)  # decoded by the reading thread
                if lo is None:
                    cursor.execute(f"SELECT {columns} FROM {table} ORDER BY seq")
                else:
                    cursor.execute(f"SELECT {columns} FROM {table} WHERE seq BETWEEN %s AND %s ORDER BY seq", [lo, hi])
                while rows := cursor.fetchmany(VERIFY_CHUNK):
                    if not put(rows):
                        return
            put(None)
        except BaseException as exc:  # handed to the reading thread, which raises it
            put(exc)

    fetcher = threading.Thread(target=fetch, name="audit-verify-fetch", daemon=True)
    fetcher.start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield from item
    finally:
        stop.set()
        fetcher.join()


@dataclass(frozen=True)
class _Scan:
    """A pass over consecutive events: its result, and for joining ranges what a range before could
    make wrong in it: its first event without a seal (its seq and the hash before it) if no sealed
    event came before it in the pass, and for each key k the first event sealed by a key older than k
    (likewise); its first sealed event, and its newest key with the first event that key sealed."""

    result: VerifyResult
    first_unsealed: tuple[int, str] | None = None
    sealed_since: int | None = None  # the first sealed event of the pass
    first_below: tuple[tuple[int, str] | None, ...] = ()
    newest: tuple[int, int] | None = None  # (the newest key's index, the first event it sealed)


def _unsealed(seq: int, sealed_since: int) -> str:
    return (f"event seq {seq} has no seal, though event seq {sealed_since} before it has one: it was not written "
            "by the portal (which writes nothing without its key once the chain is sealed)")


def _older_key(seq: int, newer_at: int) -> str:
    return (f"event seq {seq} is sealed by an older key than event seq {newer_at} before it: it was not written by "
            "the portal, which seals with its current key only (or the retired seal keys are not listed oldest "
            "first)")


def _verify_rows(rows: Iterable[tuple], *, from_text: bool = False, start_seq: int = 1,
                 prev_hash: str = GENESIS_HASH, keys: tuple[bytes, ...] = ()) -> _Scan:
    """`from_text`: the rows hold created_at as iso text already and data as JSON text. The rows start
    at `start_seq`, linked to `prev_hash` (a range of the chain). With seal `keys` (oldest first), each
    seal must hold, once an event is sealed every later one must be, and by the same key or a newer
    one (read here, event by event: nothing the database could be made to answer otherwise, an index
    or an aggregate, decides it)."""
    expected_seq, count = start_seq, 0
    sealed_since, unsealed_until, first_unsealed = None, 0, None
    newest, newest_at, current_from, first_below = -1, 0, None, [None] * len(keys)
    sha256, loads, holds = hashlib.sha256, json.loads, seal.checker(keys) if keys else None

    def stop(problem: str, bad_seq: int) -> _Scan:  # intact up to the event before `expected_seq`
        return _Scan(VerifyResult(False, count, expected_seq - 1, prev_hash, problem, bad_seq), first_unsealed,
                     sealed_since, tuple(first_below), (newest, newest_at) if newest >= 0 else None)
    for (seq, created_at, actor_id, actor_username, actor_email, via, action, object_type, object_id, object_repr,
         code, data, stored_text, stored_prev, stored_hash, stored_seal) in rows:
        if seq != expected_seq:
            return stop(_before_start(seq) if seq < 1 else f"event seq {seq}: expected seq {expected_seq} "
                        + ("(an event is missing)" if seq > expected_seq else "(one seq twice)"), seq)
        if stored_prev != prev_hash:
            return stop(f"event seq {seq}: prev_hash does not match the hash of event {seq - 1}", seq)
        if from_text:
            data = loads(data)
        else:
            created_at = iso(created_at)
        text = canonical_text(seq, created_at, actor_id, actor_username, actor_email, via, action, object_type,
                              object_id, object_repr, code, data)
        if text != stored_text or sha256(f"{prev_hash}\n{text}".encode()).hexdigest() != stored_hash:
            return stop(f"event seq {seq}: content does not match its hash (changed after it was written)", seq)
        if holds is not None:
            if stored_seal is None:
                if sealed_since is not None:
                    return stop(_unsealed(seq, sealed_since), seq)
                unsealed_until, first_unsealed = seq, first_unsealed or (seq, prev_hash)
            elif (index := holds(stored_seal, text, seq)) is None:
                return stop(f"event seq {seq}: its seal does not hold: it was not written by the portal (or the key "
                            "is not one the portal seals with)", seq)
            elif index != newest:
                for k in range(index + 1, len(keys)):  # for the join: a range before may have used key k
                    first_below[k] = first_below[k] or (seq, prev_hash)
                if index < newest:
                    return stop(_older_key(seq, newest_at), seq)
                newest, newest_at, sealed_since = index, seq, sealed_since or seq
                if index == len(keys) - 1:
                    current_from = seq
        prev_hash, expected_seq, count = stored_hash, expected_seq + 1, count + 1
    return _Scan(VerifyResult(True, count, expected_seq - 1, prev_hash, unsealed_until=unsealed_until,
                              first_sealed=sealed_since, current_from=current_from), first_unsealed, sealed_since,
                 tuple(first_below), (newest, newest_at) if newest >= 0 else None)
