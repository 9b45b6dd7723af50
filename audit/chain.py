"""The hash chain: canonical serialization, append and verify."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from django.db import connection, transaction
from django.utils import timezone

from audit.actors import Actor
from audit.models import AuditEvent
from core.times import iso

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the advisory lock that serializes appends on PostgreSQL.
CHAIN_LOCK_KEY = 7_341_120_001


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


def canonical(event: AuditEvent) -> str:
    """The exact text that is hashed: sorted keys, no whitespace, UTF-8, times in UTC."""
    body = {
        "seq": event.seq,
        "created_at": iso(event.created_at),
        "actor_id": event.actor_id,
        "actor_username": event.actor_username,
        "actor_email": event.actor_email,
        "via": event.via,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "code": event.code,
        "data": event.data,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link_hash(prev_hash: str, canonical_text: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{canonical_text}".encode()).hexdigest()


def _lock_chain() -> None:
    """Serialize appends. PostgreSQL: a transaction-scoped advisory lock held until commit.
    SQLite: the settings open every transaction with BEGIN IMMEDIATE, so the writer holds the
    database write lock already."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])


def head() -> AuditEvent | None:
    return AuditEvent.objects.order_by("-seq").first()


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
    """Append one event to the chain in the caller's transaction."""
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
        object_repr = object_repr or str(obj)
    user = actor.user
    if actor.is_ci:
        username, email, actor_id = actor.label, "", None
    elif user is not None:
        username, email, actor_id = user.get_username(), user.email or "", user.pk
    else:
        username, email, actor_id = "system", "", None
    payload = _plain(dict(data or {}))
    if actor.token_id is not None:
        payload.setdefault("token_id", actor.token_id)
    if actor.remote_addr:
        payload.setdefault("remote_addr", actor.remote_addr)
    with transaction.atomic():
        _lock_chain()
        last = head()
        event = AuditEvent(
            seq=(last.seq + 1) if last else 1,
            created_at=timezone.now(),
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
            prev_hash=last.hash if last else GENESIS_HASH,
        )
        # Hash what the database will give back: JSON round trip of data.
        event.data = json.loads(json.dumps(event.data))
        event.canonical = canonical(event)
        event.hash = link_hash(event.prev_hash, event.canonical)
        event.save(force_insert=True)
    return event


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head_seq: int
    head_hash: str
    problem: str = ""
    bad_seq: int | None = None


def verify(events: Iterator[AuditEvent] | None = None) -> VerifyResult:
    """Recompute the whole chain; report the first event whose link or content does not match."""
    if events is None:
        events = AuditEvent.objects.order_by("seq").iterator(chunk_size=2000)
    prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
    for event in events:
        if event.seq != expected_seq:
            return VerifyResult(
                False, count, expected_seq - 1, prev_hash,
                f"event seq {event.seq}: expected seq {expected_seq} (an event is missing)", event.seq,
            )
        if event.prev_hash != prev_hash:
            return VerifyResult(
                False, count, event.seq - 1, prev_hash,
                f"event seq {event.seq}: prev_hash does not match the hash of event {event.seq - 1}",
                event.seq,
            )
        text = canonical(event)
        if text != event.canonical or link_hash(prev_hash, text) != event.hash:
            return VerifyResult(
                False, count, event.seq - 1, prev_hash,
                f"event seq {event.seq}: content does not match its hash (changed after it was written)",
                event.seq,
            )
        prev_hash, expected_seq, count = event.hash, expected_seq + 1, count + 1
    return VerifyResult(True, count, expected_seq - 1, prev_hash)
