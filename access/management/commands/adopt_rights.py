from django.core.management.base import BaseCommand, CommandError

from audit.actors import Actor
from evidence.reconcile import adopt_rights


class Command(BaseCommand):
    help = (
        "Record on the audit chain the accounts' rights the tables hold and no event gave: superuser and staff "
        "flags, model permissions, memberships of groups holding them (an administrator made with createsuperuser, "
        "rights given before the portal audited them or outside it). Each becomes an audit event with the reason; "
        "the exceptions report of that period lists it (RIGHT_MADE_OUTSIDE_PORTAL). --dry-run lists them only."
    )

    def add_arguments(self, parser):
        parser.add_argument("--reason", required=True, help="Why these rights are adopted (kept in each event).")
        parser.add_argument("--dry-run", action="store_true", help="List what would be adopted; record nothing.")

    def handle(self, *args, reason: str, dry_run: bool, **options):
        try:
            found = adopt_rights(actor=Actor.command(), reason=reason, dry_run=dry_run)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        for mismatch in found:
            self.stdout.write(("would adopt: " if dry_run else "adopted: ") + mismatch.sentence())
        self.stderr.write(f"{len(found)} right{'s' if len(found) != 1 else ''} "
                          + ("to adopt (nothing recorded)." if dry_run else "adopted."))
