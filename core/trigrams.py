"""PostgreSQL's pg_trgm, which the lists' searches read their trigram indexes with (the migrations
environments/0012 and audit/0005)."""

import logging

from django.db import DatabaseError


def pg_trgm_available(schema_editor, without: str) -> bool:
    """Create the extension where it is missing; True if it is there. A role that may not create it
    (pg_trgm is trusted from PostgreSQL 13: CREATE on the database suffices) gets a warning saying
    `without` (what then reads its tables whole) and False: the migration goes on (inside a
    migration's transaction, the failed statement is rolled back to a savepoint)."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return False
    savepoint = connection.savepoint()  # None outside a transaction
    try:
        schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DatabaseError as exc:
        if savepoint:
            connection.savepoint_rollback(savepoint)
        logging.getLogger(__name__).warning("pg_trgm is not available (%s): %s.", exc, without)
        return False
    if savepoint:
        connection.savepoint_commit(savepoint)
    return True
