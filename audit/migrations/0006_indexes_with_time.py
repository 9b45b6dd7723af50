"""The audit list's filters (action, refusal code, channel) read composite indexes with the time: a
filtered list's first and last time (its date hierarchy) then come from the index rather than from
walking the time index until an event of a rare action turns up (half a second at a million events).
They replace the single-column indexes of those columns.

The single-column indexes are dropped by name rather than by altering the fields: on SQLite an
AlterField remakes the table, and the remade table would lose the append-only triggers (0002, 0003)."""

from django.db import migrations, models

# Django's own names for the indexes of `db_index=True` on action and code (and, on PostgreSQL,
# their varchar_pattern_ops twins).
SINGLE_COLUMN = {"action": "audit_auditevent_action_2131bb77", "code": "audit_auditevent_code_b956a085"}


def drop_single_column_indexes(apps, schema_editor):
    like = schema_editor.connection.vendor == "postgresql"
    for name in SINGLE_COLUMN.values():
        schema_editor.execute(f'DROP INDEX IF EXISTS "{name}"')
        if like:
            schema_editor.execute(f'DROP INDEX IF EXISTS "{name}_like"')


def create_single_column_indexes(apps, schema_editor):
    like = schema_editor.connection.vendor == "postgresql"
    for column, name in SINGLE_COLUMN.items():
        schema_editor.execute(f'CREATE INDEX "{name}" ON "audit_auditevent" ("{column}")')
        if like:
            schema_editor.execute(f'CREATE INDEX "{name}_like" ON "audit_auditevent" ("{column}" varchar_pattern_ops)')


class Migration(migrations.Migration):

    dependencies = [("audit", "0005_auditevent_search_index")]

    operations = [
        migrations.RemoveIndex(model_name="auditevent", name="auditevent_via_idx"),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(model_name="auditevent", name="action", field=models.CharField(max_length=64)),
                migrations.AlterField(model_name="auditevent", name="code", field=models.CharField(
                    blank=True, help_text="Refusal code, if refused.", max_length=64)),
            ],
            database_operations=[migrations.RunPython(drop_single_column_indexes, create_single_column_indexes)],
        ),
        migrations.AddIndex(model_name="auditevent", index=models.Index(
            fields=["action", "created_at"], name="auditevent_action_time_idx")),
        migrations.AddIndex(model_name="auditevent", index=models.Index(
            fields=["code", "created_at"], name="auditevent_code_time_idx")),
        migrations.AddIndex(model_name="auditevent", index=models.Index(
            fields=["via", "created_at"], name="auditevent_via_time_idx")),
    ]
