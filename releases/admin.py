from django.contrib import admin
from django.utils.html import format_html_join

from edge.admin import ReadOnlyAdmin, admin_actor, run_each
from environments import policy
from environments import selectors as env_selectors
from environments.services import deployment_request_next
from releases.models import Application, Build, BuildIssue, Implementer, Release, ReleaseIssue, VcsAlias
from releases.services import application_save, vcs_alias_add


@admin.register(Application)
class ApplicationAdmin(admin.ModelAdmin):
    list_display = ["name", "issue_key_prefix", "description"]
    search_fields = ["name", "issue_key_prefix"]

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        application_save(actor=admin_actor(request), application=obj)


class ReleaseIssueInline(admin.TabularInline):
    model = ReleaseIssue
    extra = 0
    can_delete = False
    fields = ["key"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class BuildIssueInline(ReleaseIssueInline):
    model = BuildIssue


@admin.register(Build)
class BuildAdmin(ReadOnlyAdmin):
    list_display = ["application", "number", "branch", "status", "tests_passed", "tests_failed", "created_at"]
    list_filter = ["application", "status"]
    search_fields = ["number", "commit", "branch"]
    list_select_related = ["application"]
    inlines = [BuildIssueInline]


class ImplementerInline(ReleaseIssueInline):
    model = Implementer
    fields = ["identity", "user"]


@admin.register(Release)
class ReleaseAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "build_number", "artifact_sha256_short", "issue_keys", "environments_reached",
                    "registered_at"]
    list_filter = ["application"]
    search_fields = ["version", "issues__key", "implementers__identity"]
    inlines = [ReleaseIssueInline, ImplementerInline]
    actions = ["request_next_environment"]
    readonly_fields = ["environments_reached"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("application", "build").prefetch_related(
            "issues", env_selectors.succeeded_deployments_prefetch())

    @admin.display(description="build")
    def build_number(self, obj):
        return obj.build.number

    @admin.display(description="sha256")
    def artifact_sha256_short(self, obj):
        return obj.artifact_sha256[:12]

    @admin.display(description="issues")
    def issue_keys(self, obj):
        return ", ".join(i.key for i in obj.issues.all())

    @admin.display(description="environments reached")
    def environments_reached(self, obj):
        names = env_selectors.environments_reached_by(obj)
        return format_html_join(", ", "{}", ((n,) for n in names)) or "-"

    def has_request_permission(self, request):
        return policy.may_request_somewhere(request.user)

    @admin.action(description="Request deployment to the next environment", permissions=["request"])
    def request_next_environment(self, request, queryset):
        actor = admin_actor(request)

        run_each(self, request, queryset, lambda release: deployment_request_next(actor=actor, release=release),
                 "deployment requested to the next environment.")


@admin.register(VcsAlias)
class VcsAliasAdmin(admin.ModelAdmin):
    """Aliases only make separation of duties stricter, so they are added here and never edited or removed."""

    list_display = ["identity", "user"]
    search_fields = ["identity", "user__username", "user__email"]
    autocomplete_fields = ["user"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        saved = vcs_alias_add(actor=admin_actor(request), user=obj.user, identity=obj.identity)
        obj.pk = saved.pk


admin.site.site_header = "Release Portal"
admin.site.site_title = "Release Portal"
admin.site.index_title = "Releases, environments and evidence"
