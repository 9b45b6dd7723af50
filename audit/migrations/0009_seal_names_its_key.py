"""Seals name the key that made them (audit/seal.py: the key can be changed), 9 characters longer.

PostgreSQL widens the column without rewriting the table (a longer varchar), and rebuilds the unique
index on seals (about 2 s per million events on the benchmark's machine, the table locked meanwhile).
SQLite does not hold a column to its length, and altering it there would remake the table, which would
lose its append-only triggers: only Django's state changes."""

from django.db import migrations, models

from audit.triggers import keep_seals


def widen(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE audit_auditevent ALTER COLUMN seal TYPE varchar(90)")


def narrow(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE audit_auditevent ALTER COLUMN seal TYPE varchar(81)")


class Migration(migrations.Migration):

    dependencies = [("audit", "0008_auditevent_seal")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AlterField(
                model_name="auditevent",
                name="seal",
                field=models.CharField(blank=True, max_length=90, null=True,
                                       help_text="key id.nonce:HMAC of the event by the portal's seal key (audit.seal)."),
            )],
            database_operations=[migrations.RunPython(widen, narrow, elidable=False)],
        ),
        keep_seals(),  # migrated back, first: refused over sealed events
    ]
