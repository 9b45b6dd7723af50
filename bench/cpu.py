"""CPU time from /proc, which the benchmarks divide by the work done: on two cores shared by the load,
the server and PostgreSQL, CPU is what runs out, so CPU per request (or per event) says where the cost is."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU of one process so far (0 if it is gone); `reaped`: with that of its children
    that have ended and been waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15 if reaped else 13]) / _TICK


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def postgres_cpu_seconds() -> float:
    """The CPU of every PostgreSQL process so far, the backends that have ended included (the postmaster
    waits for its backends, and the kernel counts their CPU as its children's)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if cmdline.startswith(b"postgres: "):  # a backend or an auxiliary process
            total += cpu_seconds(int(entry.name))
        elif comm == "postgres":  # the postmaster: started by its binary's path
            total += cpu_seconds(int(entry.name), reaped=True)
    return total


def own_seconds(*, children_only: bool) -> float:
    """This process's CPU so far, or that of its children that have ended and been waited for."""
    t = os.times()
    return t.children_user + t.children_system if children_only else t.user + t.system
