"""The evidence tables attacked with raw SQL, as someone holding the database credentials would:
every rewrite is refused by the database itself and the row stays as it was."""

import pytest
from auditlog.models import LogEntry
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.db.migrations.exceptions import IrreversibleError
from django.db.migrations.recorder import MigrationRecorder

from audit import chain, triggers
from audit.models import AuditEvent
from environments.models import Approval
from releases.models import Implementer, ReleaseIssue
from tests.conftest import SYSTEM, person

sqlite_only = pytest.mark.skipif(connection.vendor != "sqlite", reason="REPLACE exists on SQLite only")

# table -> (column an attacker rewrites, forged value)
FORGERIES = {
    "audit_auditevent": ("action", "edited"),
    "auditlog_logentry": ("object_repr", "edited"),
    "releases_release": ("artifact_sha256", "f" * 64),
    "releases_releaseissue": ("key", "BIZPLAT-666"),
    "releases_implementer": ("identity", "mallory@example.com"),
    "environments_approval": ("comment", "forged"),
}
EVIDENCE_TABLES = ["releases_releaseissue", "releases_implementer", "environments_approval"]


@pytest.fixture
def evidence(world):
    """A release with its issue keys and implementers, promoted and approved into Production."""
    release = world.release()
    world.to_staging(release)
    world.deploy(release, world.production, actor=person(world.bob))
    return {
        "audit_auditevent": AuditEvent.objects.order_by("seq").values_list("pk", flat=True).first(),
        "auditlog_logentry": LogEntry.objects.values_list("pk", flat=True).first(),
        "releases_release": release.pk,
        "releases_releaseissue": ReleaseIssue.objects.get(release=release).pk,
        "releases_implementer": Implementer.objects.get(release=release).pk,
        "environments_approval": Approval.objects.get(deployment__release=release).pk,
    }


def columns(table: str) -> list[str]:
    with connection.cursor() as cursor:
        return [c.name for c in connection.introspection.get_table_description(cursor, table)]


def snapshot(table: str, pk: int):
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT * FROM "{table}" WHERE id = %s', [pk])
        row = cursor.fetchone()
        cursor.execute(f'SELECT COUNT(*) FROM "{table}"')
        return row, cursor.fetchone()[0]


def copy_statement(table: str, *, verb: str = "INSERT INTO", keep_id: bool = True, suffix: str = "",
                   forge: bool = True) -> str:
    """`verb` a copy of row %(pk)s with the forged value in its column (the attacker's rewrite)."""
    column = FORGERIES[table][0] if forge else None
    names = [c for c in columns(table) if keep_id or c != "id"]
    values = ", ".join("%(forged)s" if c == column else f'"{c}"' for c in names)
    target = ", ".join(f'"{c}"' for c in names)
    return f'{verb} "{table}" ({target}) SELECT {values} FROM "{table}" WHERE id = %(pk)s{suffix}'


def refused(table: str, pk: int, sql: str, params: dict | None = None, match: str = "append-only") -> None:
    before = snapshot(table, pk)
    with pytest.raises(DatabaseError, match=match), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql, params if params is not None else {"pk": pk, "forged": FORGERIES[table][1]})
    assert snapshot(table, pk) == before
    assert chain.verify().ok


@sqlite_only
@pytest.mark.parametrize("table", FORGERIES)
@pytest.mark.parametrize("verb", ["INSERT OR REPLACE INTO", "REPLACE INTO"])
def test_sqlite_refuses_a_replacing_insert_over_the_primary_key(evidence, table, verb):
    refused(table, evidence[table], copy_statement(table, verb=verb))


@sqlite_only
@pytest.mark.parametrize("table", [t for t in FORGERIES if t != "auditlog_logentry"])  # its only key is the id
def test_sqlite_refuses_a_replacing_insert_over_a_unique_key(evidence, table):
    """A new id with the same natural key (e.g. application and version) would replace the old row."""
    key_is_forged = table in ("releases_releaseissue", "releases_implementer")  # then copy the row as it is
    sql = copy_statement(table, verb="INSERT OR REPLACE INTO", keep_id=False, forge=not key_is_forged)
    refused(table, evidence[table], sql)


@pytest.mark.parametrize("table", FORGERIES)
def test_upsert_that_updates_is_refused(evidence, table):
    column, _ = FORGERIES[table]
    sql = copy_statement(table, suffix=f' ON CONFLICT (id) DO UPDATE SET "{column}" = excluded."{column}"')
    refused(table, evidence[table], sql)


@sqlite_only
@pytest.mark.parametrize("table", FORGERIES)
def test_sqlite_upsert_is_refused_by_the_update_trigger_too(evidence, table):
    """Without the replacing-insert guard, ON CONFLICT DO UPDATE still fires the UPDATE trigger."""
    column, _ = FORGERIES[table]
    sql = copy_statement(table, suffix=f' ON CONFLICT (id) DO UPDATE SET "{column}" = excluded."{column}"')
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER {table}_no_replace")
    try:
        refused(table, evidence[table], sql, match="UPDATE refused")
    finally:
        triggers.install(connection, table)


@pytest.mark.parametrize("table", EVIDENCE_TABLES)
def test_evidence_rows_refuse_update_and_delete(evidence, table):
    column, forged = FORGERIES[table]
    pk = evidence[table]
    refused(table, pk, f'UPDATE "{table}" SET "{column}" = %(forged)s WHERE id = %(pk)s')
    refused(table, pk, f'DELETE FROM "{table}" WHERE id = %(pk)s')


@pytest.mark.parametrize("table", EVIDENCE_TABLES)
@pytest.mark.postgres
@pytest.mark.skipif(connection.vendor != "postgresql", reason="TRUNCATE exists on PostgreSQL only")
def test_postgres_refuses_truncate_of_evidence(evidence, table):
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no pending foreign-key checks in the way
    refused(table, evidence[table], f'TRUNCATE "{table}" CASCADE', {})


def assert_every_guarded_table_has_its_triggers():
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            expected = {f"{t}_no_{op}" for t in triggers.GUARDED_TABLES for op in ("update", "delete", "replace")}
        else:
            cursor.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
            expected = {f"{t}_{kind}" for t in triggers.GUARDED_TABLES for kind in ("append_only", "no_truncate")}
        assert expected <= {name for (name,) in cursor.fetchall()}


def test_every_guarded_table_has_its_triggers(db):
    """What the migrations installed is the full set."""
    assert_every_guarded_table_has_its_triggers()


def test_migrate_puts_back_triggers_a_table_rebuild_dropped(db):
    """SQLite rebuilds a table for most ALTERs, losing its triggers; every migrate reinstalls them."""
    triggers.drop(connection, "releases_release")
    call_command("migrate", verbosity=0, interactive=False)
    assert_every_guarded_table_has_its_triggers()


def test_migrating_the_audit_app_back_over_sealed_events_is_refused_and_changes_nothing(transactional_audit_db):
    """Going back past audit/0009 or audit/0008 would narrow or drop the seals (on SQLite, remake the table
    without its triggers): refused while an event holds one."""
    event = chain.append(actor=SYSTEM, action="test.sealed", data={"n": 1})
    assert event.seal
    with pytest.raises(IrreversibleError, match="The audit events are sealed"):
        call_command("migrate", "audit", "0007", verbosity=0, interactive=False)
    assert AuditEvent.objects.get(pk=event.pk).seal == event.seal
    assert MigrationRecorder(connection).migration_qs.filter(app="audit", name="0009_seal_names_its_key").exists()
    assert chain.verify().ok
    assert_every_guarded_table_has_its_triggers()
