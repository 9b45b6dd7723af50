from django.db import migrations

from audit.triggers import migration_operation


class Migration(migrations.Migration):
    """A release's issue keys and implementers are evidence like the release itself: the database
    refuses UPDATE, DELETE, TRUNCATE and (SQLite) an INSERT that would replace an existing row."""

    dependencies = [
        ("releases", "0003_labels"),
        ("audit", "0003_refuse_replacing_inserts"),
    ]

    operations = [
        migration_operation("releases_release", reinstall=True),
        migration_operation("releases_releaseissue"),
        migration_operation("releases_implementer"),
    ]
