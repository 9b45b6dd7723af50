from django.core.management.base import BaseCommand

from audit import chain


class Command(BaseCommand):
    help = "Recompute the audit hash chain. Prints 'OK <count> <head hash>' or names the first bad event (exit 1)."

    def handle(self, *args, **options):
        result = chain.verify()
        if result.ok:
            self.stdout.write(f"OK {result.count} {result.head_hash}")
            return
        self.stderr.write(f"FAILED at seq {result.bad_seq}: {result.problem}")
        self.stderr.write(f"The chain is intact up to seq {result.head_seq} ({result.head_hash}).")
        raise SystemExit(1)
