import datetime as dt

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import connections
from django.db.models import Q, TextField, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Upper
from django.http import StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from audit import seal
from audit.downloads import zip_stream
from audit.models import AuditEvent
from edge.admin import DATE_INPUT, BoundedDaysForm, ReadOnlyAdmin, admin_actor
from edge.lists import IndexedValuesFilter, LargeTableAdmin, indexed_values, search_words
from evidence.reports import REPORTS, Export, Period
from releases.models import Application


class ReportForm(BoundedDaysForm):
    report = forms.ChoiceField(choices=[(r, r) for r in REPORTS])
    since = forms.DateField(widget=DATE_INPUT, help_text="First day (inclusive).")
    until = forms.DateField(widget=DATE_INPUT, help_text="Last day (inclusive).")
    application = forms.ModelChoiceField(Application.objects.all(), required=False, to_field_name="name")


# What the list's search reads on PostgreSQL: the searched columns, upper-cased, joined by a character
# nobody types (so that no word matches across two columns). Migration 0005 indexes exactly this
# expression with trigrams; tests/audit/test_search.py checks that the search's plan reads that index.
SEARCH_COLUMNS = ("actor_username", "object_repr", "object_id", "action", "code")
SEARCH_TEXT_SQL = "UPPER(" + " || chr(31) || ".join(f'"audit_auditevent"."{c}"' for c in SEARCH_COLUMNS) + ")"


# Where an event's actor acted (AuditEvent.via), as the audit list says it.
VIA_WORDS = {"admin": "in the admin", "api": "through the API", "command": "by a command", "task": "by a task",
             "auto": "automatically", "system": "by the portal"}


class CodeFilter(IndexedValuesFilter):
    """By refusal code; an event that is no refusal has none."""

    empty_label = "none (not a refusal)"


@admin.register(AuditEvent)
class AuditEventAdmin(LargeTableAdmin, ReadOnlyAdmin):
    """Read-only: the chain is written by services and verified by `verify_audit`. The list stays fast
    at millions of events (edge.lists): newest first from the seq index, filter choices and dates read
    from indexes, the count capped or estimated."""

    list_display = ["seq", "created_at", "who", "what", "code", "about"]
    list_filter = [("action", IndexedValuesFilter), ("code", CodeFilter), ("via", IndexedValuesFilter)]
    search_fields = list(SEARCH_COLUMNS)  # as the admin searches on SQLite; see get_search_results
    search_help_text = ("Who acted (a user name, ci:<token>, system), the object (MAC 1.4.0, a deployment's "
                        "number), an action (deployment.approve) or a refusal's rule (SOD_IMPLEMENTER_APPROVER). "
                        "Issue keys are found in Deployments and Releases.")
    date_hierarchy = "created_at"
    ordering = ["-seq"]
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice reads the whole table
    change_list_template = "admin/portal/large_change_list.html"

    def get_search_results(self, request, queryset, search_term):
        """The admin's search (each word somewhere in the person, the object, the action or the code, in
        any case), at millions of events on PostgreSQL: a search that is exactly an action or a refusal
        code (deployment.approve, SOD_IMPLEMENTER_APPROVER) finds the events of every action and code it
        is part of through their indexes (what else an action's name could be part of, an object's or
        a person's name, never holds one); any other words are looked for through the trigram index of the searched
        text (migration 0005) instead of reading every event. SQLite searches as the admin does."""
        term = search_term.strip()
        if not term or connections[queryset.db].vendor != "postgresql":
            return super().get_search_results(request, queryset, search_term)
        actions, codes = indexed_values(AuditEvent, "action", request), indexed_values(AuditEvent, "code", request)
        if term.lower() in actions or term.upper() in codes:
            # Every action and code it is part of (deployment.cancel: deployment.cancel_request too),
            # each read through its own index.
            return queryset.filter(Q(action__in=[a for a in actions if term.lower() in a.lower()])
                                   | Q(code__in=[c for c in codes if term.upper() in c.upper()])), False
        queryset = queryset.alias(search_text=RawSQL(SEARCH_TEXT_SQL, (), output_field=TextField()))
        for word in search_words(term):
            queryset = queryset.filter(search_text__contains=Upper(Value(word)))
        return queryset, False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields] + ["seal_check"]

    @admin.display(description="seal check")
    def seal_check(self, obj):
        return seal.says(obj.seal, obj.canonical, obj.seq, seal.keys())

    @admin.display(description="who (where)", ordering="actor_username")
    def who(self, obj):
        """"otto (in the admin)": where the person acted, in words no account could be named (an
        administrator's walk read "otto (admin)" as the account admin)."""
        where = VIA_WORDS.get(obj.via, obj.via)
        if account := (obj.data or {}).get("os_account"):  # a command's: whose shell ran it
            where = f"{where}: {account}"
        return f"{obj.actor_username} ({where})" if where else obj.actor_username

    @admin.display(description="object", ordering="object_repr")
    def about(self, obj):
        return obj.object_repr

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
