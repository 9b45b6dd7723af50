from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.db import connections
from django.db.models.signals import post_migrate

from audit import seal, triggers


def _reinstall_append_only_triggers(sender, using="default", **kwargs):
    """SQLite drops a table's triggers when a migration rebuilds the table (most ALTERs do): after
    every migrate, the guarded tables that exist get their triggers again (idempotent)."""
    connection = connections[using]
    existing = set(connection.introspection.table_names())
    for table in triggers.GUARDED_TABLES:
        if table in existing:
            triggers.install(connection, table)


def _seal_key_set(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """`check --deploy`: a portal that seals no event cannot tell its own events from ones appended by
    whoever can write the database (audit/seal.py)."""
    if seal.sealing_with_demo_key():
        return [checks.Warning(
            "The audit seal key is the demo's (PORTAL_DEMO or PORTAL_DEBUG without a key): it is public, so it "
            "seals nothing.", hint="Set PORTAL_AUDIT_SEAL_KEY_FILE (docs/operating.md).", id="audit.W002")]
    if settings.PORTAL_AUDIT_SEAL_KEY is not None:
        return []
    return [checks.Warning(
        "No audit seal key: the events the portal writes are not sealed, so an event appended by whoever can "
        "write the database cannot be told from the portal's own.",
        hint="Set PORTAL_AUDIT_SEAL_KEY_FILE (or PORTAL_AUDIT_SEAL_KEY) on every machine that serves or runs the "
             "portal, to a key kept off the database and its backups (docs/operating.md).",
        id="audit.W001",
    )]


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit"

    def ready(self):
        from audit import field_history

        field_history.wire()
        checks.register(_seal_key_set, checks.Tags.security, deploy=True)
        post_migrate.connect(_reinstall_append_only_triggers, sender=self, dispatch_uid="audit.triggers")
