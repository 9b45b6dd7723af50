import datetime as dt

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from audit.downloads import zip_stream
from audit.models import AuditEvent
from edge.admin import ReadOnlyAdmin, admin_actor
from edge.lists import IndexedValuesFilter, LargeTablePaginator
from evidence.reports import REPORTS, Export, Period
from releases.models import Application


class ReportForm(forms.Form):
    report = forms.ChoiceField(choices=[(r, r) for r in REPORTS])
    since = forms.DateField(help_text="First day (inclusive), YYYY-MM-DD.")
    until = forms.DateField(help_text="Last day (inclusive), YYYY-MM-DD.")
    application = forms.ModelChoiceField(Application.objects.all(), required=False, to_field_name="name")

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["until"] < data["since"]:
            raise forms.ValidationError("The last day comes before the first.")
        return data


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the chain is written by services and verified by `verify_audit`. The list stays fast
    at millions of events (edge.lists): newest first from the seq index, filter choices and dates read
    from indexes, the count capped or estimated."""

    list_display = ["seq", "created_at", "who", "what", "code", "object_repr"]
    list_filter = [("action", IndexedValuesFilter), ("code", IndexedValuesFilter), ("via", IndexedValuesFilter)]
    search_fields = ["actor_username", "object_repr", "object_id", "action", "code"]
    date_hierarchy = "created_at"
    ordering = ["-seq"]
    paginator = LargeTablePaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice reads the whole table
    change_list_template = "admin/portal/large_change_list.html"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    @admin.display(description="who (via)", ordering="actor_username")
    def who(self, obj):
        return f"{obj.actor_username} ({obj.via})" if obj.via else obj.actor_username

    @admin.display(description="action", ordering="action")
    def what(self, obj):
        """The action, and how it ended where the action alone does not say (a deployment's finish)."""
        result = (obj.data or {}).get("result") if obj.action == "deployment.finish" else None
        return f"{obj.action}: {result}" if result else obj.action

    def get_urls(self):
        return [path("reports/", self.admin_site.admin_view(self.reports_view), name="audit_reports"),
                *super().get_urls()]

    def reports_view(self, request):
        """SOX reports for auditors: a ZIP with the CSV and its manifest, streamed with flat memory."""
        if not request.user.has_perm("audit.export_reports"):
            raise PermissionDenied
        today = timezone.now().date()
        form = ReportForm(request.GET if "report" in request.GET else None,
                          initial={"since": today.replace(day=1), "until": today})
        if form.is_bound and form.is_valid():
            d = form.cleaned_data
            period = Period(
                dt.datetime.combine(d["since"], dt.time(), tzinfo=dt.UTC),
                dt.datetime.combine(d["until"] + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC),
                d["application"].name if d["application"] else None,
            )
            basename = f"{d['report']}-{d['since']:%Y%m%d}-{d['until']:%Y%m%d}"
            export = Export(d["report"], period, admin_actor(request))
            response = StreamingHttpResponse(zip_stream(export, basename), content_type="application/zip")
            response["Content-Disposition"] = f'attachment; filename="{basename}.zip"'
            return response
        context = {**self.admin_site.each_context(request), "title": "SOX reports", "form": form,
                   "opts": self.model._meta, "reports": REPORTS}
        return TemplateResponse(request, "admin/audit/reports.html", context)
