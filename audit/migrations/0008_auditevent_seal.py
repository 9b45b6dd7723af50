"""Seals (audit/seal.py): a nullable column, so that neither database rewrites the table to add it
(SQLite would remake it, and the remade table would lose its append-only triggers), and seals
unique (an event copied with its seal is refused)."""

from django.db import migrations, models

from audit.triggers import keep_seals, migration_operation


class Migration(migrations.Migration):

    dependencies = [("audit", "0007_drop_hash_pattern_index")]

    operations = [
        migrations.AddField(
            model_name="auditevent",
            name="seal",
            field=models.CharField(blank=True, help_text="nonce:HMAC of the event by the portal's seal key (audit.seal).",
                                   max_length=81, null=True),
        ),
        migrations.AddConstraint(
            model_name="auditevent",
            constraint=models.UniqueConstraint(condition=models.Q(("seal__isnull", False)), fields=("seal",),
                                               name="auditevent_seal_unique"),
        ),
        # SQLite's guard against replacing inserts refuses a second row of each unique key: seals now too.
        migration_operation("audit_auditevent", reinstall=True),
        keep_seals(),  # migrated back, first: refused over sealed events
    ]
