"""Benchmark of the SOX report exports against PostgreSQL's own COPY of the same rows.

    make bench-reports            # 1,000,000 deployments and audit events (BENCH_ROWS to change)

Uses the database of `make bench` (bench/seed.py: BENCH_DATABASE, default portal_bench, seeded
once with rows / 10 releases, rows deployments and rows audit events, reused afterwards), then
for `changes` and `audit` at 10% and 100% of the rows: the portal's streamed export (each in a
fresh process, so its peak memory is its own) and `COPY (same SELECT) TO STDOUT WITH CSV`.
Prints rows per second, the ratio to COPY, and peak memory (RSS).
"""

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import seed  # noqa: E402
from bench.seed import SPAN, START  # noqa: E402


def setup_django():
    os.environ["DATABASE_URL"] = seed.database_url()
    os.environ.setdefault("SECRET_KEY", "benchmark-only")
    os.environ.setdefault("PORTAL_AUDIT_SEAL_KEY", "benchmark-only-seal-key")  # every append sealed, as in production
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    import django

    django.setup()


def period(fraction: float):
    from evidence.reports import Period

    return Period(START, START + SPAN * fraction + dt.timedelta(seconds=1))


def export_in_this_process(report: str, fraction: float) -> None:
    """Child process: stream one export to /dev/null and print rows, seconds and peak RSS."""
    from audit.actors import Actor
    from evidence.reports import Export

    export = Export(report, period(fraction), Actor.system(via="bench"))
    t0 = time.monotonic()
    with open(os.devnull, "wb") as sink:
        for chunk in export.chunks():
            sink.write(chunk)
    seconds = time.monotonic() - t0
    # VmHWM: this process image's own peak RSS (ru_maxrss would carry the parent's over fork+exec).
    status = Path("/proc/self/status").read_text()
    peak_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(json.dumps({"rows": export.row_count, "seconds": seconds, "peak_mb": peak_mb}))


def copy_same_rows(report: str, fraction: float) -> dict:
    """PostgreSQL's own COPY ... TO STDOUT WITH CSV of the same SELECT, read to the end."""
    import psycopg
    from django.db import connection

    from audit.models import AuditEvent
    from evidence.reports import _changes_queryset

    p = period(fraction)
    if report == "changes":
        qs = _changes_queryset(p)
    else:
        qs = AuditEvent.objects.filter(created_at__gte=p.since, created_at__lt=p.until).order_by("seq").values_list(
            "seq", "created_at", "actor_id", "actor_username", "actor_email", "via", "action", "object_type",
            "object_id", "object_repr", "code", "data", "prev_hash", "hash")
    sql, params = qs.query.sql_with_params()
    connection.ensure_connection()
    literal = psycopg.ClientCursor(connection.connection).mogrify(sql, params)
    rows, t0 = 0, time.monotonic()
    with connection.connection.cursor() as cur, cur.copy(f"COPY ({literal}) TO STDOUT WITH CSV") as copy:
        for block in copy:
            rows += bytes(block).count(b"\n")
    return {"rows": rows, "seconds": time.monotonic() - t0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_ROWS", "1000000")))
    parser.add_argument("--child", nargs=2, metavar=("REPORT", "FRACTION"))
    args = parser.parse_args()
    if args.child:
        setup_django()
        export_in_this_process(args.child[0], float(args.child[1]))
        return
    setup_django()
    seed.ensure(max(1, args.rows // 10), args.rows, args.rows)
    print(f"\n{'report':8} {'rows':>10} {'portal rows/s':>14} {'COPY rows/s':>12} {'ratio':>6} {'peak MB':>8}")
    for report in ("changes", "audit"):
        for fraction in (0.1, 1.0):
            child = subprocess.run([sys.executable, __file__, "--child", report, str(fraction)], capture_output=True,
                                   text=True, check=True, env={**os.environ})
            ours = json.loads(child.stdout.strip().splitlines()[-1])
            theirs = copy_same_rows(report, fraction)
            ours_rate, copy_rate = ours["rows"] / ours["seconds"], theirs["rows"] / theirs["seconds"]
            print(f"{report:8} {ours['rows']:>10,} {ours_rate:>14,.0f} {copy_rate:>12,.0f} "
                  f"{ours_rate / copy_rate:>6.0%} {ours['peak_mb']:>8.0f}", flush=True)
    print("\ntarget: ratio >= 30% of COPY, peak memory flat and under 150 MB at 1,000,000 rows")


if __name__ == "__main__":
    main()
