from django.db import migrations

from audit.triggers import migration_operation


class Migration(migrations.Migration):
    """A release never changes after registration: the database refuses UPDATE and DELETE."""

    dependencies = [
        ("releases", "0001_initial"),
        ("audit", "0002_append_only_triggers"),
    ]

    operations = [migration_operation("releases_release")]
