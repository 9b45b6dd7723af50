from django.db import migrations

from audit.triggers import migration_operation


class Migration(migrations.Migration):
    """An approval is a person's sign-off: the database refuses UPDATE, DELETE, TRUNCATE and (SQLite)
    an INSERT that would replace an existing row."""

    dependencies = [
        ("environments", "0007_control_changes_and_recurring_freezes"),
        ("audit", "0003_refuse_replacing_inserts"),
    ]

    operations = [migration_operation("environments_approval")]
