"""The audit list's search reads a trigram index (PostgreSQL): a word anywhere in an event's person,
object, action or code is found through it, not by reading every event (seconds at a million).

The indexed expression is audit.admin's SEARCH_TEXT_SQL as it stood when this migration was written
(unqualified); tests/audit/test_search.py checks on PostgreSQL that the search's plan still reads this
index. Built CONCURRENTLY, outside a transaction: the chain's appends go on while it is built (a
build that fails leaves an invalid index, which `DROP INDEX auditevent_search_trgm` and the
migration run again replace).
pg_trgm is a trusted extension (PostgreSQL 13 and later): a role with CREATE on the database may
create it. Where it cannot, the migration says so and goes on, as environments/0012 does: the search
still works, reading the table (docs/operating.md)."""

from django.db import migrations

from core.trigrams import pg_trgm_available

SEARCH_TEXT_SQL = ("UPPER(actor_username || chr(31) || object_repr || chr(31) || object_id || chr(31) || action"
                   " || chr(31) || code)")


def create(apps, schema_editor):
    # SQLite (development, tests) searches as the admin does.
    if not pg_trgm_available(schema_editor, without="the audit list's search reads the table whole"):
        return
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS auditevent_search_trgm ON audit_auditevent"
        f" USING gin (({SEARCH_TEXT_SQL}) gin_trgm_ops)")
    # The planner estimates how many events a search finds from the statistics of the indexed
    # expression, which ANALYZE gathers only once the index exists (autovacuum would, later).
    schema_editor.execute("ANALYZE audit_auditevent")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS auditevent_search_trgm")


class Migration(migrations.Migration):

    atomic = False  # CREATE INDEX CONCURRENTLY runs outside a transaction

    dependencies = [("audit", "0004_auditevent_via_index")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
