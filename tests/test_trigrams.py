"""The migrations that build trigram indexes create PostgreSQL's pg_trgm first, and go on with a warning
where the database role may not create it (the searches then read their tables whole): checked with a
real role that holds no CREATE right, on a database of its own. `create_search_indexes` builds them
later, once the extension can be had."""

import io
import logging

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper

from core.trigrams import pg_trgm_available
from portal.management.commands.create_search_indexes import _AUDIT, search_indexes

SEARCH_TEXT_SQL = _AUDIT.SEARCH_TEXT_SQL

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="pg_trgm is PostgreSQL's")

DATABASE, ROLE = "portal_trgm_check", "portal_trgm_check_role"


@pytest.fixture
def bare_database(django_db_blocker):
    """A new database without pg_trgm, and a role that may connect to it but create nothing."""
    settings = dict(connection.settings_dict)
    admin = psycopg.connect(host=settings["HOST"], port=settings["PORT"] or 5432, user=settings["USER"],
                            password=settings["PASSWORD"] or None, dbname="postgres", autocommit=True)
    with admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        admin.execute(f"DROP ROLE IF EXISTS {ROLE}")
        admin.execute(f"CREATE ROLE {ROLE} LOGIN")
        admin.execute(f"CREATE DATABASE {DATABASE} TEMPLATE template0")
        admin.execute(f"REVOKE CREATE ON DATABASE {DATABASE} FROM PUBLIC")
        wrappers = []

        def open_as(user: str) -> DatabaseWrapper:
            """A connection as `user`, known to Django by that alias (a migration's atomic() asks by alias)."""
            wrapper = DatabaseWrapper({**settings, "NAME": DATABASE, "USER": user, "CONN_MAX_AGE": 0}, alias=user)
            connections[user] = wrapper
            wrappers.append(wrapper)
            return wrapper

        try:
            with django_db_blocker.unblock():
                yield open_as
        finally:
            for wrapper in wrappers:
                wrapper.close()
                del connections[wrapper.alias]
            admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {ROLE}")


def _has_pg_trgm(wrapper) -> bool:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')")
        return cursor.fetchone()[0]


def test_a_role_that_may_not_create_the_extension_is_warned_and_the_migration_goes_on(bare_database, caplog):
    limited = bare_database(ROLE)
    with caplog.at_level(logging.WARNING, logger="core.trigrams"), limited.schema_editor() as editor:
        assert pg_trgm_available(editor, without="the searches read their tables whole") is False
        with limited.cursor() as cursor:  # the migration's transaction is still usable
            cursor.execute("SELECT 1")
    assert "pg_trgm is not available" in caplog.text and "read their tables whole" in caplog.text
    assert not _has_pg_trgm(limited)


def test_a_role_that_may_create_it_gets_it(bare_database):
    owner = bare_database(connection.settings_dict["USER"])
    with owner.schema_editor() as editor:
        assert pg_trgm_available(editor, without="-") is True
    assert _has_pg_trgm(owner)


def _search_indexes(wrapper) -> dict[str, bool]:
    """The search indexes there, each with whether it is valid."""
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                       " WHERE c.relname = ANY(%s)", [[name for name, _, _ in search_indexes()]])
        return dict(cursor.fetchall())


def test_create_search_indexes_tells_a_role_that_may_not_create_pg_trgm_what_a_superuser_must_run(bare_database):
    bare_database(ROLE)
    with pytest.raises(CommandError) as refused:
        call_command("create_search_indexes", "--database", ROLE, stdout=io.StringIO())
    assert f"pg_trgm cannot be created by the role '{ROLE}'" in str(refused.value)
    assert f"in the database '{DATABASE}': CREATE EXTENSION pg_trgm; then run this command again" in str(refused.value)


@pytest.fixture
def without_search_indexes(transactional_audit_db):
    """The test database as a portal migrated by a role without pg_trgm left it: no search index (and
    whatever the test leaves, built again afterwards)."""
    with connection.cursor() as cursor:
        for name, _, _ in search_indexes():
            cursor.execute(f"DROP INDEX IF EXISTS {name}")
    yield
    call_command("create_search_indexes", stdout=io.StringIO())


def test_create_search_indexes_builds_what_the_migrations_could_not_and_then_changes_nothing(without_search_indexes):
    assert _search_indexes(connection) == {}
    out = io.StringIO()
    call_command("create_search_indexes", stdout=out)
    assert _search_indexes(connection) == {name: True for name, _, _ in search_indexes()}
    assert "5 index(es) built" in out.getvalue() and "building (concurrently" in out.getvalue()

    # what the audit list's search reads: the index the migration defines, chosen by the planner
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute(f"EXPLAIN SELECT seq FROM audit_auditevent WHERE {SEARCH_TEXT_SQL} LIKE '%%BOB%%'")
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "auditevent_search_trgm" in plan, plan

    again = io.StringIO()
    call_command("create_search_indexes", stdout=again)
    assert "Every search index is there." in again.getvalue() and "building" not in again.getvalue()


def test_create_search_indexes_builds_again_an_index_a_failed_concurrent_build_left_invalid(without_search_indexes):
    call_command("create_search_indexes", stdout=io.StringIO())
    with connection.cursor() as cursor:  # what a concurrent build that fails leaves behind
        cursor.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'release_version_trgm_idx'::regclass")
    assert _search_indexes(connection)["release_version_trgm_idx"] is False
    out = io.StringIO()
    call_command("create_search_indexes", stdout=out)
    assert "release_version_trgm_idx on releases_release: invalid (a build that failed), dropped." in out.getvalue()
    assert _search_indexes(connection) == {name: True for name, _, _ in search_indexes()}
    assert "1 index(es) built" in out.getvalue()
