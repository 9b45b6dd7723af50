"""Database triggers that make tables append-only, on PostgreSQL and SQLite.

Installed by migrations. `drop_all` exists for the test suite only: a transactional test must
empty the tables afterwards (see tests/conftest.py); nothing in the portal calls it.
"""

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION portal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'append-only table %: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
"""

# table -> operations refused on it
GUARDED_TABLES: dict[str, tuple[str, ...]] = {
    "audit_auditevent": ("UPDATE", "DELETE"),
    "auditlog_logentry": ("UPDATE", "DELETE"),
    "releases_release": ("UPDATE", "DELETE"),
    "releases_buildissue": ("UPDATE", "DELETE"),
}


def _statements(vendor: str, table: str, operations: tuple[str, ...]) -> list[str]:
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
        return statements
    raise NotImplementedError(f"No append-only triggers for database vendor {vendor!r}.")


def _drop_statements(vendor: str, table: str, operations: tuple[str, ...]) -> list[str]:
    if vendor == "postgresql":
        return [
            f'DROP TRIGGER IF EXISTS {table}_append_only ON "{table}"',
            f'DROP TRIGGER IF EXISTS {table}_no_truncate ON "{table}"',
        ]
    return [f"DROP TRIGGER IF EXISTS {table}_no_{op.lower()}" for op in operations]


def install(connection, table: str) -> None:
    with connection.cursor() as cursor:
        for sql in _statements(connection.vendor, table, GUARDED_TABLES[table]):
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


def migration_operation(table: str):
    """A RunPython operation installing the triggers of one table (dropping them on reverse)."""
    from django.db import migrations

    def forward(apps, schema_editor):
        install(schema_editor.connection, table)

    def backward(apps, schema_editor):
        drop(schema_editor.connection, table)

    return migrations.RunPython(forward, backward)
