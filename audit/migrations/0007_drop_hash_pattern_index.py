"""PostgreSQL: drop the `varchar_pattern_ops` twin Django builds beside the unique index of `hash`.

It serves only LIKE 'prefix%' searches, which nothing runs on a hash (the chain and the reports look a
hash up whole, through the unique index). It cost every append one more insert into a B-tree of random
keys, under the chain's lock, and 120 MB at a million events. Dropped by name, as 0006 does, so that
SQLite's table (and its append-only triggers) is not remade."""

from django.db import migrations

# Django's name for the pattern twin of the unique index on audit_auditevent.hash (0001).
HASH_PATTERN_INDEX = "audit_auditevent_hash_d0c402da_like"


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f'DROP INDEX IF EXISTS "{HASH_PATTERN_INDEX}"')


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f'CREATE INDEX IF NOT EXISTS "{HASH_PATTERN_INDEX}" ON "audit_auditevent" ("hash" varchar_pattern_ops)')


class Migration(migrations.Migration):

    dependencies = [("audit", "0006_indexes_with_time")]

    operations = [migrations.RunPython(drop, create, elidable=False)]
