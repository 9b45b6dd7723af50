from django.conf import settings
from django.db import models


class AppendOnlyError(Exception):
    """Raised when code tries to change or remove an audit event."""


class AuditEventQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError("Audit events cannot be updated.")

    def delete(self):
        raise AppendOnlyError("Audit events cannot be deleted.")

    def bulk_update(self, *args, **kwargs):
        raise AppendOnlyError("Audit events cannot be updated.")


class AuditEvent(models.Model):
    """One link of the append-only, hash-chained audit log.

    `hash` is SHA-256 over the previous event's hash and the canonical JSON of this event
    (see audit.chain.canonical), so changing, removing or reordering any event breaks every later
    link. Events are written only by audit.chain.append, inside the transaction of the change they
    record; triggers installed by migration 0002 refuse UPDATE, DELETE and TRUNCATE in the database.
    """

    seq = models.BigIntegerField(unique=True, help_text="Gap-free position in the chain, from 1.")
    created_at = models.DateTimeField(db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    actor_username = models.CharField(max_length=150, blank=True)
    actor_email = models.CharField(max_length=254, blank=True)
    via = models.CharField(max_length=20, blank=True)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=300, blank=True)
    code = models.CharField(max_length=64, blank=True, help_text="Refusal code, if refused.")
    data = models.JSONField(default=dict)
    canonical = models.TextField(help_text="The exact text that was hashed (see audit.chain.canonical).")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)
    # Null where the portal wrote it without a seal key (and every event before the key was set);
    # nullable so that adding it to a chain of events needs no rewrite of the table (audit/seal.py).
    seal = models.CharField(max_length=90, null=True, blank=True,
                            help_text="key id.nonce:HMAC of the event by the portal's seal key (audit.seal).")

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["seq"]
        permissions = [("export_reports", "Can export SOX reports and the audit log")]
        constraints = [
            models.CheckConstraint(condition=models.Q(seq__gte=1), name="auditevent_seq_positive"),
            # An event copied with its seal to the head is refused (audit/seal.py). Partial: an index
            # of its own on both databases, where SQLite would remake the table for a plain one.
            models.UniqueConstraint(fields=["seal"], condition=models.Q(seal__isnull=False),
                                    name="auditevent_seal_unique"),
        ]
        indexes = [
            models.Index(fields=["object_type", "object_id"], name="auditevent_object_idx"),
            # The list's filters walk these for their choices (edge.lists.IndexedValuesFilter), and a
            # filtered list's first and last time are read from them (its date hierarchy) rather than
            # by walking the time index until an event of a rare action, code or channel turns up.
            models.Index(fields=["action", "created_at"], name="auditevent_action_time_idx"),
            models.Index(fields=["code", "created_at"], name="auditevent_code_time_idx"),
            models.Index(fields=["via", "created_at"], name="auditevent_via_time_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} {self.object_repr}".strip()

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise AppendOnlyError("Audit events cannot be updated.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("Audit events cannot be deleted.")
