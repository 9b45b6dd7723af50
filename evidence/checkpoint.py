"""Signed checkpoints of the chain head, kept outside the database.

Whoever can write the database can recompute the whole chain; a checkpoint signed with a key the
database does not hold lets `verify_audit --checkpoint` detect a chain rewritten before the
checkpoint or cut short after it. The key comes from PORTAL_CHECKPOINT_KEY or the file named by
PORTAL_CHECKPOINT_KEY_FILE.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from django.utils import timezone

from audit import chain
from audit.models import AuditEvent
from core.times import iso


class CheckpointError(Exception):
    pass


def checkpoint_key() -> bytes:
    if os.environ.get("PORTAL_CHECKPOINT_KEY"):
        return os.environ["PORTAL_CHECKPOINT_KEY"].encode()
    path = os.environ.get("PORTAL_CHECKPOINT_KEY_FILE")
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise CheckpointError(f"Cannot read the checkpoint key file {path}: {exc.strerror}.") from None
        if not key:  # an HMAC by an empty key is one anybody can make
            raise CheckpointError(f"The checkpoint key file {path} is empty.")
        return key
    raise CheckpointError("No checkpoint key: set PORTAL_CHECKPOINT_KEY or PORTAL_CHECKPOINT_KEY_FILE.")


_UNSAID = object()  # a checkpoint from before seals says nothing of them


def _signed_text(seq: int, head_hash: str, created_at: str, sealed_from) -> bytes:
    signed = {"seq": seq, "hash": head_hash, "created_at": created_at}
    if sealed_from is not _UNSAID:
        signed["sealed_from"] = sealed_from
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def sign(seq: int, head_hash: str, created_at: str, key: bytes, sealed_from=_UNSAID) -> str:
    return hmac.new(key, _signed_text(seq, head_hash, created_at, sealed_from), hashlib.sha256).hexdigest()


def make() -> dict:
    key = checkpoint_key()
    head = chain.head()
    seq, head_hash = (head.seq, head.hash) if head else (0, chain.GENESIS_HASH)
    # Where sealing began: the database says it today, the checkpoint keeps it (seals removed later
    # from events before the head would otherwise make them look older than sealing).
    sealed_from = (AuditEvent.objects.filter(seal__isnull=False, seq__lte=seq).order_by("seq")
                   .values_list("seq", flat=True).first())
    created_at = iso(timezone.now())
    return {"seq": seq, "hash": head_hash, "created_at": created_at, "sealed_from": sealed_from,
            "hmac": sign(seq, head_hash, created_at, key, sealed_from)}


def check(cp: dict, verified: chain.VerifyResult) -> str | None:
    """None when the database's chain, as `verified` (the chain verified just before), holds the
    checkpoint; otherwise what is wrong."""
    try:
        seq, head_hash, created_at, mac = int(cp["seq"]), str(cp["hash"]), str(cp["created_at"]), str(cp["hmac"])
        sealed_from = cp.get("sealed_from", _UNSAID)
        if sealed_from is not _UNSAID and sealed_from is not None:
            sealed_from = int(sealed_from)
    except (KeyError, TypeError, ValueError):
        return "the checkpoint file is not a checkpoint (needs seq, hash, created_at, hmac)"
    if not hmac.compare_digest(sign(seq, head_hash, created_at, checkpoint_key(), sealed_from), str(mac)):
        return "the checkpoint's signature does not match: wrong key, or the checkpoint was altered"
    if verified.seals_checked and sealed_from not in (_UNSAID, None) and verified.first_sealed != sealed_from:
        return (f"the checkpoint of {created_at} says events are sealed from seq {sealed_from} on, but the chain's "
                f"first sealed event is now {verified.first_sealed or 'none'}: seals were removed since")
    if seq == 0:
        return None
    event = AuditEvent.objects.filter(seq=seq).first()
    if event is None:
        last = chain.head()
        return (f"the chain was cut short: it ends at seq {last.seq if last else 0}, "
                f"but the checkpoint of {created_at} names seq {seq} (a database restored from a backup "
                "older than the checkpoint ends so too: check it against a checkpoint taken before the backup)")
    if event.hash != head_hash:
        return f"event seq {seq} does not match the checkpoint of {created_at}: the chain was rewritten up to there"
    return None
