"""The benchmark database: 100,000 releases, 1,000,000 deployments, 1,000,000 audit events.

Written with bulk SQL (INSERT ... SELECT generate_series) and the audit chain with COPY, into a
database of its own (BENCH_DATABASE, default portal_bench) that is created anew when its marker
table `bench_seed` does not name the same sizes, and reused as it is otherwise. The chain is a
valid one: every event is hashed with audit.chain's own canonical form, so `verify_audit` passes.

Shape: application MAC (issue keys BIZPLAT) with QA (auto-deploy) -> Staging -> Production
(restricted, one approval); one successful build per release; each release carries its own issue
key and an epic key shared by ten releases; each release has ten finished deployments (four to
QA, three to Staging, three to Production, promoted from the one before); one approval per
Production deployment; one audit event per deployment (the finish).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time

SEED_VERSION = 2  # 2: the chain is sealed (audit/seal.py)
START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SPAN = dt.timedelta(days=360)
PASSWORD = "bench-admin"  # the bench database is throwaway; the pages benchmark logs in as bench-admin


def server_url() -> str:
    return os.environ.get("BENCH_SERVER", "postgres://postgres@127.0.0.1:5432")


def database_name() -> str:
    return os.environ.get("BENCH_DATABASE", "portal_bench")


def database_url() -> str:
    return f"{server_url()}/{database_name()}"


def seeded_sizes(url: str) -> tuple[int, int, int] | None:
    """(releases, deployments, events) named by the marker, or None when the database or marker is missing."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT releases, deployments, events FROM bench_seed WHERE version = %s", [SEED_VERSION]
            ).fetchone()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return None
    return tuple(row) if row else None


def recreate_database() -> None:
    import psycopg

    name = database_name()
    with psycopg.connect(f"{server_url()}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def ensure(releases: int, deployments: int, events: int, log=print) -> bool:
    """Seed unless the marker already names these sizes. Django must be set up on database_url().
    Returns True when it seeded."""
    if deployments % releases or events > deployments:
        raise SystemExit("deployments must be a multiple of releases, and events at most deployments")
    if seeded_sizes(database_url()) == (releases, deployments, events):
        log(f"reusing the seeded database {database_name()} ({releases:,} releases, {deployments:,} deployments,"
            f" {events:,} seeded audit events)")
        from django.core.management import call_command

        call_command("migrate", verbosity=0)  # the schema of this checkout (new indexes build here, once)
        return False
    from django.db import connections

    connections.close_all()
    recreate_database()
    t0 = time.monotonic()
    log(f"seeding {database_name()}: {releases:,} releases, {deployments:,} deployments, {events:,} audit events")
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    log(f"  schema in {time.monotonic() - t0:.0f}s", flush=True)
    t1 = time.monotonic()
    _relational(releases, deployments)
    log(f"  relational rows in {time.monotonic() - t1:.0f}s", flush=True)
    t2 = time.monotonic()
    _chain(releases, deployments, events)
    log(f"  audit chain in {time.monotonic() - t2:.0f}s", flush=True)
    t3 = time.monotonic()
    from django.db import connection

    with connection.cursor() as c:
        c.execute("VACUUM ANALYZE")
        c.execute("CREATE TABLE bench_seed (version int, releases int, deployments int, events int,"
                  " seeded_at timestamptz DEFAULT now())")
        c.execute("INSERT INTO bench_seed (version, releases, deployments, events) VALUES (%s, %s, %s, %s)",
                  [SEED_VERSION, releases, deployments, events])
    log(f"  vacuum and analyze in {time.monotonic() - t3:.0f}s; seeded in {time.monotonic() - t0:.0f}s", flush=True)
    return True


def _relational(releases: int, deployments: int) -> None:
    from django.contrib.auth.hashers import make_password
    from django.db import connection, transaction

    per = deployments // releases
    step = SPAN / deployments
    with transaction.atomic(), connection.cursor() as c:
        for username, superuser in (("bench-admin", True), ("bench-approver", False), ("bench-requester", False)):
            c.execute(
                "INSERT INTO auth_user (password, is_superuser, username, first_name, last_name, email, is_staff,"
                " is_active, date_joined) VALUES (%s, %s, %s, '', '', %s, true, true, now())",
                [make_password(PASSWORD) if superuser else "!", superuser, username, f"{username}@example.com"],
            )
        c.execute("SELECT id FROM auth_user WHERE username = 'bench-approver'")
        approver = c.fetchone()[0]
        c.execute("SELECT id FROM auth_user WHERE username = 'bench-requester'")
        requester = c.fetchone()[0]
        c.execute("INSERT INTO releases_application (name, issue_key_prefix, issue_url_pattern, description)"
                  " VALUES ('MAC', 'BIZPLAT', 'https://jira.example.com/browse/{key}', 'Seeded for the benchmarks')"
                  " RETURNING id")
        app = c.fetchone()[0]
        env_columns = ("application_id, name, promotes_from_id, restricted, auto_deploy, required_approvals,"
                       " requires_code_review, playbook, inventory, playbook_repo, playbook_ref")
        c.execute(f"INSERT INTO environments_environment ({env_columns}) VALUES"
                  " (%s, 'QA', NULL, false, true, 0, false, 'deploy_demo.yml', '', '', '') RETURNING id", [app])
        qa = c.fetchone()[0]
        c.execute(f"INSERT INTO environments_environment ({env_columns}) VALUES"
                  " (%s, 'Staging', %s, false, false, 0, false, 'deploy_demo.yml', '', '', '') RETURNING id",
                  [app, qa])
        staging = c.fetchone()[0]
        c.execute(f"INSERT INTO environments_environment ({env_columns}) VALUES"
                  " (%s, 'Production', %s, true, false, 1, false, 'deploy_demo.yml', '', '', '') RETURNING id",
                  [app, staging])
        production = c.fetchone()[0]
        # A release g is registered just before its first deployment (g - 1) * per + 1.
        c.execute(
            "INSERT INTO releases_build (application_id, number, commit, branch, url, status, tests_passed,"
            " tests_failed, tests_skipped, created_at, updated_at)"
            " SELECT %s, g::text, md5(g::text) || substr(md5(g::text), 1, 8), 'feature/BIZPLAT-' || g || '-change',"
            " 'https://ci.example.com/mac/' || g, 'successful', 1000, 0, 3, t, t"
            " FROM generate_series(1, %s) g, LATERAL (SELECT %s + ((g - 1) * %s) * %s - interval '20 minutes' t) x"
            " ORDER BY g",
            [app, releases, START, per, step])
        c.execute(
            "INSERT INTO releases_release (application_id, version, build_id, artifact_url, artifact_sha256,"
            " pull_request_url, pull_request_author, pull_request_reviewers, registration_digest, registered_by,"
            " registered_at)"
            " SELECT %s, '1.0.' || b.number, b.id, 'https://artifacts.example.com/mac/1.0.' || b.number || '.tar.gz',"
            " encode(sha256(('1.0.' || b.number)::bytea), 'hex'), 'https://vcs.example.com/mac/pull/' || b.number,"
            " 'dev' || b.number || '@example.com', '[\"reviewer@example.com\"]', md5('release' || b.number),"
            " 'ci:bench', b.created_at + interval '10 minutes'"
            " FROM releases_build b ORDER BY b.id",
            [app])
        c.execute("SELECT min(id), max(id) FROM releases_release")
        if tuple(c.fetchone()) != (1, releases):
            raise RuntimeError("the bench database was not fresh: release ids do not run from 1")
        c.execute("INSERT INTO releases_releaseissue (release_id, key)"
                  " SELECT id, 'BIZPLAT-' || id FROM releases_release"
                  " UNION ALL SELECT id, 'BIZPLAT-' || (1000000 + (id - 1) / 10) FROM releases_release")
        c.execute("INSERT INTO releases_implementer (release_id, identity)"
                  " SELECT id, 'dev' || id || '@example.com' FROM releases_release"
                  " UNION ALL SELECT id, 'committer@example.com' FROM releases_release")
        # Deployment g: release (g - 1) / per + 1, position p = (g - 1) %% per in that release:
        # the first four to QA, the next three to Staging, the rest to Production.
        c.execute(
            "INSERT INTO environments_deployment (release_id, environment_id, state, requested_by_id,"
            " requested_by_label, requested_via, requested_at, queued_at, started_at, finished_at, promoted_from_id,"
            " required_approvals, emergency, emergency_reason, review_comment, result_detail, sod_checks, progress,"
            " playbook_commit, automatic, engine, refusal_code)"
            " SELECT (g - 1) / %(per)s + 1, CASE WHEN p < 4 THEN %(qa)s WHEN p < 7 THEN %(staging)s"
            "  ELSE %(production)s END,"
            " CASE WHEN g %% 50 = 0 THEN 'failed' ELSE 'succeeded' END,"
            " CASE WHEN p >= 7 THEN %(requester)s END, CASE WHEN p >= 7 THEN 'bench-requester' ELSE 'ci:bench' END,"
            " CASE WHEN p >= 7 THEN 'admin' ELSE 'api' END,"
            " t, t + interval '1 minute', t + interval '2 minutes', t + interval '5 minutes',"
            " CASE WHEN p >= 7 THEN g - 3 WHEN p >= 4 THEN g - 4 END, CASE WHEN p >= 7 THEN 1 ELSE 0 END,"
            " false, '', '', CASE WHEN g %% 50 = 0 THEN 'deploy task failed on host app1' ELSE '' END,"
            " CASE WHEN p >= 7 THEN '[\"requester_not_implementer\", \"approver_not_implementer\","
            "  \"approver_not_requester\", \"approver_distinct\"]' ELSE '[]' END::jsonb,"
            " '{\"hosts\": 3, \"done\": 3}', 'bundled:' || md5('playbooks'), p < 7, 'bench:1', ''"
            " FROM generate_series(1, %(deployments)s) g,"
            " LATERAL (SELECT (g - 1) %% %(per)s p, %(start)s + (g * %(step)s) t) x ORDER BY g",
            {"per": per, "qa": qa, "staging": staging, "production": production, "requester": requester,
             "deployments": deployments, "start": START, "step": step})
        c.execute("INSERT INTO environments_approval (deployment_id, approver_id, decision, comment, decided_at)"
                  " SELECT id, %s, 'approve', 'Checked the change tickets.', queued_at FROM environments_deployment"
                  " WHERE environment_id = %s", [approver, production])


def _chain(releases: int, deployments: int, events: int) -> None:
    """The audit events of the last `events` deployments, hashed in order and written with COPY."""
    from django.conf import settings
    from django.db import connection, transaction

    from audit import chain, seal

    key = settings.PORTAL_AUDIT_SEAL_KEY  # sealed as the portal seals (the bench sets a key)
    per = deployments // releases
    step = SPAN / deployments
    names = ["QA"] * 4 + ["Staging"] * 3 + ["Production"] * (per - 7)
    canonical_text, link_hash, iso = chain.canonical_text, chain.link_hash, chain.iso
    prev = chain.GENESIS_HASH
    first = deployments - events + 1
    with transaction.atomic():
        connection.ensure_connection()
        with connection.connection.cursor() as cur, cur.copy(
            "COPY audit_auditevent (seq, created_at, actor_id, actor_username, actor_email, via, action, object_type,"
            " object_id, object_repr, code, data, canonical, prev_hash, hash, seal) FROM STDIN"
        ) as copy:
            for seq, g in enumerate(range(first, deployments + 1), start=1):
                p = (g - 1) % per
                at = START + g * step + dt.timedelta(minutes=5)
                state = "failed" if g % 50 == 0 else "succeeded"
                version = f"1.0.{(g - 1) // per + 1}"
                user = "bench-requester" if p >= 7 else "system"
                data = {"deployment_id": g, "release": version, "environment": names[p], "state": state}
                object_id, object_repr = str(g), f"#{g} MAC {version} -> {names[p]}"
                text = canonical_text(seq, iso(at), None, user, "", "worker", "deployment.finish",
                                      "environments.deployment", object_id, object_repr, "", data)
                digest = link_hash(prev, text)
                sealed = None if key is None else seal.seal(seal.at_position_zero(text, seq), key)
                copy.write_row((seq, at, None, user, "", "worker", "deployment.finish", "environments.deployment",
                                object_id, object_repr, "", json.dumps(data), text, prev, digest, sealed))
                prev = digest
