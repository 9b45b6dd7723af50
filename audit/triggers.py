"""Database triggers that make tables append-only, on PostgreSQL and SQLite.

Every guarded table refuses UPDATE and DELETE row by row and, on PostgreSQL, TRUNCATE (a row
trigger does not fire on TRUNCATE). On PostgreSQL `INSERT ... ON CONFLICT DO UPDATE` and MERGE
fire the UPDATE trigger. SQLite's `INSERT OR REPLACE` / `REPLACE INTO` / `ON CONFLICT REPLACE`
delete the old row without firing DELETE triggers (recursive_triggers is off), so each guarded
table there also has a BEFORE INSERT trigger refusing a row whose primary key or a unique key
already exists (a plain INSERT of a duplicate fails the same way, with an IntegrityError).

Installed by migrations. `drop_all` exists for the test suite only: a transactional test must
empty the tables afterwards (see tests/conftest.py); nothing in the portal calls it.
"""

from django.db import migrations
from django.db.migrations.exceptions import IrreversibleError

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION portal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'append-only table %: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
"""

APPEND_ONLY = ("UPDATE", "DELETE")

# table -> operations refused on it. The evidence of a release (the row itself with its pull
# request, its issue keys and implementers) and of a deployment's sign-off (approvals) is as
# permanent as the audit chain.
GUARDED_TABLES: dict[str, tuple[str, ...]] = {
    "audit_auditevent": APPEND_ONLY,
    "auditlog_logentry": APPEND_ONLY,
    "releases_release": APPEND_ONLY,
    "releases_releaseissue": APPEND_ONLY,
    "releases_implementer": APPEND_ONLY,
    "environments_approval": APPEND_ONLY,
    "releases_buildissue": APPEND_ONLY,
}


def unique_keys(connection, table: str) -> list[tuple[str, ...]]:
    """The primary key and every unique constraint of a table (read from the database)."""
    with connection.cursor() as cursor:
        keys = [(connection.introspection.get_primary_key_column(cursor, table),)]
        for constraint in connection.introspection.get_constraints(cursor, table).values():
            columns = tuple(constraint["columns"] or ())
            if constraint["unique"] and columns and columns not in keys:
                keys.append(columns)
    return keys


def _sqlite_replace_guard(connection, table: str) -> str:
    def exists(columns):
        match = " AND ".join(f'"{c}" = NEW."{c}"' for c in columns)
        return f'EXISTS (SELECT 1 FROM "{table}" WHERE {match})'

    when = " OR ".join(exists(columns) for columns in unique_keys(connection, table))
    return (
        f'CREATE TRIGGER {table}_no_replace BEFORE INSERT ON "{table}" WHEN {when} '
        f"BEGIN SELECT RAISE(ABORT, 'append-only table {table}: INSERT over an existing row refused'); END"
    )


def _statements(connection, table: str, operations: tuple[str, ...]) -> list[str]:
    vendor = connection.vendor
    if vendor == "postgresql":
        ops = " OR ".join(operations)
        return [
            PG_FUNCTION,
            f'DROP TRIGGER IF EXISTS {table}_append_only ON "{table}"',
            f'CREATE TRIGGER {table}_append_only BEFORE {ops} ON "{table}" '
            "FOR EACH ROW EXECUTE FUNCTION portal_refuse_change()",
            f'DROP TRIGGER IF EXISTS {table}_no_truncate ON "{table}"',
            f'CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON "{table}" '
            "FOR EACH STATEMENT EXECUTE FUNCTION portal_refuse_change()",
        ]
    if vendor == "sqlite":
        statements = []
        for op in operations:
            name = f"{table}_no_{op.lower()}"
            statements += [
                f"DROP TRIGGER IF EXISTS {name}",
                f'CREATE TRIGGER {name} BEFORE {op} ON "{table}" '
                f"BEGIN SELECT RAISE(ABORT, 'append-only table {table}: {op} refused'); END",
            ]
        return [*statements, f"DROP TRIGGER IF EXISTS {table}_no_replace", _sqlite_replace_guard(connection, table)]
    raise NotImplementedError(f"No append-only triggers for database vendor {vendor!r}.")


def _drop_statements(vendor: str, table: str, operations: tuple[str, ...]) -> list[str]:
    if vendor == "postgresql":
        return [
            f'DROP TRIGGER IF EXISTS {table}_append_only ON "{table}"',
            f'DROP TRIGGER IF EXISTS {table}_no_truncate ON "{table}"',
        ]
    return [f"DROP TRIGGER IF EXISTS {table}_no_{op.lower()}" for op in (*operations, "REPLACE")]


def install(connection, table: str) -> None:
    """Install (or reinstall) the triggers of one guarded table."""
    statements = _statements(connection, table, GUARDED_TABLES[table])
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)


def drop(connection, table: str) -> None:
    with connection.cursor() as cursor:
        for sql in _drop_statements(connection.vendor, table, GUARDED_TABLES[table]):
            cursor.execute(sql)


def install_all(connection) -> None:
    for table in GUARDED_TABLES:
        install(connection, table)


def drop_all(connection) -> None:
    for table in GUARDED_TABLES:
        drop(connection, table)


def migration_operation(table: str, *, reinstall: bool = False):
    """A RunPython operation installing the triggers of one table (dropping them on reverse).

    `reinstall` brings the triggers of an already guarded table up to date; its reverse leaves them.
    """

    def forward(apps, schema_editor):
        install(schema_editor.connection, table)

    def backward(apps, schema_editor):
        drop(schema_editor.connection, table)

    return migrations.RunPython(forward, migrations.RunPython.noop if reinstall else backward)


def keep_seals():
    """A migration operation, the last of a migration that brought seals in, so the first to run when it
    is migrated back: it refuses while any event holds a seal, since going back would narrow or drop the
    column, and with it the evidence of which events the portal wrote (audit.seal). Forwards nothing."""

    def refuse(apps, schema_editor):
        with schema_editor.connection.cursor() as cursor:
            cursor.execute("SELECT EXISTS (SELECT 1 FROM audit_auditevent WHERE seal IS NOT NULL)")
            if cursor.fetchone()[0]:
                raise IrreversibleError(
                    "The audit events are sealed: migrating the audit app back would narrow or drop their seals, "
                    "the evidence of which events the portal wrote. Keep the audit app's migrations where they are.")

    return migrations.RunPython(migrations.RunPython.noop, refuse, elidable=False)
