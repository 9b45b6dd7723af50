"""The migrations that build trigram indexes create PostgreSQL's pg_trgm first, and go on with a warning
where the database role may not create it (the searches then read their tables whole): checked with a
real role that holds no CREATE right, on a database of its own."""

import logging

import psycopg
import pytest
from django.db import connection, connections
from django.db.backends.postgresql.base import DatabaseWrapper

from core.trigrams import pg_trgm_available

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
