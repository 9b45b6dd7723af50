"""Benchmark of the SOX report exports against PostgreSQL's own COPY of the same rows.

    make bench-reports            # 1,000,000 deployments and audit events (BENCH_ROWS to change)

Loads the rows into a separate database (portal_bench; reused when it already holds them), then
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
BENCH_DB = os.environ.get("BENCH_DATABASE", "portal_bench")
SERVER = os.environ.get("BENCH_SERVER", "postgres://postgres@127.0.0.1:5432")
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SPAN = dt.timedelta(days=360)


def setup_django():
    os.environ["DATABASE_URL"] = f"{SERVER}/{BENCH_DB}"
    os.environ.setdefault("SECRET_KEY", "benchmark-only")
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    import django

    django.setup()


def ensure_database():
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [BENCH_DB]).fetchone():
            conn.execute(f'CREATE DATABASE "{BENCH_DB}"')


def load(rows: int) -> None:
    from django.core.management import call_command
    from django.db import connection

    from audit import chain
    from environments.models import Deployment

    call_command("migrate", verbosity=0)
    if Deployment.objects.count() == rows:
        print(f"reusing {rows:,} deployments in {BENCH_DB}")
        return
    print(f"loading {rows:,} deployments, approvals and audit events into {BENCH_DB} ...", flush=True)
    t0 = time.monotonic()
    with connection.cursor() as c:
        from audit import triggers

        triggers.drop_all(connection)
        c.execute("TRUNCATE audit_auditevent, environments_approval, environments_deployment, releases_implementer,"
                  " releases_releaseissue, releases_release, releases_build, environments_environment,"
                  " releases_application CASCADE")
        triggers.install_all(connection)
        c.execute("INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff,"
                  " is_active, date_joined) VALUES ('!', false, 'bench-approver', '', '', 'a@example.com', true, true,"
                  " now()) ON CONFLICT (username) DO NOTHING")
        c.execute("SELECT id FROM auth_user WHERE username = 'bench-approver'")
        approver = c.fetchone()[0]
        c.execute("INSERT INTO releases_application (name, issue_key_prefix, description)"
                  " VALUES ('MAC', 'BIZPLAT', '') RETURNING id")
        app = c.fetchone()[0]
        c.execute("INSERT INTO environments_environment (application_id, name, restricted, auto_deploy,"
                  " required_approvals, requires_code_review, playbook, inventory, playbook_repo, playbook_ref)"
                  " VALUES (%s, 'Production', true, false, 1, true, 'deploy_demo.yml', '', '', '') RETURNING id", [app])
        env = c.fetchone()[0]
        c.execute("INSERT INTO releases_build (application_id, number, commit, branch, url, status, tests_passed,"
                  " tests_failed, tests_skipped, created_at, updated_at) SELECT %s, g::text, md5(g::text),"
                  " 'feature/BIZPLAT-' || g, 'https://ci.example.com/' || g, 'successful', 1000, 0, 3, now(), now()"
                  " FROM generate_series(1, 1000) g", [app])
        c.execute("INSERT INTO releases_release (application_id, version, build_id, artifact_url, artifact_sha256,"
                  " pull_request_url, pull_request_author, pull_request_reviewers, registration_digest, registered_by,"
                  " registered_at) SELECT %s, '1.' || b.number, b.id, 'https://artifacts/mac-1.' || b.number,"
                  " encode(sha256(b.number::bytea), 'hex'), 'https://vcs/pr/' || b.number, 'dev@example.com',"
                  " '[\"reviewer\"]', md5(b.number), 'ci:bench', now() FROM releases_build b", [app])
        c.execute("INSERT INTO releases_releaseissue (release_id, key)"
                  " SELECT id, 'BIZPLAT-' || id FROM releases_release"
                  " UNION ALL SELECT id, 'BIZPLAT-' || (id + 100000) FROM releases_release")
        c.execute("INSERT INTO releases_implementer (release_id, identity) SELECT id, 'dev@example.com' FROM"
                  " releases_release UNION ALL SELECT id, 'dev' || id || '@example.com' FROM releases_release")
        c.execute(
            "INSERT INTO environments_deployment (release_id, environment_id, state, requested_by_label, requested_via,"
            " requested_at, queued_at, started_at, finished_at, required_approvals, emergency, emergency_reason,"
            " review_comment, result_detail, sod_checks, progress, playbook_commit)"
            " SELECT r.ids[1 + g %% 1000], %s, CASE WHEN g %% 50 = 0 THEN 'failed' ELSE 'succeeded' END, 'analyst',"
            " 'admin', %s + (g * interval '1 second') * %s, %s + (g * interval '1 second') * %s,"
            " %s + (g * interval '1 second') * %s, %s + (g * interval '1 second') * %s + interval '1 minute', 1,"
            " false, '', '', '', '[\"requester_not_implementer\", \"approver_not_implementer\","
            " \"approver_not_requester\", \"approver_distinct\"]', '{}', 'bundled:abc'"
            " FROM generate_series(1, %s) g, (SELECT array_agg(id ORDER BY id) ids FROM releases_release) r",
            [env, *[START, SPAN.total_seconds() / rows] * 4, rows])
        c.execute("INSERT INTO environments_approval (deployment_id, approver_id, decision, comment, decided_at)"
                  " SELECT id, %s, 'approve', 'ok', queued_at FROM environments_deployment", [approver])
    print(f"  relational rows in {time.monotonic() - t0:.0f}s; computing and copying the audit chain ...", flush=True)
    t1 = time.monotonic()
    raw = connection.connection
    with connection.cursor() as c:
        c.execute("SELECT id, requested_at FROM environments_deployment ORDER BY id")
        deployments = c.fetchall()
    prev = chain.GENESIS_HASH
    from audit.models import AuditEvent

    with raw.cursor() as cur, cur.copy(
        "COPY audit_auditevent (seq, created_at, actor_username, actor_email, via, action, object_type, object_id,"
        " object_repr, code, data, canonical, prev_hash, hash) FROM STDIN"
    ) as copy:
        for seq, (dep_id, at) in enumerate(deployments, start=1):
            event = AuditEvent(seq=seq, created_at=at, actor_id=None, actor_username="analyst", actor_email="",
                               via="admin", action="deployment.request", object_type="environments.deployment",
                               object_id=str(dep_id), object_repr=f"#{dep_id}", code="",
                               data={"deployment_id": dep_id, "state": "awaiting_approval"}, prev_hash=prev)
            text = chain.canonical(event)
            event.hash = chain.link_hash(prev, text)
            copy.write_row((seq, at, "analyst", "", "admin", "deployment.request", "environments.deployment",
                            str(dep_id), f"#{dep_id}", "", json.dumps(event.data), text, prev, event.hash))
            prev = event.hash
    raw.commit()
    with connection.cursor() as c:
        c.execute("ANALYZE")
    print(f"  audit chain in {time.monotonic() - t1:.0f}s", flush=True)


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
    ensure_database()
    setup_django()
    load(args.rows)
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
