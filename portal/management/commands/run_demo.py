"""Everything `make run` does after installing, in one process (each step is idempotent, so a second
start takes seconds): migrate, collect the static files, load the demo, start the demo cluster when
haproxy is installed, keep a CI token for MAC in var/demo-ci-token (a new one only when the kept one
is no longer valid), end the deployments a stopped worker left running, print where to log in, and
serve (see `serve`)."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connections

from environments.cluster import haproxy_available


def _shown(path: Path) -> Path:
    return path.relative_to(settings.BASE_DIR) if path.is_relative_to(settings.BASE_DIR) else path


class Command(BaseCommand):
    help = "Prepare the demo (migrate, static files, demo data, cluster, CI token) and serve it."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT of the web server.")
        parser.add_argument("--cluster-port", type=int, default=None,
                            help="HAProxy front port of the demo cluster; its apps use the next three (default: "
                                 "the running cluster's, else 18080).")

    def handle(self, *args, bind, cluster_port, **options):
        try:
            self._prepare(bind, cluster_port)
        except KeyboardInterrupt:
            self.stderr.write("Interrupted before the portal started.")
            raise SystemExit(130) from None
        connections.close_all()
        call_command("serve", "--bind", bind)

    def _prepare(self, bind: str, cluster_port: int | None) -> None:
        call_command("migrate", interactive=False, verbosity=1, stdout=self.stdout)
        call_command("collectstatic", interactive=False, verbosity=0)
        call_command("demo_data", stdout=self.stdout)
        if haproxy_available():
            port = ["--port", str(cluster_port)] if cluster_port else []
            call_command("cluster", "start", "--bind", *port, stdout=self.stdout)
        else:
            self.stdout.write("haproxy is not installed: Production uses the demo playbook.\n"
                              "For the rolling-upgrade cluster: apt-get install haproxy, then make run again.")
        token_file = Path(settings.VAR_DIR) / "demo-ci-token"
        call_command("create_token", "--ci", "--application", "MAC", "--name", "demo-ci",
                     "--reuse-file", str(token_file), stdout=StringIO())
        call_command("reap_deployments", stdout=self.stdout)
        token = token_file.read_text().strip().splitlines()[-1]
        self.stdout.write(
            f"\n  Release Portal: http://{bind}/admin/\n"
            "  Logins (password = user name): alice (developer), bob and carol (releasers), dave (auditor),\n"
            "  admin and otto (administrators: a weaker control one proposes, the other approves)\n"
            f"  API docs: http://{bind}/api/v1/docs\n"
            f"  CI token for MAC (kept in {_shown(token_file)}): {token}\n"
            "  Ctrl-C stops the web server and the worker (the demo cluster keeps running: make cluster-stop).\n"
        )
