"""Run the web server (gunicorn) and the deploy worker (django-q2) together: what `make run` serves.

Each child runs in a process group of its own, so a terminal's Ctrl-C reaches this command only, and
this command signals each child exactly once and waits for it. qcluster handles SIGINT itself (a
second signal floods its log with RecursionError; a SIGTERM to its whole group kills its sentinel
without a clean stop), gunicorn stops gracefully on SIGTERM. A child still running after the grace
period is killed with its group (the worker lets a running deployment finish until then); a second
Ctrl-C kills them at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Child:
    def __init__(self, name: str, argv: list[str], stop_signal: signal.Signals):
        self.name, self.stop_signal = name, stop_signal
        self.process = subprocess.Popen(argv, cwd=settings.BASE_DIR, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.running:
            self._signal(self.process.pid, self.stop_signal)

    def kill_group(self) -> None:
        """Kill whatever is left in the child's process group (the child itself, or processes it left)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Command(BaseCommand):
    help = "Run the web server (gunicorn) and the deploy worker (qcluster); Ctrl-C or SIGTERM stops both."
    requires_system_checks = []

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT of the web server.")
        parser.add_argument("--web-workers", type=int, default=2, help="gunicorn worker processes.")
        parser.add_argument("--grace", type=float, default=10.0,
                            help="Seconds each child has to stop before it is killed.")

    def handle(self, *args, bind, web_workers, grace, **options):
        self.signals: list[int] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        bin_dir = Path(sys.executable).parent
        children = [
            Child("worker", [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "qcluster"], signal.SIGINT),
            Child("web server", [
                # threaded workers: a browser's idle pre-opened connections do not hold a worker until it is
                # killed (a sync worker blocks on them, and the page then gets a 500)
                str(bin_dir / "gunicorn"), "portal.wsgi", "--bind", bind, "--workers", str(web_workers),
                "--worker-class", "gthread", "--threads", "4",
                "--graceful-timeout", str(max(1, int(grace) - 2)), "--access-logfile", "-", "--no-control-socket",
            ], signal.SIGTERM),
        ]
        while not self.signals and all(c.running for c in children):
            time.sleep(0.2)
        failed = [c for c in children if not c.running and not self.signals]
        for child in failed:
            self.stderr.write(f"The {child.name} exited (code {child.process.returncode}); stopping the others.")
        self._stop(children, grace)
        return_code = 1 if failed else 0
        if return_code:
            sys.exit(return_code)

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _stop(self, children: list[Child], grace: float) -> None:
        for child in children:
            child.stop()
        deadline = time.monotonic() + grace
        while any(c.running for c in children) and time.monotonic() < deadline and len(self.signals) < 2:
            time.sleep(0.1)
        for child in children:
            if child.running:
                self.stderr.write(f"The {child.name} did not stop in time: killed.")
                if child.name == "worker":
                    self.stderr.write("A deployment it was running ends `interrupted` when the worker starts again "
                                      f"on this machine and its heartbeat is {settings.PORTAL_DEPLOY_GONE_SECONDS} "
                                      "seconds old (reap_deployments), or on another one when it is "
                                      f"{settings.PORTAL_DEPLOY_STALE_SECONDS} seconds old.")
            child.kill_group()
            child.process.wait()
