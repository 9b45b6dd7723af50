"""PostgreSQL's pg_trgm, which the lists' searches read their trigram indexes with (the migrations
environments/0012 and audit/0005)."""

import logging

from django.db import DatabaseError, transaction


def pg_trgm_available(schema_editor, without: str) -> bool:
    """Create the extension where it is missing; True if it is there. A role that may not create it
    (pg_trgm is trusted from PostgreSQL 13: CREATE on the database suffices) gets a warning saying
    `without` (what then reads its tables whole) and False: the migration goes on."""
    if schema_editor.connection.vendor != "postgresql":
        return False
    try:
        with transaction.atomic(using=schema_editor.connection.alias):
            schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DatabaseError as exc:
        logging.getLogger(__name__).warning("pg_trgm is not available (%s): %s.", exc, without)
        return False
    return True
