from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate

from audit import triggers


def _reinstall_append_only_triggers(sender, using="default", **kwargs):
    """SQLite drops a table's triggers when a migration rebuilds the table (most ALTERs do): after
    every migrate, the guarded tables that exist get their triggers again (idempotent)."""
    connection = connections[using]
    existing = set(connection.introspection.table_names())
    for table in triggers.GUARDED_TABLES:
        if table in existing:
            triggers.install(connection, table)


class AuditConfig(AppConfig):
    name = "audit"
    verbose_name = "Audit"

    def ready(self):
        from audit import field_history

        field_history.wire()
        post_migrate.connect(_reinstall_append_only_triggers, sender=self, dispatch_uid="audit.triggers")
