from django.core.management.base import BaseCommand

from environments import deploy, services


class Command(BaseCommand):
    help = (
        "End `interrupted` every running deployment whose deploy job stopped (stale heartbeat) and kill the "
        "playbook it left behind, then start the front of every idle environment's queue. Run on worker start; "
        "the worker also runs it every minute."
    )

    def add_arguments(self, parser):
        parser.add_argument("--stale-after", type=float, default=None,
                            help="Seconds without a heartbeat (default: PORTAL_DEPLOY_STALE_SECONDS).")

    def handle(self, *args, stale_after=None, **options):
        reaped = deploy.reap_stale(stale_after=stale_after)
        self.stdout.write(f"{len(reaped)} deployment(s) interrupted" + (f": {reaped}" if reaped else ""))
        started = [d.pk for d in services.deployment_dispatch_idle()]
        self.stdout.write(f"{len(started)} waiting deployment(s) started" + (f": {started}" if started else ""))
