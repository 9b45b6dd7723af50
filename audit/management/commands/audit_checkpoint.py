import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from audit import chain
from audit.actors import Actor
from evidence import checkpoint


class Command(BaseCommand):
    help = (
        "Sign the audit chain head with the HMAC key kept outside the database (PORTAL_CHECKPOINT_KEY or "
        "PORTAL_CHECKPOINT_KEY_FILE), save it (-o, default var/checkpoints/) and print it. Keep checkpoints "
        "somewhere the database's writers cannot change."
    )

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", help="Checkpoint file to write: a new file in a folder that exists "
                                                   "(a checkpoint is never overwritten).")

    def handle(self, *args, output=None, **options):
        try:
            cp = checkpoint.make()
        except checkpoint.CheckpointError as exc:
            raise CommandError(str(exc)) from None
        if output:
            path = Path(output)
            if not path.parent.is_dir():
                raise CommandError(f"No folder {path.parent}: create it first (checkpoints belong somewhere the "
                                   "database's writers cannot change).")
        else:
            path = Path(settings.VAR_DIR) / "checkpoints" / f"checkpoint-{cp['seq']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(cp, indent=2, sort_keys=True) + "\n"
        try:
            with path.open("x") as file:  # never over an earlier checkpoint: it is evidence too
                file.write(text)
        except FileExistsError:
            raise CommandError(f"{path} exists already: a checkpoint is never overwritten; name another file "
                               "(e.g. with the date and time).") from None
        chain.append(actor=Actor.command(), action="evidence.checkpoint", object_type="audit.chain",
                     object_id=str(cp["seq"]), data={"seq": cp["seq"], "hash": cp["hash"], "file": str(path)})
        self.stderr.write(f"Checkpoint of seq {cp['seq']} written to {path}")
        self.stdout.write(text, ending="")
