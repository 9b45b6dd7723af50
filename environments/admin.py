import copy

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, OuterRef, Subquery
from django.http import Http404, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from core.decisions import NotFound, PolicyRefusal
from edge.admin import Offer, ReadOnlyAdmin, admin_actor, call_service, confirm_with_comment, next_url, run_each
from environments import policy, selectors, services
from environments.models import (
    Approval,
    ControlChange,
    Deployment,
    Environment,
    FreezeWindow,
    NotificationChannel,
    NotificationDelivery,
)


class FreezeWindowInline(admin.TabularInline):
    """Freeze windows are saved and removed through the services (see EnvironmentAdmin.save_formset)."""

    model = FreezeWindow
    extra = 0
    fields = ["starts_at", "ends_at", "reason", "recurrence", "duration", "timezone"]


class EnvironmentForm(forms.ModelForm):
    change_reason = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Why. Required for a change that weakens a control of a restricted environment (it then waits "
                  "for a second administrator) and for shortening or ending a running freeze.",
    )

    class Meta:
        model = Environment
        fields = ["application", *services.SETTINGS_FIELDS]

    def clean(self):
        data = super().clean()
        if self.instance.pk and not data.get("change_reason", "").strip():
            before = Environment.objects.get(pk=self.instance.pk)
            after = copy.copy(before)
            for name, value in data.items():
                if name in services.SETTINGS_FIELDS:
                    setattr(after, name, value)
            if weaker := policy.weakened_controls(before, after):
                self.add_error("change_reason", "This weakens a control of a restricted environment ("
                               + ", ".join(sorted(weaker)) + "): say why; a second administrator must approve it.")
        return data


def access_rows(environment: Environment) -> list[tuple[str, str]]:
    """(who, permission) for every explicit grant on an environment: groups and users."""
    by_group, direct = policy.grants_on(environment)
    rows = [(f"group {g}", c) for g, c in by_group.values_list("group__name", "permission__codename")]
    rows += [(f"user {u}", c) for u, c in direct.values_list("user__username", "permission__codename")]
    return sorted(rows)


class AccessForm(forms.Form):
    permission = forms.ChoiceField(choices=[(c, c) for c in policy.GRANTABLE])
    group = forms.ModelChoiceField(queryset=Group.objects.order_by("name"), required=False)
    user = forms.ModelChoiceField(queryset=get_user_model().objects.order_by("username"), required=False)
    grant = forms.TypedChoiceField(choices=[("1", "grant"), ("0", "revoke")], coerce=lambda v: v == "1")

    def clean(self):
        data = super().clean()
        if bool(data.get("group")) == bool(data.get("user")):
            raise forms.ValidationError("Choose either a group or a user.")
        return data


@admin.register(Environment)
class EnvironmentAdmin(admin.ModelAdmin):
    list_display = ["__str__", "promotes_from", "restricted", "auto_deploy", "required_approvals",
                    "requires_code_review"]
    list_filter = ["application", "restricted"]
    list_select_related = ["application", "promotes_from__application"]
    readonly_fields = ["who_may_deploy_and_approve", "queue"]
    inlines = [FreezeWindowInline]
    form = EnvironmentForm

    def save_model(self, request, obj, form, change):
        result = services.environment_save(actor=admin_actor(request), environment=obj, changed=form.changed_data,
                                           reason=form.cleaned_data.get("change_reason", ""))
        if isinstance(result, ControlChange):
            request._portal_proposals = [*getattr(request, "_portal_proposals", []), result]

    def save_formset(self, request, form, formset, change):
        """Freeze windows through the services: audited, and a running one is only shortened or ended
        with a reason and a second administrator."""
        actor, reason = admin_actor(request), form.cleaned_data.get("change_reason", "")
        proposals = getattr(request, "_portal_proposals", [])
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []  # for the admin log
        for inline_form in formset.forms:
            if not inline_form.has_changed() and not formset._should_delete_form(inline_form):
                continue
            window = inline_form.instance
            try:
                if formset._should_delete_form(inline_form):
                    if window.pk:
                        result = services.freeze_window_end(actor=actor, window=window, reason=reason)
                    else:
                        continue
                else:
                    window.environment = form.instance
                    result = services.freeze_window_save(actor=actor, window=window, reason=reason)
            except PolicyRefusal as exc:
                self.message_user(request, f"Refused ({exc.refusal.code}). {exc.refusal.detail}", messages.ERROR)
                continue
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
                continue
            if isinstance(result, ControlChange):
                proposals.append(result)
        request._portal_proposals = proposals
        for proposal in proposals:
            self.message_user(
                request, f"Proposed, not applied yet: {proposal.summary()}. A different administrator must approve "
                f"it under Control changes.", messages.WARNING)

    @admin.display(description="queue")
    def queue(self, obj):
        if obj.pk is None:
            return "-"
        entries = selectors.environment_queues([obj.pk])[obj.pk]
        rows = format_html_join(
            "", '<li><a href="{}">#{}</a> {} {}{}</li>',
            ((reverse("admin:environments_deployment_change", args=[e["id"]]), e["id"], e["version"], e["state"],
              f": waiting for {e['waiting_for']}" if e["waiting_for"] else "") for e in entries),
        )
        return format_html("<ol>{}</ol>", rows) if entries else "empty"

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="who may deploy and approve")
    def who_may_deploy_and_approve(self, obj):
        if obj.pk is None:
            return "-"
        rows = format_html_join("", "<li>{}: {}</li>", access_rows(obj)) or "nobody"
        url = reverse("admin:environments_environment_access", args=[obj.pk])
        return format_html('<ul>{}</ul><a class="button" href="{}">Change access</a>', rows, url)

    def get_urls(self):
        return [
            path("<int:pk>/access/", self.admin_site.admin_view(self.access_view),
                 name="environments_environment_access"),
            *super().get_urls(),
        ]

    def access_view(self, request, pk):
        """Grant or revoke deploy/approve rights through the service (audited, no self-grants)."""
        environment = get_object_or_404(Environment, pk=pk)
        if not self.has_view_permission(request, environment):
            raise PermissionDenied  # who may change access is the policy's decision (decide_grant)
        form = AccessForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            d = form.cleaned_data
            call = services.environment_grant if d["grant"] else services.environment_revoke
            try:
                call(actor=admin_actor(request), environment=environment, codename=d["permission"],
                     user=d["user"], group=d["group"])
            except PolicyRefusal as exc:
                self.message_user(request, f"Refused ({exc.refusal.code}). {exc.refusal.detail}", messages.ERROR)
            else:
                self.message_user(request, "Access changed.", messages.SUCCESS)
                return redirect("admin:environments_environment_access", pk)
        context = {
            **self.admin_site.each_context(request), "title": f"Access to {environment}", "form": form,
            "environment": environment, "rows": access_rows(environment), "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/environments/environment/access.html", context)


class EnvironmentNameFilter(admin.AllValuesFieldListFilter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.title = "environment"


DEPLOYMENT_ACTIONS = {  # action -> (service, what the page says when it is done, a comment is required)
    "approve": (services.deployment_approve, "approved", False),
    "reject": (services.deployment_reject, "rejected", True),
    "cancel": (services.deployment_cancel, "cancelled", False),
    "review": (services.deployment_review, "reviewed", True),
}


def _outcome(deployment: Deployment, done: str) -> str:
    """What a person's decision did, in a few words: "approved, now running", "cancelled"."""
    state = deployment.get_state_display().lower()
    if done == "cancelled" and deployment.state == Deployment.State.RUNNING:
        return "cancel requested, the playbook is being stopped"
    return done if state == done else f"{done}, now {state}"


def deployment_offers(actor, deployment: Deployment) -> list[Offer]:
    """What a deployment's page may offer the person: the policy's own answers (decide_approval,
    decide_cancel, decide_review), only for the actions its state makes relevant."""
    offers = []
    if deployment.state == Deployment.State.AWAITING_APPROVAL:
        offers.append(Offer("approve", "Approve", policy.decide_approval(actor=actor, deployment=deployment,
                                                                         approve=True)))
        offers.append(Offer("reject", "Reject", policy.decide_approval(actor=actor, deployment=deployment,
                                                                       approve=False)))
    if deployment.state in Deployment.OPEN_STATES and not deployment.cancel_requested_at:
        offers.append(Offer("cancel", "Cancel", policy.decide_cancel(actor=actor, deployment=deployment)))
    if deployment.emergency and deployment.reviewed_at is None:
        offers.append(Offer("review", "Mark as reviewed", policy.decide_review(actor=actor, deployment=deployment)))
    return offers


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    """A deployment's page: its place in the queue, approvals, separation-of-duties checks, progress
    refreshed while it runs, the latest lines of its output log, and Approve / Reject / Cancel / Review
    where the policy allows them (the rule's sentence where it does not). Every change goes through a
    service; the list only shows."""

    list_display = ["id", "release_to_environment", "state_and_place", "requested_by_name", "requested_at",
                    "finished_at"]
    list_filter = ["state", "environment__application", ("environment__name", EnvironmentNameFilter), "emergency"]
    search_fields = ["release__version", "requested_by_label", "release__issues__key"]
    list_select_related = ["release__application", "environment", "reviewed_by"]
    date_hierarchy = "requested_at"
    actions = None

    def get_queryset(self, request):
        ahead = Deployment.objects.filter(
            environment=OuterRef("environment"), state=Deployment.State.QUEUED, queued_at__lte=OuterRef("queued_at"),
        ).values("environment").annotate(n=Count("id")).values("n")
        return super().get_queryset(request).annotate(queue_position=Subquery(ahead))

    @admin.display(description="state", ordering="state")
    def state_and_place(self, obj):
        """The state, with its place in the queue, what replaced it, the rule that refused it, or the
        emergency's review: one column, so that the list fits an analyst's screen."""
        label = obj.get_state_display()
        if obj.state == Deployment.State.QUEUED:
            label += f", {obj.queue_position or 1} in line"
        elif obj.state == Deployment.State.SUPERSEDED:
            label += f" by #{obj.superseded_by_id}"
        elif obj.state == Deployment.State.REFUSED:
            label += f" at start ({obj.refusal_code})"
        if obj.emergency:
            label += "; emergency, " + (f"reviewed by {obj.reviewed_by}" if obj.reviewed_at else "awaiting review")
        return label

    @admin.display(description="requested by", ordering="requested_by_label")
    def requested_by_name(self, obj):
        return obj.requested_by_label

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # every change is an action of the deployment's page, through a service

    @admin.display(description="deployment", ordering="release__version")
    def release_to_environment(self, obj):
        return f"{obj.release} to {obj.environment.name}"

    def get_urls(self):
        return [
            path("<int:pk>/act/", self.admin_site.admin_view(self.act_view), name="environments_deployment_act"),
            path("<int:pk>/live/", self.admin_site.admin_view(self.live_view), name="environments_deployment_live"),
            path("<int:pk>/log/", self.admin_site.admin_view(self.log_view), name="environments_deployment_log"),
            *super().get_urls(),
        ]

    def _viewable(self, request, pk) -> Deployment:
        try:
            deployment = selectors.deployment_get(int(pk))
        except (NotFound, ValueError):
            raise Http404(f"No deployment #{pk}.") from None
        if not self.has_view_permission(request, deployment):
            raise PermissionDenied
        return deployment

    def change_view(self, request, object_id, form_url="", extra_context=None):
        deployment = self._viewable(request, unquote(object_id))
        live = selectors.deployment_live(deployment)
        context = {
            **self.admin_site.each_context(request), "title": f"Deployment #{deployment.pk}", "opts": self.opts,
            "original": deployment, "deployment": deployment, "live": live,
            "offers": deployment_offers(admin_actor(request), deployment),
            "sod_checks": [sentence for name, sentence in policy.SOD_CHECKS.items() if name in deployment.sod_checks]
            + [name for name in deployment.sod_checks if name not in policy.SOD_CHECKS],
            "approved": sum(1 for a in deployment.approvals.all() if a.decision == Approval.Decision.APPROVE),
            "promoted_from": deployment.promoted_from_id and Deployment.objects.select_related("environment").filter(
                pk=deployment.promoted_from_id).first(),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/environments/deployment/page.html", context)

    def live_view(self, request, pk: int):
        """The deployment page's live part, as JSON (its script polls this while the deployment is open)."""
        return JsonResponse(selectors.deployment_live(self._viewable(request, pk)))

    def log_view(self, request, pk: int):
        """The whole output log as plain text."""
        deployment = self._viewable(request, pk)
        response = StreamingHttpResponse(selectors.deployment_log(deployment.pk),
                                         content_type="text/plain; charset=utf-8")
        response["Content-Disposition"] = f'inline; filename="deployment-{deployment.pk}.log"'
        return response

    def act_view(self, request, pk: int):
        """Approve, reject, cancel or review, through the service: it asks the policy again, so a forged
        or stale form is refused with the rule's sentence (and the refusal is in the audit chain)."""
        deployment = self._viewable(request, pk)
        page_url = reverse("admin:environments_deployment_change", args=[deployment.pk])
        if request.method != "POST":
            return redirect(page_url)
        back = next_url(request, page_url)
        action, comment = request.POST.get("action", ""), request.POST.get("comment", "").strip()
        if action not in DEPLOYMENT_ACTIONS:
            messages.error(request, "Unknown action.")
            return redirect(back)
        service, done, needs_comment = DEPLOYMENT_ACTIONS[action]
        if needs_comment and not comment:
            messages.error(request, f"Say why in the comment: a deployment is {done} with a comment.")
            return redirect(back)
        call_service(request, lambda: service(actor=admin_actor(request), deployment_id=deployment.pk,
                                              comment=comment),
                     lambda d: format_html('{} to {}: {}. <a href="{}">Follow deployment #{}</a>', d.release,
                                           d.environment.name, _outcome(d, done), page_url, d.pk))
        return redirect(back)


class NotificationChannelForm(forms.ModelForm):
    credential = forms.CharField(
        required=False, widget=forms.PasswordInput(render_value=False),
        help_text="Bearer token, or user:token for basic auth. Leave empty to keep the current one.",
    )

    class Meta:
        model = NotificationChannel
        fields = ["application", "kind", "url", "credential", "enabled"]

    def clean_credential(self):
        value = self.cleaned_data["credential"]
        return value or (self.instance.credential if self.instance.pk else "")


@admin.register(NotificationChannel)
class NotificationChannelAdmin(admin.ModelAdmin):
    """Where deployments are announced. The credential is write-only: no page renders it, to anyone;
    it shows as "set" / "not set" (a view-only page would print every field it lists in clear)."""

    form = NotificationChannelForm
    list_display = ["application", "kind", "url", "enabled", "credential_status"]
    list_filter = ["application", "kind", "enabled"]
    list_select_related = ["application"]
    readonly_fields = ["credential_status"]

    def get_fields(self, request, obj=None):
        may_write = self.has_change_permission(request, obj) if obj else self.has_add_permission(request)
        return ["application", "kind", "url", *(["credential"] if may_write else []), "credential_status",
                "enabled"]

    @admin.display(description="credential")
    def credential_status(self, obj):
        return "set" if obj is not None and obj.credential else "not set"

    def save_model(self, request, obj, form, change):
        services.notification_channel_save(actor=admin_actor(request), channel=obj)

    def has_delete_permission(self, request, obj=None):
        return False  # a channel is disabled (audited), never deleted with its delivery history


@admin.register(NotificationDelivery)
class NotificationDeliveryAdmin(ReadOnlyAdmin):
    list_display = ["sent_at", "channel", "deployment", "attempt", "status_code", "delivered", "error"]
    list_filter = ["delivered", "channel__kind"]
    list_select_related = ["channel__application", "deployment__release__application", "deployment__environment"]


@admin.register(ControlChange)
class ControlChangeAdmin(ReadOnlyAdmin):
    """Weaker controls wait here for a second administrator; approving applies them."""

    list_display = ["id", "environment", "what", "reason", "state", "proposed_by", "proposed_at", "decided_by",
                    "decided_at"]
    list_filter = ["state", "environment__application"]
    list_select_related = ["environment__application", "proposed_by", "decided_by"]
    actions = ["approve", "reject"]

    @admin.display(description="change")
    def what(self, obj):
        return obj.summary()

    def has_decide_permission(self, request):
        return request.user.has_perm("environments.change_environment")

    def _decide(self, request, queryset, *, action, title, service, done, required=False):
        comment = confirm_with_comment(self, request, queryset, action=action, title=title, required=required)
        if not isinstance(comment, str):
            return comment
        actor = admin_actor(request)
        run_each(self, request, queryset, lambda c: service(actor=actor, change_id=c.pk, comment=comment), done)
        return None

    @admin.action(description="Approve selected control changes (applies them)", permissions=["decide"])
    def approve(self, request, queryset):
        return self._decide(request, queryset, action="approve", title="Approve control changes",
                            service=services.control_change_approve, done="approved and applied.")

    @admin.action(description="Reject selected control changes", permissions=["decide"])
    def reject(self, request, queryset):
        return self._decide(request, queryset, action="reject", title="Reject control changes",
                            service=services.control_change_reject, done="rejected.", required=True)
