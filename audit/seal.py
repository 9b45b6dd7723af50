"""Seals: which events the portal itself wrote.

Whoever can write the database can append an event that the chain takes as any other (its hash
is computed from what is already there): a right given by SQL could be made to look given through
the portal. So the portal seals each event it appends with a key the database never holds
(settings.PORTAL_AUDIT_SEAL_KEY, from PORTAL_AUDIT_SEAL_KEY or PORTAL_AUDIT_SEAL_KEY_FILE):

    seal = nonce ":" HMAC-SHA256(key, nonce "\\n" text)

where `nonce` is 16 random hex digits and `text` is the event's canonical text with its position
left out (its `seq` written as 0): the seal is made before the chain's lock is taken, when the
position is not known yet. The chain fixes each event's position; the seal says who wrote it.
`verify_audit` with the key then refuses an event without a valid seal after the first sealed one.
A seal is unique (the database refuses a second event with the seal of another: an old event copied
to the head); verify checks that this constraint is in place, and without it looks for such copies.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

_NONCE_BYTES = 8


def seal(text_at_zero: str, key: bytes) -> str:
    """A new seal of an event whose canonical text, at position 0, is `text_at_zero`."""
    nonce = secrets.token_hex(_NONCE_BYTES)
    return f"{nonce}:{_mac(key, nonce, text_at_zero)}"


def holds(value: str, text_at_zero: str, key: bytes) -> bool:
    """Whether `value` is a seal of the text (at position 0) by the key."""
    return checker(key)(value, text_at_zero, 0)


def checker(key: bytes):
    """A function telling whether a seal holds for the canonical text of event `seq`: what verify asks
    a million times, with the key's HMAC state made once. A seal not written as the portal writes one
    (16 + 1 + 64 characters) does not hold; the MACs are compared as bytes, whatever they hold."""
    copy, compare = _keyed(key).copy, hmac.compare_digest

    def check(value: str, text: str, seq: int) -> bool:
        parts = _around_seq(text, seq)
        if parts is None or len(value) != 2 * _NONCE_BYTES + 65 or value[2 * _NONCE_BYTES] != ":":
            return False
        mac = copy()
        mac.update(f'{value[:2 * _NONCE_BYTES]}\n{parts[0]}"seq":0,"via":{parts[1]}'.encode())
        return compare(mac.hexdigest().encode(), value[2 * _NONCE_BYTES + 1:].encode())

    return check


def _mac(key: bytes, nonce: str, text: str) -> str:
    mac = _keyed(key).copy()  # the key's HMAC state, computed once
    mac.update(f"{nonce}\n{text}".encode())
    return mac.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(key: bytes):
    return hmac.new(key, digestmod=hashlib.sha256)


def at_position_zero(text: str, seq: int) -> str:
    """An event's canonical text with its `seq` written as 0."""
    if (parts := _around_seq(text, seq)) is None:
        raise ValueError(f"not the canonical text of event {seq}")
    return f'{parts[0]}"seq":0,"via":{parts[1]}'


def _around_seq(text: str, seq: int) -> tuple[str, str] | None:
    """The canonical text before and after its top-level `"seq":N,"via":`, the last of its kind in the
    text: only `via`, a JSON string (whose quotes are escaped), follows it. None without it."""
    head, found, tail = text.rpartition(f'"seq":{seq},"via":')
    return (head, tail) if found else None


def says(value: str | None, canonical: str, seq: int, key: bytes | None) -> str:
    """What one event's seal says, for a person reading it (`verify_audit` reads the whole chain)."""
    if key is None:
        return "not checked: this portal has no seal key"
    if value is None:
        return "none: written without the seal key (before sealing began, or not by the portal)"
    if checker(key)(value, canonical, seq):
        return "holds: written by the portal (verify_audit also finds an event copied with its seal)"
    return "does not hold: not written by the portal with its key"
