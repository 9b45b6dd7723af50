"""What someone who can write the database (not the portal, and without its seal key) can do to the
audit chain: the tests of seals and of the auditors' script do it."""

import datetime as dt
import secrets

from django.db import connection

from audit import chain, seal, triggers
from audit.models import AuditEvent


def forge(*, action="environment.grant", data=None, seal_value=None, like: AuditEvent | None = None,
          sealed_with: bytes | None = None, key_named: bool = True) -> AuditEvent:
    """What a database writer can do without the portal: compute the next event as the chain does and
    INSERT it (an INSERT is allowed: the table is append-only, not closed). `like`: copy that event's
    content and seal to the head. `sealed_with`: a key the writer holds (a retired one), to seal the
    event as the portal would (`key_named=False`: as seals were written before they named their key)."""
    head = AuditEvent.objects.order_by("-seq").first()
    source = like or AuditEvent(created_at=dt.datetime.now(dt.UTC), actor_username="dave", via="admin",
                                action=action, object_type="environments.environment", object_id="1",
                                data=data or {"user": "mallory", "permission": "deploy"}, seal=seal_value)
    event = AuditEvent(seq=head.seq + 1 if head else 1, prev_hash=head.hash if head else chain.GENESIS_HASH, **{
        f: getattr(source, f) for f in ("created_at", "actor_id", "actor_username", "actor_email", "via", "action",
                                        "object_type", "object_id", "object_repr", "code", "data", "seal")})
    event.canonical = chain.canonical(event)
    event.hash = chain.link_hash(event.prev_hash, event.canonical)
    if sealed_with is not None:
        at_zero = seal.at_position_zero(event.canonical, event.seq)
        nonce = secrets.token_hex(8)
        event.seal = seal.seal(at_zero, sealed_with) if key_named else \
            f"{nonce}:{seal._mac(sealed_with, nonce, at_zero)}"
    event.save(force_insert=True)
    return event


def strip_seals():
    """What the table's owner can do: turn the append-only triggers off and clear every seal (the
    seals are not hashed, so the chain still links)."""
    triggers.drop(connection, "audit_auditevent")
    try:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE audit_auditevent SET seal = NULL")
    finally:
        triggers.install(connection, "audit_auditevent")


def drop_unique_seals():
    """Drop the unique constraint on seals (and, on SQLite, rebuild the guard against replacing inserts,
    which refuses a second row of any unique key the table has)."""
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX auditevent_seal_unique")
    triggers.install(connection, "audit_auditevent")
