"""PostgreSQL: drop the `varchar_pattern_ops` twin Django builds beside the index of a deployment's
state. It serves only LIKE 'prefix%' searches, which nothing runs on a state (the queue, the board and
the lists compare states whole, through the plain index), and every change of state wrote to it."""

from django.db import migrations

# Django's name for the pattern twin of the index of environments_deployment.state (db_index=True).
STATE_PATTERN_INDEX = "environments_deployment_state_82286ab9_like"


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f'DROP INDEX IF EXISTS "{STATE_PATTERN_INDEX}"')


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f'CREATE INDEX IF NOT EXISTS "{STATE_PATTERN_INDEX}" ON "environments_deployment" '
                              '("state" varchar_pattern_ops)')


class Migration(migrations.Migration):

    dependencies = [("environments", "0012_list_search_indexes")]

    operations = [migrations.RunPython(drop, create, elidable=False)]
