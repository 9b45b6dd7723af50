from django.db import migrations

from audit.triggers import migration_operation


class Migration(migrations.Migration):
    """SQLite: an INSERT over an existing row (INSERT OR REPLACE, REPLACE INTO) would delete the old
    event without firing the DELETE trigger; the reinstalled triggers refuse it."""

    dependencies = [
        ("audit", "0002_append_only_triggers"),
    ]

    operations = [
        migration_operation("audit_auditevent", reinstall=True),
        migration_operation("auditlog_logentry", reinstall=True),
    ]
