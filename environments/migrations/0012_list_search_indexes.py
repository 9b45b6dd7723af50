"""On PostgreSQL, trigram indexes for the lists' searches (edge.lists.ReleaseSearch): a word is looked
for anywhere in a release's version, issue keys and implementers, and in who asked for a deployment
(Django's icontains, LIKE '%word%'); without them each search reads those tables whole. Elsewhere
nothing. Where the pg_trgm extension cannot be created (a database role without the right to), the
migration says so and goes on: the searches still work, reading the tables."""

from django.db import migrations

from core.trigrams import pg_trgm_available

# index name, table, column: the expression is Django's own for icontains, so the planner uses it.
INDEXES = [
    ("deployment_requester_trgm_idx", "environments_deployment", "requested_by_label"),
    ("release_version_trgm_idx", "releases_release", "version"),
    ("releaseissue_key_trgm_idx", "releases_releaseissue", "key"),
    ("implementer_identity_trgm_idx", "releases_implementer", "identity"),
]


def create(apps, schema_editor):
    if not pg_trgm_available(schema_editor, without="the lists' searches read the tables whole"):
        return
    for name, table, column in INDEXES:
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING gin (UPPER({column}::text) gin_trgm_ops)")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for name, _table, _column in INDEXES:
            schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):

    dependencies = [("environments", "0011_deployment_unreviewed_index"), ("releases", "0007_release_latest_index")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
