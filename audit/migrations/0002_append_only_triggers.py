from django.db import migrations

from audit.triggers import migration_operation


class Migration(migrations.Migration):
    """The database itself refuses UPDATE, DELETE and TRUNCATE on the audit chain and on
    django-auditlog's field history (PostgreSQL and SQLite)."""

    dependencies = [
        ("audit", "0001_initial"),
        ("auditlog", "0017_add_actor_email"),
    ]

    operations = [
        migration_operation("audit_auditevent"),
        migration_operation("auditlog_logentry"),
    ]
