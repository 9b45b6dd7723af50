from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from audit.actors import Actor
from environments.cluster import DEFAULT_PORT, Cluster, haproxy_available, running_port
from environments.models import Environment
from environments.services import environment_save


class Command(BaseCommand):
    help = (
        "start | stop | status of the demo cluster: three app instances on loopback behind HAProxy. "
        "`start --bind` also points the demo application's Production at the rolling-upgrade playbook."
    )

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["start", "stop", "status"])
        parser.add_argument("--dir", default=str(Path(settings.VAR_DIR) / "cluster"))
        parser.add_argument("--port", type=int, default=None,
                            help=f"HAProxy front port; apps use the next three (default: the running cluster's, "
                                 f"else {DEFAULT_PORT}).")
        parser.add_argument("--bind", action="store_true", help="Bind MAC Production to the cluster.")
        parser.add_argument("--application", default="MAC")

    def handle(self, *args, action, dir, port, bind, application, **options):
        running = running_port(Path(dir))
        if action == "start" and running is not None and port not in (None, running):
            raise CommandError(f"The demo cluster runs on port {running}; stop it first (make cluster-stop) to "
                               f"start it on {port}, or start it with port {running}.")
        cluster = Cluster(Path(dir), front_port=port or running or DEFAULT_PORT)
        if action == "stop":
            cluster.stop()
            self.stdout.write("Cluster stopped.")
            return
        if action == "start":
            if not haproxy_available():
                raise CommandError("haproxy is not installed; on Debian: apt-get install haproxy")
            cluster.start()
            for name in cluster.restored:
                self.stdout.write(f"{name} was left out of the load balancer (an interrupted rolling upgrade): "
                                  "put back.")
            if bind:
                self._bind(cluster, application)
        try:
            status = cluster.server_status()
        except OSError:  # no socket, or nobody listening on it
            raise CommandError(f"The demo cluster is not running (no HAProxy answers on {cluster.socket}); "
                               "`make cluster` starts it.") from None
        self.stdout.write(f"Cluster at {cluster.front_url} (HAProxy socket {cluster.socket}): "
                          + ", ".join(f"{k} {v}" for k, v in sorted(status.items())))
        down = sorted(name for name, state in status.items() if state != "UP")
        if down:
            self.stderr.write(f"Not serving: {', '.join(down)} (HAProxy's health check fails there, or it is "
                              "held out); a rolling upgrade stops at such a host. Its log: "
                              f"{cluster.directory / 'hosts' / down[0] / 'app.log'}")

    def _bind(self, cluster: Cluster, application: str):
        """The cluster stands for Production's hosts: only Production deploys to it (another environment
        bound to it by an earlier version of this command goes back to the demo playbook)."""
        actor = Actor.command()
        for environment in Environment.objects.filter(application__name=application):
            if environment.name == "Production":
                wanted = ("rolling_upgrade.yml", str(cluster.inventory))
            elif environment.inventory == str(cluster.inventory):
                wanted = ("deploy_demo.yml", "")
            else:
                continue
            if (environment.playbook, environment.inventory) != wanted:
                environment.playbook, environment.inventory = wanted
                environment_save(actor=actor, environment=environment, changed=["playbook", "inventory"])
            if environment.name == "Production":
                self.stdout.write(f"{environment} deploys with rolling_upgrade.yml to {cluster.inventory}")
