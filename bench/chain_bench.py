"""Audit chain benchmarks: concurrent appends, and verify_audit next to COPY of the same table."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import cpu

ROOT = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    """This process image's own peak RSS (VmHWM; ru_maxrss would carry a parent's over fork+exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


# The floor an append is compared with: the same writers, serialized by an advisory lock taken in
# the same round trip as a plain INSERT of a row of the same size, then the commit; no chain, no hash.
FLOOR_TABLE = "bench_serialized_insert"
FLOOR_LOCK_KEY = 7_341_120_099


def checkpoint() -> None:
    """Flush what earlier work left dirty, so that a checkpoint does not start during a measurement
    (needs a superuser or pg_checkpoint's role; without it, nothing)."""
    from django.db import DatabaseError, connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")
    except DatabaseError:
        pass


def _floor_one(i: int, n: int) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT pg_advisory_xact_lock({FLOOR_LOCK_KEY}); "
                       f"INSERT INTO {FLOOR_TABLE} (writer, n, body) VALUES (%s, %s, %s)",
                       [i, n, "x" * 600])  # about the size of an audit event's canonical text


def _append_one(i: int, n: int) -> None:
    from audit import chain
    from audit.actors import Actor

    chain.append(actor=Actor.system(via="bench"), action="bench.append", object_type="bench.writer",
                 object_id=str(i), data={"writer": i, "n": n})


def _append_process(i: int, count: int, barrier, errors, floor: bool = False) -> None:
    found: list[str] = []
    _append_many(i, count, barrier, found, _floor_one if floor else _append_one)
    for error in found:
        errors.put(error)


def _append_many(i: int, count: int, barrier, errors: list, write_one=_append_one) -> None:
    """One writer: wait at the start line, then `count` writes, one transaction each (as a service does)."""
    from django.db import connections, transaction

    try:
        with transaction.atomic():  # connect before the start line
            pass
        barrier.wait()
        for n in range(count):
            with transaction.atomic():
                write_one(i, n)
    except Exception as exc:  # reported, not raised: the table says what failed
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        connections.close_all()


def appends(writers: int = 8, per_writer: int = 500, mode: str = "processes") -> dict:
    """`writers` threads or processes, each with its own connection, appending `per_writer` events
    each. Processes are how gunicorn's workers write; threads share one interpreter lock. Mode
    "floor": processes doing the serialized plain INSERT the chain is compared with."""
    from django.db import connection, connections

    floor = mode == "floor"
    if floor:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (id bigserial PRIMARY KEY, writer int, n int,"
                           " body text, at timestamptz DEFAULT clock_timestamp())")

    if mode == "threads":
        barrier, errors = threading.Barrier(writers + 1), []
        workers = [threading.Thread(target=_append_many, args=(i, per_writer, barrier, errors))
                   for i in range(writers)]
    else:
        connections.close_all()  # no connection crosses the fork
        context = multiprocessing.get_context("fork")
        barrier, queue = context.Barrier(writers + 1), context.SimpleQueue()
        workers = [context.Process(target=_append_process, args=(i, per_writer, barrier, queue, floor))
                   for i in range(writers)]
    writers_cpu, db_cpu = cpu.own_seconds(children_only=mode != "threads"), cpu.postgres_cpu_seconds()
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.monotonic()
    for w in workers:
        w.join()
    seconds = time.monotonic() - t0
    writers_cpu = cpu.own_seconds(children_only=mode != "threads") - writers_cpu
    db_cpu = cpu.postgres_cpu_seconds() - db_cpu
    if mode != "threads":
        errors = [queue.get() for _ in iter(lambda: not queue.empty(), False)]
        errors += [f"writer exited with {w.exitcode}" for w in workers if w.exitcode]
    events = writers * per_writer
    return {"mode": mode, "writers": writers, "events": events, "seconds": seconds, "rate": events / seconds,
            "errors": list(errors), "writers_cpu_ms": 1000 * writers_cpu / events, "db_cpu_ms": 1000 * db_cpu / events}


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def verify_in_this_process() -> None:
    """Child process: `verify_audit` as an auditor runs it; prints count, seconds, peak RSS, the RSS
    a tenth of the way through (memory is flat when it is the peak already), and its output line."""
    from io import StringIO

    from django.core.management import call_command

    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            samples.append((time.monotonic(), _rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    out, err = StringIO(), StringIO()
    t0 = time.monotonic()
    sampler.start()
    try:
        call_command("verify_audit", stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    seconds = time.monotonic() - t0
    done.set()
    sampler.join()
    early = max((mb for at, mb in samples if at - t0 <= seconds / 10), default=0.0)
    line = (out.getvalue() or err.getvalue()).strip().splitlines()[0]
    count = int(line.split()[1]) if line.startswith("OK ") else 0
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker process
    print(json.dumps({"ok": code == 0, "count": count, "seconds": seconds, "peak_mb": peak_mb(),
                      "early_mb": early, "workers_mb": workers_mb, "line": line}))


def idle_in_this_process() -> None:
    """Child process: Django set up and one event read; its peak RSS is the floor verify is compared to."""
    from audit.models import AuditEvent

    AuditEvent.objects.order_by("seq").first()
    print(json.dumps({"peak_mb": peak_mb()}))


def child(name: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--child", name], capture_output=True,
                          text=True, env={**os.environ, **env})
    if done.returncode:
        raise RuntimeError(f"child {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def copy_table() -> dict:
    """PostgreSQL's own COPY of the audit table (all columns, text format), read to the end."""
    from django.db import connection

    connection.ensure_connection()
    rows, t0 = 0, time.monotonic()
    with connection.connection.cursor() as cur, cur.copy("COPY audit_auditevent TO STDOUT") as copy:
        for block in copy:
            rows += bytes(block).count(b"\n")
    return {"rows": rows, "seconds": time.monotonic() - t0}


def verify_vs_copy() -> list[dict]:
    """COPY before and after verify; the faster of the two is the rate verify is compared with. Verify
    runs twice: with the seal key (as production runs it), then without (what reading the seals costs)."""
    before = copy_table()
    runs = [("checked", child("verify")), ("not read", child("verify", PORTAL_AUDIT_SEAL_KEY=""))]
    after = copy_table()
    theirs = max(before, after, key=lambda c: c["rows"] / c["seconds"])
    idle = child("idle")
    return [{
        "seals": seals, "ok": ours["ok"], "line": ours["line"], "count": ours["count"], "seconds": ours["seconds"],
        "rate": ours["count"] / ours["seconds"] if ours["seconds"] else 0.0,
        "copy_rows": theirs["rows"], "copy_seconds": theirs["seconds"],
        "copy_rate": theirs["rows"] / theirs["seconds"], "peak_mb": ours["peak_mb"], "idle_mb": idle["peak_mb"],
        "early_mb": ours["early_mb"], "workers_mb": ours["workers_mb"],
    } for seals, ours in runs]
