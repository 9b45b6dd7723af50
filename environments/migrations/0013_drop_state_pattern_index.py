"""PostgreSQL: drop the `varchar_pattern_ops` twin Django builds beside the index of a deployment's
state. It serves only LIKE 'prefix%' searches, which nothing runs on a state (the queue, the board and
the lists compare states whole, through the plain index), and every change of state wrote to it."""

from django.db import migrations

from core.pattern_indexes import drop_pattern_index


class Migration(migrations.Migration):

    atomic = False  # DROP INDEX CONCURRENTLY runs outside a transaction

    dependencies = [("environments", "0012_list_search_indexes")]

    # Django's name for the twin of the index of environments_deployment.state (db_index=True).
    operations = [drop_pattern_index("environments_deployment", "state",
                                     "environments_deployment_state_82286ab9_like")]
