"""PostgreSQL: drop the `varchar_pattern_ops` twin Django builds beside the unique index of `hash`.

It serves only LIKE 'prefix%' searches, which nothing runs on a hash (the chain and the reports look a
hash up whole, through the unique index). It cost every append one more insert into a B-tree of random
keys, under the chain's lock, and 120 MB at a million events."""

from django.db import migrations

from core.pattern_indexes import drop_pattern_index


class Migration(migrations.Migration):

    atomic = False  # DROP INDEX CONCURRENTLY runs outside a transaction

    dependencies = [("audit", "0006_indexes_with_time")]

    # Django's name for the twin of the unique index on audit_auditevent.hash (0001).
    operations = [drop_pattern_index("audit_auditevent", "hash", "audit_auditevent_hash_d0c402da_like")]
