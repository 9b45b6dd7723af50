import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from audit import chain
from evidence.checkpoint import CheckpointError, check


class Command(BaseCommand):
    help = (
        "Recompute the audit hash chain. Prints 'OK <count> <head hash>' or names the first bad event (exit 1). "
        "With --checkpoint FILE it also proves the chain still holds a signed checkpoint (not rewritten before it, "
        "not cut short after it). With the seal key (PORTAL_AUDIT_SEAL_KEY or PORTAL_AUDIT_SEAL_KEY_FILE, and the "
        "keys it replaced in PORTAL_AUDIT_RETIRED_SEAL_KEYS_FILE) it also proves that every event since sealing "
        "began was written by the portal."
    )

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", dest="checkpoint_file", help="A checkpoint written by audit_checkpoint.")

    def handle(self, *args, checkpoint_file=None, **options):
        saved = None
        if checkpoint_file:
            try:
                saved = json.loads(Path(checkpoint_file).read_text())
            except (OSError, ValueError) as exc:
                raise CommandError(f"Cannot read checkpoint {checkpoint_file}: {exc}") from None
        result = chain.verify()
        if not result.ok:
            self.stderr.write(f"FAILED at seq {result.bad_seq}: {result.problem}")
            self.stderr.write(f"The chain is intact up to seq {result.head_seq} ({result.head_hash}).")
            raise SystemExit(1)
        if saved is not None:
            try:
                problem = check(saved, result)
            except CheckpointError as exc:
                raise CommandError(str(exc)) from None
            if problem:
                self.stderr.write(f"FAILED against checkpoint {checkpoint_file}: {problem}")
                raise SystemExit(1)
        self.stdout.write(f"OK {result.count} {result.head_hash}")
        self.stderr.write(_seals_said(result))  # on stderr: stdout stays the one line scripts read
        if saved is not None:
            self.stderr.write(f"The chain holds checkpoint {checkpoint_file} (seq {saved.get('seq')}) unchanged.")


def _seals_said(result: chain.VerifyResult) -> str:
    if not result.seals_checked:
        return ("Seals not checked: no seal key (PORTAL_AUDIT_SEAL_KEY or PORTAL_AUDIT_SEAL_KEY_FILE), so an event "
                "appended by whoever can write the database is not told from the portal's own.")
    if result.first_sealed is None:
        return ("No event is sealed: the portal has written none with its seal key (if it has, the seals were "
                "removed: a checkpoint taken since says where sealing began).")
    keys = "the portal's key" if result.seal_keys == 1 else f"the portal's keys ({result.seal_keys}, oldest first)"
    if result.unsealed_until:
        before = "event 1 was" if result.unsealed_until == 1 else f"events 1 to {result.unsealed_until} were"
        said = f"Events {result.first_sealed} to {result.head_seq} are sealed by {keys}; {before} written before " \
               "sealing began."
    else:
        said = f"Every event (1 to {result.head_seq}) is sealed by {keys}."
    if result.seal_keys > 1:
        said += (" None is sealed by the current key yet." if result.current_from is None
                 else f" The current key seals from event {result.current_from} on.")
    return said
