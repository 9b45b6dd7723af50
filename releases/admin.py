from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html_join

from core.decisions import PolicyRefusal
from edge.admin import Offer, OutcomeAdmin, ReadOnlyAdmin, admin_actor, call_service, refusal_message
from edge.lists import LargeTableAdmin, ReleaseSearch
from environments import policy
from environments import selectors as env_selectors
from environments.models import Environment
from environments.services import deployment_request
from releases.models import Application, Build, BuildIssue, Release, VcsAlias
from releases.services import application_save, vcs_alias_add


@admin.register(Application)
class ApplicationAdmin(admin.ModelAdmin):
    list_display = ["name", "issue_key_prefix", "issue_url_pattern", "description"]
    search_fields = ["name", "issue_key_prefix"]

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        application_save(actor=admin_actor(request), application=obj)


class BuildIssueInline(admin.TabularInline):
    """The issue keys named in a build's branch (read only, like the build)."""

    model = BuildIssue
    extra = 0
    can_delete = False
    fields = ["key"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Build)
class BuildAdmin(ReadOnlyAdmin):
    list_display = ["application", "build_number", "branch", "status", "tests_passed", "tests_failed", "created_at"]
    list_filter = ["application", "status"]
    search_fields = ["number", "commit", "branch"]
    list_select_related = ["application"]
    inlines = [BuildIssueInline]

    @admin.display(description="number", ordering="id")  # registration order: numbers as text put 10 before 9
    def build_number(self, obj):
        return obj.number


class ReleaseChangeList(ChangeList):
    """The releases list: each row says where the release runs now (not only where it has been)."""

    def get_results(self, request):
        super().get_results(request)
        releases = list(self.result_list)
        environments = Environment.objects.filter(application_id__in={r.application_id for r in releases})
        ordered = {e.pk: e for e in env_selectors.in_promotion_order(environments)}
        current = env_selectors.current_deployments(list(ordered))
        runs_in: dict[int, list[str]] = {}
        for environment_id in ordered:
            if (deployment := current.get(environment_id)) is not None:
                runs_in.setdefault(deployment.release_id, []).append(ordered[environment_id].name)
        for release in releases:
            release.runs_in = runs_in.get(release.pk, [])


class DeployForm(forms.Form):
    environment = forms.ModelChoiceField(queryset=Environment.objects.none())
    emergency_reason = forms.CharField(required=False, max_length=2000)

    def __init__(self, *args, release: Release, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["environment"].queryset = Environment.objects.filter(application_id=release.application_id)


@admin.register(Release)
class ReleaseAdmin(LargeTableAdmin, ReleaseSearch, ReadOnlyAdmin):
    """A release's page shows its timeline and, per environment of its path, "Deploy to …" when the
    policy allows the signed-in person to request it now, or the rule's sentence when it does not.
    The list's search takes an issue key as one (the releases carrying exactly that key)."""

    list_display = ["__str__", "build_number", "issue_keys", "runs_in", "environments_reached", "registered_at"]
    list_filter = ["application"]
    search_fields = ["version", "issues__key", "implementers__identity"]  # searched by ReleaseSearch
    release_path = "pk"
    release_search = ("version", "issue_keys", "implementers")
    search_help_text = "An issue key, a version, an implementer, or the application by name."

    def named(self):
        return {"application__name": {n.lower() for n in Application.objects.values_list("name", flat=True)}}
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice reads the whole table

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("application", "build").prefetch_related(
            "issues", env_selectors.succeeded_deployments_prefetch())

    def get_changelist(self, request, **kwargs):
        return ReleaseChangeList

    @admin.display(description="build", ordering="build_id")  # registration order: numbers as text put 10 before 9
    def build_number(self, obj):
        return obj.build.number

    @admin.display(description="issues")
    def issue_keys(self, obj):
        return format_html_join(", ", '<a href="{}">{}</a>', (
            (reverse("admin:change_journey", args=[i.key]), i.key) for i in obj.issues.all()))

    @admin.display(description="runs in now")
    def runs_in(self, obj):
        return ", ".join(getattr(obj, "runs_in", [])) or "-"

    @admin.display(description="has reached")
    def environments_reached(self, obj):
        return ", ".join(env_selectors.environments_reached_by(obj)) or "-"

    def get_urls(self):
        return [
            path("<int:pk>/deploy/", self.admin_site.admin_view(self.deploy_view), name="releases_release_deploy"),
            *super().get_urls(),
        ]

    def offers(self, request, page: dict) -> list[Offer]:
        """Per environment of the path: may this person request the release there now? The policy's
        own answer (decide_request), so a button is never refused and a refusal is the rule's sentence.
        Under a freeze, a releaser is offered an emergency deployment when the policy would allow it."""
        actor, release = admin_actor(request), page["release"]
        offers = []
        for environment in page["environments"]:
            decision = policy.decide_request(actor=actor, release=release, environment=environment)
            offers.append(Offer("deploy", f"Deploy to {environment.name}", decision, environment))
            if policy.only_an_emergency_may_go(decision):
                emergency = policy.decide_request(actor=actor, release=release, environment=environment,
                                                  emergency_reason="a reason stated on the page")
                if emergency.allowed:
                    nobody = not policy.possible_reviewers(release, environment, actor.user.pk)
                    offers.append(Offer("emergency", f"Emergency deployment to {environment.name}", emergency,
                                        environment, note=(
                        f"Nobody could review it afterwards: every other releaser of {environment} implemented "
                        "this change. It would stay an open exception until an administrator gives the approve "
                        f"permission on {environment} to another person." if nobody else "")))
        return offers

    def change_view(self, request, object_id, form_url="", extra_context=None):
        release = self.get_object(request, unquote(object_id))
        if release is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_permission(request, release):
            raise PermissionDenied
        page = env_selectors.release_page(release.pk)
        offers = self.offers(request, page)
        for standing in page["standing"]:
            standing["offers"] = [o for o in offers if o.target == standing["environment"]]
            # before the click: a deployment offered here would take the environment back to an older release
            now = standing["current"]
            standing["rolls_back_from"] = now.release if policy.is_rollback(release.pk, now and now.release_id) and any(
                o.allowed for o in standing["offers"]) else None
        release = page["release"]
        context = {
            **self.admin_site.each_context(request), "title": str(release), "opts": self.opts, "original": release,
            "page": page, "release": release,
            "issues": [(i.key, release.application.issue_url(i.key)) for i in release.issues.all()],
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/releases/release/page.html", context)

    def deploy_view(self, request, pk: int):
        """Request a deployment of the release to one environment, through the service (which asks the
        policy again: a forged or stale form is refused with the rule's sentence, and audited)."""
        release = get_object_or_404(Release.objects.select_related("application"), pk=pk)
        page_url = reverse("admin:releases_release_change", args=[release.pk])
        if not self.has_view_permission(request, release):
            raise PermissionDenied
        if request.method != "POST":
            return redirect(page_url)
        form = DeployForm(request.POST, release=release)
        if not form.is_valid():  # say what was wrong: the environment, or the emergency's reason
            messages.error(request, " ".join(
                "Choose an environment of this release's application." if name == "environment"
                else f"The emergency's reason: {' '.join(errors)}" for name, errors in form.errors.items()))
            return redirect(page_url)
        environment = form.cleaned_data["environment"]
        reason = form.cleaned_data["emergency_reason"].strip()
        if "emergency" in request.POST and not reason:
            messages.error(request, "An emergency deployment needs its reason.")
            return redirect(page_url)
        deployment = call_service(
            request, lambda: deployment_request(actor=admin_actor(request), release=release, environment=environment,
                                                emergency_reason=reason),
            lambda d: f"{release} requested for {environment.name} (#{d.pk}): {d.get_state_display().lower()}.",
        )
        if deployment is None:
            return redirect(page_url)
        return redirect("admin:environments_deployment_change", deployment.pk)


@admin.register(VcsAlias)
class VcsAliasAdmin(OutcomeAdmin):
    """Aliases only make separation of duties stricter, so they are added here and never edited or removed."""

    list_display = ["identity", "user"]
    search_fields = ["identity", "user__username", "user__email"]
    autocomplete_fields = ["user"]

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        try:
            saved = vcs_alias_add(actor=admin_actor(request), user=obj.user, identity=obj.identity)
        except PolicyRefusal as exc:  # on record; the admin's transaction commits the refusal
            self.not_applied(request, refusal_message(exc.refusal))
        else:
            obj.pk = saved.pk

