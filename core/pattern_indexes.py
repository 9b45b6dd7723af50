"""PostgreSQL builds a `varchar_pattern_ops` twin beside the index of every indexed text column, for
LIKE 'prefix%' searches. Where nothing searches a column so, the twin only costs its writes: a migration
drops it by name (an AlterField would remake the table on SQLite and lose its triggers)."""

from django.db import migrations


def drop_pattern_index(table: str, column: str, name: str) -> migrations.RunPython:
    """A migration operation dropping the twin `name` of `table`.`column` on PostgreSQL (elsewhere
    nothing), and putting it back when migrating back. Its migration is not atomic: the index is dropped
    (and built again) CONCURRENTLY, so that the table's writers (the audit chain's appends) and readers
    go on meanwhile; inside a transaction (a test's), where CONCURRENTLY cannot run, plainly."""

    def concurrently(schema_editor) -> str:
        return "" if schema_editor.connection.in_atomic_block else " CONCURRENTLY"

    def drop(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f'DROP INDEX{concurrently(schema_editor)} IF EXISTS "{name}"')

    def create(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(f'CREATE INDEX{concurrently(schema_editor)} IF NOT EXISTS "{name}" ON "{table}" '
                                  f'("{column}" varchar_pattern_ops)')

    return migrations.RunPython(drop, create, elidable=False)
