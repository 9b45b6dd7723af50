"""Helpers for tests that start the portal's own processes (web server, worker, `make run`) against the
test database, the way an operator starts them."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


def database_url() -> str:
    """The test database, as the processes under test read it from DATABASE_URL."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    return f"postgres://{s['USER']}{password}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


# A `make` started by a test would take these from the outer `make test-postgres DATABASE_URL=...`:
# a variable given on make's command line overrides the environment, so `make run` would serve (and
# migrate) the database named there instead of the test database.
OUTER_MAKE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")


def portal_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a portal process on the test database; its files live under `var_dir`."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in OUTER_MAKE},
        "DATABASE_URL": database_url(), "SECRET_KEY": settings.SECRET_KEY,
        "DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(var_dir), "PORTAL_WORKERS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.update(extra)
    return env


def production_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a portal of its own with the production settings: none of the test run's
    PORTAL_* or DATABASE_URL (so its own SQLite database under `var_dir`), `extra` over it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTAL_") and k != "DATABASE_URL"}
    return {**env, "DJANGO_SETTINGS_MODULE": "portal.settings", "PORTAL_VAR_DIR": str(var_dir), **extra}


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive free loopback ports. PORTAL_TEST_PORTS=8141-8159 keeps the search
    inside a range (a machine shared with other people's servers)."""
    wanted = os.environ.get("PORTAL_TEST_PORTS", "")
    if wanted:
        low, high = (int(p) for p in wanted.split("-"))
        candidates = range(low, high - count + 2)
    else:
        candidates = range(20000 + os.getpid() % 97 * 97, 60000, 97)
    for base in candidates:
        if all(_bindable(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free consecutive ports in {wanted or 'the unprivileged range'}")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", pause: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead for our purpose


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren...), whatever their session or group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
