"""Build the trigram indexes the lists' searches read, where the migrations could not (docs/operating.md,
"Large tables"): the migrations environments/0012 and audit/0005 create PostgreSQL's pg_trgm first and,
where the database role may not, warn and go on without their indexes. Once someone allowed to has run
`CREATE EXTENSION pg_trgm`, this command builds the indexes those migrations define, CONCURRENTLY (the
portal's writers and the chain's appends go on meanwhile), and builds again one that a failed
concurrent build left invalid. Running it again changes nothing."""

import importlib
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

# The definitions are the migrations' own, so that what this builds is what a migration would have.
_LISTS = importlib.import_module("environments.migrations.0012_list_search_indexes")
_AUDIT = importlib.import_module("audit.migrations.0005_auditevent_search_index")


def search_indexes() -> list[tuple[str, str, str]]:
    """(index, table, indexed expression) of every trigram index the lists' searches read."""
    return [*((name, table, f"UPPER({column}::text)") for name, table, column in _LISTS.INDEXES),
            ("auditevent_search_trgm", "audit_auditevent", _AUDIT.SEARCH_TEXT_SQL)]


class Command(BaseCommand):
    help = ("Build the trigram indexes of the lists' searches that are missing or invalid (PostgreSQL, once "
            "pg_trgm can be created), concurrently: the portal keeps serving. Changes nothing where they are.")

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help="The database alias (default: default).")

    def handle(self, *args, database=DEFAULT_DB_ALIAS, **options):
        connection = connections[database]
        if connection.vendor != "postgresql":
            self.stdout.write(f"Nothing to build: the search indexes are PostgreSQL's (this database is "
                              f"{connection.vendor}, whose searches read the tables).")
            return
        with connection.cursor() as cursor:
            try:
                cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            except DatabaseError as exc:
                reason = str(exc).strip().splitlines()[0]
                raise CommandError(
                    f"pg_trgm cannot be created by the role {connection.settings_dict['USER']!r} ({reason}). As a "
                    f"PostgreSQL superuser run, in the database {connection.settings_dict['NAME']!r}: CREATE "
                    "EXTENSION pg_trgm; then run this command again.") from None
            built = []
            for name, table, expression in search_indexes():
                cursor.execute("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                               " WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
                               [name])
                row = cursor.fetchone()
                if row is not None and row[0]:
                    self.stdout.write(f"{name} on {table}: there already.")
                    continue
                if row is not None:  # left invalid by a concurrent build that failed: it serves nothing
                    self.stdout.write(f"{name} on {table}: invalid (a build that failed), dropped.")
                    cursor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                self.stdout.write(f"{name} on {table}: building (concurrently: the portal keeps serving)...")
                started = time.monotonic()
                cursor.execute(f"CREATE INDEX CONCURRENTLY {name} ON {table} USING gin (({expression}) gin_trgm_ops)")
                built.append(table)
                self.stdout.write(f"{name} on {table}: built in {time.monotonic() - started:.1f} s.")
            # The planner estimates what a search finds from the statistics of the indexed expression,
            # which ANALYZE gathers only once the index exists.
            for table in dict.fromkeys(built):
                cursor.execute(f"ANALYZE {table}")
        self.stdout.write(self.style.SUCCESS(
            f"{len(built)} index(es) built; the searches read them from now on." if built
            else "Every search index is there."))
