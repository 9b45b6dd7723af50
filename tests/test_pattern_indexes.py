"""PostgreSQL builds a `varchar_pattern_ops` twin beside the index of every indexed text column, for
LIKE 'prefix%'. Nothing searches an audit event's hash or a deployment's state by prefix, and both are
written on hot paths (every append, every change of state): the migrations drop the twins, and
migrating back puts them back."""

import pytest
from django.core.management import call_command
from django.db import connection

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the pattern indexes are PostgreSQL's")

TWINS = {
    ("audit", "0006_indexes_with_time"): ("audit_auditevent", "audit_auditevent_hash_d0c402da_like"),
    ("environments", "0012_list_search_indexes"): ("environments_deployment",
                                                   "environments_deployment_state_82286ab9_like"),
}


def _indexes(table: str) -> dict[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table])
        return dict(cursor.fetchall())


@pytest.mark.parametrize(("migration", "twin"), TWINS.items(), ids=[t for _, t in TWINS.values()])
def test_the_pattern_twin_is_gone_and_comes_back_when_migrating_back(db, migration, twin):
    table, name = twin
    indexes = _indexes(table)
    assert name not in indexes
    plain = [n for n, sql in indexes.items() if "varchar_pattern_ops" not in sql and
             ("(hash)" in sql or "(state)" in sql)]
    assert plain, "the plain (or unique) index the lookups use is kept"

    app, previous = migration
    call_command("migrate", app, previous, verbosity=0, interactive=False)
    try:
        assert "varchar_pattern_ops" in _indexes(table)[name]
    finally:
        call_command("migrate", app, verbosity=0, interactive=False)
    assert name not in _indexes(table)
