"""A real cluster for the demo and the tests: N app instances on loopback behind HAProxy.

HAProxy (Debian's package) balances them and exposes its runtime API on a Unix socket at
admin level, which the rolling-upgrade playbook uses (community.general.haproxy) to drain a
host, upgrade it, check it and put it back.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

APP_SCRIPT = Path(__file__).resolve().parent / "demo_app" / "cluster_app.py"
BACKEND = "app"

HAPROXY_CFG = """\
global
    stats socket {socket} mode 600 level admin
    pidfile {pidfile}
    log stdout format raw local0 err

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout

frontend portal_demo
    bind 127.0.0.1:{front_port}
    default_backend {backend}

backend {backend}
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    default-server inter 300ms fall 2 rise 2
{servers}
"""


def haproxy_available() -> bool:
    return shutil.which("haproxy") is not None


def _alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (an instance this process started is reaped here)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


DEFAULT_PORT = 18080


def running_port(directory: Path) -> int | None:
    """The front port of the demo cluster running from `directory` (its HAProxy alive), or None."""
    config = directory / "haproxy.cfg"
    if not _alive(directory / "haproxy.pid") or not config.exists():
        return None
    found = re.search(r"^\s*bind 127\.0\.0\.1:(\d+)\s*$", config.read_text(), flags=re.MULTILINE)
    return int(found.group(1)) if found else None


@dataclass
class Cluster:
    directory: Path
    front_port: int = DEFAULT_PORT
    size: int = 3
    initial_version: str = "0.0.0"
    restored: list[str] = field(default_factory=list)  # by the last start: see restore

    @property
    def socket(self) -> Path:
        return self.directory / "haproxy.sock"

    @property
    def inventory(self) -> Path:
        return self.directory / "inventory.ini"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}/"

    def hosts(self) -> list[tuple[str, int, Path]]:
        return [(f"web{i}", self.front_port + i, self.directory / "hosts" / f"web{i}") for i in range(1, self.size + 1)]

    def start(self) -> None:
        """Start (or leave running) the app instances and HAProxy; idempotent."""
        if not haproxy_available():
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy).")
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, port, root in self.hosts():
            release = root / "releases" / self.initial_version
            release.mkdir(parents=True, exist_ok=True)
            if not (root / "current").exists():
                (release / "VERSION").write_text(self.initial_version + "\n")
                (root / "current").symlink_to(release)
            if not _alive(root / "app.pid"):
                self.start_app(name, port, root)
        self._write_config()
        self.inventory.write_text(self._inventory_text())
        if not _alive(self.directory / "haproxy.pid"):
            subprocess.run(["haproxy", "-D", "-f", str(self.directory / "haproxy.cfg")], check=True, timeout=30)
        _wait_port(self.front_port)
        self.restored = self.restore()
        try:
            self.wait_all_up()
        except RuntimeError:
            pass  # a host whose health check fails stays out; the caller reads server_status and says so

    def restore(self) -> list[str]:
        """Put back into the load balancer the hosts a rolling upgrade left out (drained or in
        maintenance): a playbook killed with its worker does not get to put its host back. Their names."""
        left = sorted(name for name, status in self.server_status().items() if status.startswith(("MAINT", "DRAIN")))
        for name in left:
            self.admin(f"set server {BACKEND}/{name} state ready")
        return left

    @staticmethod
    def start_app(name: str, port: int, root: Path) -> None:
        log = open(root / "app.log", "ab")  # noqa: SIM115 - handed to the child
        subprocess.Popen(
            [sys.executable, str(APP_SCRIPT), "--port", str(port), "--root", str(root), "--name", name],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        _wait_port(port)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop HAProxy and the app instances, and wait until they are gone (their ports free again)."""
        pids = set()
        for pidfile in [self.directory / "haproxy.pid", *(root / "app.pid" for _, _, root in self.hosts())]:
            pid = _alive(pidfile)
            if pid:
                os.kill(pid, signal.SIGTERM)
                pids.add(pid)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if _running(pid)}
            time.sleep(0.05)

    def admin(self, command: str) -> str:
        """One command on HAProxy's runtime API."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self) -> dict[str, str]:
        """Server name -> HAProxy status (UP, DOWN, MAINT, DRAIN, ...)."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r.get("pxname") == BACKEND
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_all_up(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s == "UP" for s in self.server_status().values()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"HAProxy servers not all UP: {self.server_status()}")

    def _write_config(self) -> None:
        servers = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port, _ in self.hosts())
        (self.directory / "haproxy.cfg").write_text(HAPROXY_CFG.format(
            socket=self.socket, pidfile=self.directory / "haproxy.pid", front_port=self.front_port,
            backend=BACKEND, servers=servers,
        ))

    def _inventory_text(self) -> str:
        lines = ["[cluster]"]
        lines += [f"{name} app_port={port} app_dir={root}" for name, port, root in self.hosts()]
        lines += [
            "", "[cluster:vars]", "ansible_connection=local", f"ansible_python_interpreter={sys.executable}",
            f"haproxy_socket={self.socket}", f"haproxy_backend={BACKEND}", f"app_script={APP_SCRIPT}",
            f"app_python={sys.executable}", "",
        ]
        return "\n".join(lines)
