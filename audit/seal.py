"""Seals: which events the portal itself wrote.

Whoever can write the database can append an event that the chain takes as any other (its hash
is computed from what is already there): a right given by SQL could be made to look given through
the portal. So the portal seals each event it appends with a key the database never holds
(settings.PORTAL_AUDIT_SEAL_KEY, from PORTAL_AUDIT_SEAL_KEY or PORTAL_AUDIT_SEAL_KEY_FILE):

    seal = kid "." nonce ":" HMAC-SHA256(key, kid "." nonce "\\n" text)

where `kid` names the key (8 hex digits of an HMAC by the key of a constant: it tells nothing of the
key), `nonce` is 16 random hex digits and `text` is the event's canonical text with its position left
out (its `seq` written as 0): the seal is made before the chain's lock is taken, when the position is
not known yet. The chain fixes each event's position; the seal says who wrote it. `verify_audit` with
the key then refuses an event without a valid seal after the first sealed one. A seal is unique (the
database refuses a second event with the seal of another: an old event copied to the head); verify
checks that this constraint is in place, and without it looks for such copies.

The key can be changed (a key that may have leaked must be): the keys it replaced stay listed, oldest
first (settings.PORTAL_AUDIT_RETIRED_SEAL_KEYS), so that the events they sealed still verify, and an
event sealed by an older key than an event before it is refused: once the new key has sealed an event,
whoever holds a retired key cannot append with it (the procedure in docs/operating.md has the new key
seal one at once). Seals written before seals named their key (`nonce ":" mac`, no `kid`) are the
oldest key's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from django.conf import settings

_NONCE_BYTES = 8
_KID = 8  # hex digits naming the key
_UNNAMED = 2 * _NONCE_BYTES + 65  # "nonce:mac", written before seals named their key
_NAMED = _KID + 1 + _UNNAMED  # "kid.nonce:mac"


@functools.lru_cache(maxsize=16)
def key_id(key: bytes) -> str:
    """The name a seal gives its key."""
    return hmac.new(key, b"portal audit seal key id", hashlib.sha256).hexdigest()[:_KID]


def may_be_by(value: str, key: bytes) -> bool:
    """Whether a seal may be the key's, by its name alone (a seal written before seals named their key
    may be any key's)."""
    return len(value) != _NAMED or value[:_KID] == key_id(key)


def sealing_with_demo_key() -> bool:
    """Whether this process seals with the demo's public key (PORTAL_DEMO or PORTAL_DEBUG without a key)."""
    return settings.PORTAL_AUDIT_SEAL_KEY == getattr(settings, "DEMO_SEAL_KEY", None)


def keys() -> tuple[bytes, ...]:
    """The keys that seals may hold for, oldest first: the retired ones, then the current one (the one
    the portal seals with). Empty without a seal key."""
    current = settings.PORTAL_AUDIT_SEAL_KEY
    retired = tuple(dict.fromkeys(k for k in getattr(settings, "PORTAL_AUDIT_RETIRED_SEAL_KEYS", ()) if k != current))
    return retired if current is None else (*retired, current)


def seal(text_at_zero: str, key: bytes) -> str:
    """A new seal of an event whose canonical text, at position 0, is `text_at_zero`."""
    nonce = f"{key_id(key)}.{secrets.token_hex(_NONCE_BYTES)}"
    return f"{nonce}:{_mac(key, nonce, text_at_zero)}"


def holds(value: str, text_at_zero: str, key: bytes) -> bool:
    """Whether `value` is a seal of the text (at position 0) by the key."""
    return checker((key,))(value, text_at_zero, 0) is not None


def checker(keys: tuple[bytes, ...] | bytes):
    """A function telling which of `keys` (oldest first) a seal of the canonical text of event `seq`
    holds for: its index in `keys`, or None if it holds for none. What verify asks a million times,
    with each key's HMAC state made once. A seal not written as the portal writes one does not hold;
    one without a key's name is the oldest key's; the MACs are compared as bytes, whatever they hold."""
    keys = (keys,) if isinstance(keys, bytes) else tuple(keys)
    states = {key_id(key): (index, _keyed(key).copy) for index, key in enumerate(keys)}
    oldest = (0, _keyed(keys[0]).copy) if keys else None
    compare = hmac.compare_digest

    def check(value: str, text: str, seq: int) -> int | None:
        parts = _around_seq(text, seq)
        if parts is None:
            return None
        if len(value) == _NAMED and value[_KID] == "." and value[_NAMED - 65] == ":":
            found, cut = states.get(value[:_KID]), _NAMED - 65
        elif len(value) == _UNNAMED and value[_UNNAMED - 65] == ":":
            found, cut = oldest, _UNNAMED - 65
        else:
            return None
        if found is None:
            return None
        index, copy = found
        mac = copy()
        mac.update(f'{value[:cut]}\n{parts[0]}"seq":0,"via":{parts[1]}'.encode())
        return index if compare(mac.hexdigest().encode(), value[cut + 1:].encode()) else None

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


def says(value: str | None, canonical: str, seq: int, keys: tuple[bytes, ...]) -> str:
    """What one event's seal says, for a person reading it (`verify_audit` reads the whole chain)."""
    if not keys:
        return "not checked: this portal has no seal key"
    if value is None:
        return "none: written without the seal key (before sealing began, or not by the portal)"
    index = checker(keys)(value, canonical, seq)
    if index is None:
        return "does not hold: not written by the portal with its key"
    if index == len(keys) - 1 and settings.PORTAL_AUDIT_SEAL_KEY is not None:
        return ("holds: written by the portal with its current key (verify_audit also checks that no other "
                "event carries the same seal)")
    return (f"holds for a retired key (key {index + 1} of {len(keys)}, oldest first): written by the portal, "
            "unless an event before it is sealed by a newer key (verify_audit checks that, and that no other event "
            "carries the same seal)")

