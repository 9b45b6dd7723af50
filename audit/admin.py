from django.contrib import admin

from audit.models import AuditEvent
from portal.admin_tools import ReadOnlyAdmin


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the chain is written by services and verified by `verify_audit`."""

    list_display = ["seq", "created_at", "actor_username", "via", "action", "code", "object_repr"]
    list_filter = ["action", "code", "via"]
    search_fields = ["actor_username", "object_repr", "object_id", "action", "code"]
    date_hierarchy = "created_at"
    ordering = ["-seq"]
    show_full_result_count = False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]
