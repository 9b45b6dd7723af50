import copy
import csv
import datetime as dt
import io
from collections import defaultdict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models
from django.db.models import Count, OuterRef, Q, Subquery
from django.http import Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from core.decisions import NotFound, PolicyRefusal
from edge import charts
from edge.admin import (
    DATE_INPUT,
    BoundedDaysForm,
    Offer,
    OutcomeAdmin,
    ReadOnlyAdmin,
    admin_actor,
    call_service,
    confirm_with_comment,
    next_url,
    offer_only,
    refusal_message,
    run_each,
)
from edge.lists import Found, LargeTableAdmin, ReleaseSearch
from edge.templatetags import THE_PORTAL, asked_by_the_portal, moment, requester
from environments import metrics, policy, selectors, services
from environments.models import (
    FREEZE_PRESETS,
    MONTH_END_RULE,
    WEEKEND_RULE,
    Approval,
    ControlChange,
    Deployment,
    Environment,
    FreezeWindow,
    NotificationChannel,
    NotificationDelivery,
)
from evidence.reports import safe_cell
from releases.models import Application


class FreezeWindowInline(admin.TabularInline):
    """Freeze windows are saved and removed through the services (see EnvironmentAdmin.save_formset)."""

    model = FreezeWindow
    extra = 0
    fields = ["starts_at", "ends_at", "reason", "recurrence", "duration", "timezone"]
    # narrower inputs than the admin's default, so that the row fits beside the form on a laptop screen
    formfield_overrides = {models.CharField: {"widget": forms.TextInput(attrs={"size": 16})},
                           models.DurationField: {"widget": forms.TextInput(attrs={"size": 9})}}


def change_reason_field(help_text: str) -> forms.CharField:
    """The reason a settings form asks for a change that a second administrator must approve."""
    return forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text=help_text)


class EnvironmentForm(forms.ModelForm):
    change_reason = change_reason_field(
        "Why. Required for a change that weakens a control of a restricted environment (it then waits for a "
        "second administrator) and for shortening or ending a running freeze.")

    class Meta:
        model = Environment
        fields = ["application", *services.SETTINGS_FIELDS]

    def _post_clean(self):
        """Once the settings are valid (the model's own checks ran: a restricted environment needs an
        approval, say), a change that weakens a control asks for its reason; an invalid one is not
        asked for a reason it could never be proposed with."""
        super()._post_clean()
        data = self.cleaned_data
        if self._errors or not self.instance.pk or data.get("change_reason", "").strip():
            return
        before = Environment.objects.get(pk=self.instance.pk)
        after = copy.copy(before)
        for name, value in data.items():
            if name in services.SETTINGS_FIELDS:
                setattr(after, name, value)
        if weaker := policy.weakened_controls(before, after):
            self.add_error("change_reason", "This weakens a control of a restricted environment or its path ("
                           + ", ".join(sorted(weaker)) + "): say why; a second administrator must approve it.")


# --- freeze windows as analysts plan them -------------------------------------------------------------

class FreezeWindowForm(forms.ModelForm):
    preset = forms.ChoiceField(
        required=False, choices=[("", "none: a one-off window, or the rule typed below"),
                                 *((name, label) for name, (label, *_rest) in FREEZE_PRESETS.items())],
        help_text="Fills the rule, the length and (for the weekend) the time zone.",
    )
    change_reason = change_reason_field(
        "Why. Required to shorten or end a freeze while it holds (a second administrator then approves it under "
        "Control changes).")

    class Meta:
        model = FreezeWindow
        fields = ["environment", "application", "reason", "preset", "starts_at", "ends_at", "recurrence", "duration",
                  "timezone", "change_reason"]
        help_texts = {
            "environment": "Freeze one environment, or leave empty and choose an application below.",
            "starts_at": "One-off: when it begins (UTC). Recurring: when the series begins; the rule's times are "
                         "read in the time zone below.",
            "ends_at": "One-off: when it ends (UTC). Recurring: when the series stops.",
            "recurrence": (
                "Empty for a one-off window. An iCalendar RRULE read in the time zone below. Presets: every Friday "
                f"16:00 to Monday 06:00 Europe/Berlin is {WEEKEND_RULE} with a length of 2 days, 14:00:00 (62 "
                f"hours) in Europe/Berlin; the last 2 working days of the month is {MONTH_END_RULE} with a length "
                "of 1 day."),
            "duration": "Recurring: the length of each occurrence in wall-clock time, e.g. 62:00:00 or "
                        "\"2 14:00:00\" (Friday 16:00 to Monday 06:00), \"1 00:00:00\" (a whole day).",
            "timezone": "IANA time zone the rule is read in, e.g. Europe/Berlin (daylight saving follows it).",
        }

    def clean(self):
        data = super().clean()
        if preset := FREEZE_PRESETS.get(data.get("preset") or ""):
            _label, data["recurrence"], data["duration"], zone = preset
            if zone:
                data["timezone"] = zone
            for name in ("recurrence", "duration", "timezone"):
                self.errors.pop(name, None)
        if self.instance.pk and not data.get("change_reason", "").strip():
            before = FreezeWindow.objects.get(pk=self.instance.pk)
            after = copy.copy(before)
            for name in ("environment", "application", "starts_at", "ends_at", "recurrence", "duration",
                         "timezone", "reason"):
                if name in data:
                    setattr(after, name, data[name])
            try:
                weaker = policy.freeze_weakened(before, after)
            except (TypeError, ValueError, KeyError):  # an invalid rule or zone: the model names it
                weaker = {}
            if weaker:
                self.add_error("change_reason", "This freeze holds now and would end sooner: say why; a second "
                                                "administrator must approve it.")
        return data


class FreezeApplicationFilter(admin.SimpleListFilter):
    title = "application"
    parameter_name = "application"

    def lookups(self, request, model_admin):
        return [(a.name, a.name) for a in Application.objects.order_by("name")]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(Q(environment__application__name=self.value()) | Q(application__name=self.value()))
        return queryset


def _in_utc_and_local(when: dt.datetime | None, zone: str) -> str:
    """A freeze's time in UTC, as every page writes times, and in its own time zone where that is another
    (a close that starts at midnight in Berlin starts at 23:00 UTC the day before)."""
    utc = moment(when)
    if when is None or zone in ("UTC", "Etc/UTC"):
        return utc
    try:
        return f"{utc} ({when.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M} {zone})"
    except (ValueError, ZoneInfoNotFoundError):
        return utc


@admin.register(FreezeWindow)
class FreezeWindowAdmin(OutcomeAdmin):
    """Freeze windows planned ahead, one-off or recurring. Saving and ending go through the services:
    audited, and a freeze that holds now is shortened or ended only with a reason and a second
    administrator (the change becomes a proposal under Control changes)."""

    form = FreezeWindowForm
    outcome_url = "admin:environments_freezewindow_changelist"
    list_display = ["target", "schedule", "reason", "starts", "ends", "holds_now"]
    list_filter = [FreezeApplicationFilter]
    list_select_related = ["environment__application", "application"]
    search_fields = ["reason"]
    actions = ["end_or_remove"]
    change_list_template = "admin/environments/freezewindow/change_list.html"
    fieldsets = [
        (None, {"fields": ["environment", "application", "reason"]}),
        ("When", {"fields": ["preset", "starts_at", "ends_at", "recurrence", "duration", "timezone"]}),
        ("Changing a freeze that holds now", {"fields": ["change_reason"]}),
    ]

    class Media:
        css = {"all": ["environments/metrics.css"]}

    @admin.display(description="frozen")
    def target(self, obj):
        return obj.environment or f"{obj.application} (all environments)"

    @admin.display(description="schedule")
    def schedule(self, obj):
        return obj.schedule

    @admin.display(description="starts", ordering="starts_at")
    def starts(self, obj):
        return _in_utc_and_local(obj.starts_at, obj.timezone)

    @admin.display(description="ends", ordering="ends_at")
    def ends(self, obj):
        return _in_utc_and_local(obj.ends_at, obj.timezone)

    @admin.display(description="holds now")
    def holds_now(self, obj):
        occurrence = obj.active_at(timezone.now())
        return f"until {occurrence.ends_at:%Y-%m-%d %H:%M} UTC" if occurrence else ""

    def has_delete_permission(self, request, obj=None):
        return False  # ending a freeze is the action below, through the service

    def has_end_permission(self, request):
        return request.user.has_perm("environments.delete_freezewindow")

    def save_model(self, request, obj, form, change):
        try:
            result = services.freeze_window_save(actor=admin_actor(request), window=obj,
                                                 reason=form.cleaned_data.get("change_reason", ""))
        except PolicyRefusal as exc:
            self.not_applied(request, refusal_message(exc.refusal))
        except ValidationError as exc:
            self.not_applied(request, " ".join(exc.messages))
        else:
            if isinstance(result, ControlChange):
                self.not_applied(request, _proposed(result), messages.WARNING)

    @admin.action(description="End or remove selected freeze windows", permissions=["end"])
    def end_or_remove(self, request, queryset):
        windows = list(queryset.select_related("environment__application", "application"))
        now = timezone.now()
        holding = [w for w in windows if w.active_at(now) is not None]
        reason = confirm_with_comment(
            self, request, queryset, action="end_or_remove", title="End or remove freeze windows",
            required=bool(holding), label="Reason" + (
                f" ({len(holding)} of these hold now: they end only when a second administrator approves)"
                if holding else ""))
        if not isinstance(reason, str):
            return reason
        actor = admin_actor(request)
        for window in windows:
            try:
                result = services.freeze_window_end(actor=actor, window=window, reason=reason)
            except PolicyRefusal as exc:
                self.message_user(request, refusal_message(exc.refusal, window),
                                  messages.ERROR)
            except ValidationError as exc:
                self.message_user(request, f"{window}: {' '.join(exc.messages)}", messages.ERROR)
            else:
                if isinstance(result, ControlChange):
                    self.message_user(request, f"{window}: {_proposed(result)}", messages.WARNING)
                else:
                    self.message_user(request, f"{window}: removed.", messages.SUCCESS)
        return None


def _proposed(change: ControlChange) -> str:
    return (f"Proposed, not applied yet: {change.summary()}. A different administrator must approve it under "
            "Control changes.")


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

    def __init__(self, *args, actor, environment, **kwargs):
        """Offers only the users and groups whose rights the policy lets this person change (no self-grant:
        the decide_grant the service asks), saying under each choice whom it leaves out and why."""
        super().__init__(*args, **kwargs)
        # what the policy reads of the person, read once for every user and group asked about below
        made = policy.accounts_made_by(actor)
        mine = set(actor.user.groups.values_list("pk", flat=True)) if actor.is_person else set()
        made_in = defaultdict(set)  # each group's members among the accounts this person made
        for group_id, user_id in Group.user_set.through.objects.filter(user_id__in=made).values_list(
                "group_id", "user_id"):
            made_in[group_id].add(user_id)
        asked = {
            "user": lambda u: policy.decide_grant(actor=actor, environment=environment, user=u, made=made),
            "group": lambda g: policy.decide_grant(actor=actor, environment=environment, group=g,
                                                   made=frozenset(made_in[g.pk]), belongs=g.pk in mine),
        }
        for name, decide in asked.items():
            refused = {obj: r for obj in self.fields[name].queryset if (r := decide(obj).refusal) is not None}
            offer_only(self.fields[name], refused)

    def clean(self):
        data = super().clean()
        if bool(data.get("group")) == bool(data.get("user")):
            raise forms.ValidationError("Choose either a group or a user.")
        return data


@admin.register(Environment)
class EnvironmentAdmin(OutcomeAdmin):
    list_display = ["__str__", "promotes_from", "restricted", "auto_deploy", "required_approvals",
                    "requires_code_review"]
    list_filter = ["application", "restricted"]
    list_select_related = ["application", "promotes_from__application"]
    readonly_fields = ["who_may_deploy_and_approve", "queue"]

    def get_readonly_fields(self, request, obj=None):
        """An environment stays with its application (environment_save refuses a move)."""
        return [*self.readonly_fields, "application"] if obj is not None else self.readonly_fields

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        return ["application", *(f for f in fields if f != "application")]  # first, editable or not
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
                self.not_applied(request, refusal_message(exc.refusal))
                continue
            except ValidationError as exc:
                self.not_applied(request, " ".join(exc.messages))
                continue
            if isinstance(result, ControlChange):
                proposals.append(result)
        request._portal_proposals = proposals
        for proposal in proposals:
            self.not_applied(request, _proposed(proposal), messages.WARNING)

    @admin.display(description="queue")
    def queue(self, obj):
        if obj.pk is None:
            return "-"
        entries = selectors.environment_queues([obj.pk])[obj.pk]
        rows = format_html_join(
            "", '<li><a href="{}">#{}</a> {} {}{}</li>',
            ((reverse("admin:environments_deployment_change", args=[e["id"]]), e["id"], e["version"],
              Deployment.State(e["state"]).label.lower(),  # "awaiting approval", as the board says it
              f": {selectors.waiting_phrase(e['waiting_for'])}" if e["waiting_for"] else "") for e in entries),
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
        return format_html('<ul>{}</ul><a class="button" href="{}">Access: grants and changes</a>', rows, url)

    def get_urls(self):
        return [
            path("metrics/", self.admin_site.admin_view(self.metrics_view), name="environments_metrics"),
            path("<int:pk>/access/", self.admin_site.admin_view(self.access_view),
                 name="environments_environment_access"),
            *super().get_urls(),
        ]

    def metrics_view(self, request):
        return metrics_page(self.admin_site, request)

    def access_view(self, request, pk):
        """Grant or revoke deploy/approve rights through the service (audited, no self-grants)."""
        environment = get_object_or_404(Environment, pk=pk)
        if not self.has_view_permission(request, environment):
            raise PermissionDenied  # who may change access is the policy's decision (decide_grant)
        form = AccessForm(request.POST or None, actor=admin_actor(request), environment=environment)
        if request.method == "POST" and form.is_valid():
            d = form.cleaned_data
            call = services.environment_grant if d["grant"] else services.environment_revoke
            who = f"user {d['user']}" if d["user"] else f"group {d['group']}"
            try:
                changed = call(actor=admin_actor(request), environment=environment, codename=d["permission"],
                               user=d["user"], group=d["group"])
            except PolicyRefusal as exc:
                self.message_user(request, refusal_message(exc.refusal), messages.ERROR)
            else:
                if changed:
                    self.message_user(request, f"{'Granted' if d['grant'] else 'Revoked'} {d['permission']} on "
                                      f"{environment} {'to' if d['grant'] else 'from'} {who}.", messages.SUCCESS)
                elif d["grant"]:
                    self.message_user(request, f"Nothing changed: {who} holds {d['permission']} on {environment} "
                                      "already.", messages.WARNING)
                else:
                    self.message_user(request, f"Nothing changed: {who} holds no grant of {d['permission']} on "
                                      f"{environment} to revoke.", messages.WARNING)
                return redirect("admin:environments_environment_access", pk)
        refusal = policy.decide_grant(actor=admin_actor(request), environment=environment).refusal
        context = {
            **self.admin_site.each_context(request), "title": f"Access to {environment}", "form": form,
            "environment": environment, "rows": access_rows(environment), "opts": self.model._meta,
            "refusal": refusal_message(refusal) if refusal else None,  # the form is offered only where allowed
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
    if done == "reviewed":  # a review changes no state: say the one it has
        return "reviewed" if deployment.state in Deployment.OPEN_STATES else f"reviewed (it {state})"
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
    if deployment.state in Deployment.OPEN_STATES:
        offers.append(Offer("cancel", "Cancel", policy.decide_cancel(actor=actor, deployment=deployment)))
    if deployment.emergency and deployment.reviewed_at is None:
        offers.append(Offer("review", "Mark as reviewed", policy.decide_review(actor=actor, deployment=deployment)))
    return offers


@admin.register(Deployment)
class DeploymentAdmin(LargeTableAdmin, ReleaseSearch, admin.ModelAdmin):
    """A deployment's page: its place in the queue, approvals, separation-of-duties checks, progress
    refreshed while it runs, the latest lines of its output log, and Approve / Reject / Cancel / Review
    where the policy allows them (the rule's sentence where it does not). Every change goes through a
    service; the list only shows, and stays fast at millions of deployments (edge.lists): newest first
    from an index, an issue key searched through its index, the count capped or estimated."""

    list_display = ["id", "release_to_environment", "state_and_place", "requested_by_name", "requested_at",
                    "finished_at"]
    list_filter = ["state", "environment__application", ("environment__name", EnvironmentNameFilter), "emergency"]
    search_fields = ["release__version", "requested_by_label", "release__issues__key"]  # by ReleaseSearch
    own_search = ("requested_by_label",)
    numbered, joining = True, frozenset({"to"})  # a row reads "#71 MAC 1.3.1 to Production"
    search_help_text = ("An issue key, a version, a deployment's number, the application or environment by name, "
                        "or who requested, approved, rejected or reviewed it (a user name, or the portal).")

    def named(self):
        return {"release__application__name": {n.lower() for n in Application.objects.values_list("name", flat=True)},
                "environment__name": {n.lower() for n in Environment.objects.values_list("name", flat=True)}}

    def more_matches(self, word):
        # the portal's own deployments, by the words the list shows for them (edge.templatetags.requester)
        found = [Found(asked_by_the_portal(Deployment.objects), "pk")] if word.lower() in THE_PORTAL else []
        # a person, when the word is someone's user name (read first: the planner then knows whom it
        # looks for, instead of guessing a third of the approvals for a name nobody has)
        people = list(get_user_model().objects.filter(username__iexact=word).values_list("pk", flat=True))
        if people:
            found += [Found(Approval.objects.filter(approver_id__in=people), "deployment_id"),
                      Found(Deployment.objects.filter(reviewed_by_id__in=people), "pk")]
        return found
    list_select_related = ["release__application", "environment", "reviewed_by"]
    date_hierarchy = "requested_at"
    actions = None
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # a count per filter choice reads the whole table
    change_list_template = "admin/portal/large_change_list.html"

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
        return requester(obj)  # as the pages say it: the portal's own automatic deployments by that name

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # every change is an action of the deployment's page, through a service

    # Sorted in the order the releases were registered: versions as text would put 0.10.0 before 0.2.0.
    @admin.display(description="deployment", ordering="release_id")
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
        try:
            deployment = self._viewable(request, unquote(object_id))
        except Http404:  # the board, saying so (as the admin answers for a release that is not there)
            messages.warning(request, f"There is no deployment #{unquote(object_id)}.")
            return redirect("admin:index")
        live = selectors.deployment_live(deployment)
        running = selectors.current_deployments([deployment.environment_id]).get(deployment.environment_id) \
            if live["open"] else None
        before = selectors.ran_before(deployment) if not live["open"] and deployment.started_at else None
        context = {
            **self.admin_site.each_context(request), "title": f"Deployment #{deployment.pk}", "opts": self.opts,
            "original": deployment, "deployment": deployment, "live": live,
            # what an open deployment would replace; an older release going back is a rollback, said so
            "replaces": running if running and running.release_id != deployment.release_id else None,
            "rollback": policy.is_rollback(deployment.release_id, running and running.release_id),
            # and what an ended one replaced (or was to replace): as the changes report says it
            "ran_before": before if before and before.release_id != deployment.release_id else None,
            "rolled_back": policy.is_rollback(deployment.release_id, before and before.release_id),
            "offers": deployment_offers(admin_actor(request), deployment),
            # an emergency's freeze, as the exceptions report says it
            "went_past": selectors.requests_in_the_chain([deployment.pk]).get(deployment.pk, (None, None))[1]
            if deployment.emergency else None,
            # an emergency waiting for its review: who could give it (none: someone must be given the right)
            "reviewers": policy.possible_reviewers(deployment.release, deployment.environment,
                                                   deployment.requested_by_id)
            if deployment.emergency and deployment.reviewed_at is None else None,
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
            messages.error(request, f"Not {done}: the comment must say why.")
            return redirect(back)
        call_service(request, lambda: service(actor=admin_actor(request), deployment_id=deployment.pk,
                                              comment=comment),
                     lambda d: format_html('{} to {}: {}. <a href="{}">{} deployment #{}</a>', d.release,
                                           d.environment.name, _outcome(d, done), page_url,
                                           "Follow" if d.state in Deployment.OPEN_STATES else "Open", d.pk))
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

    list_display = ["id", "environment", "what", "reason", "state", "proposed", "decided"]
    list_filter = ["state", "environment__application"]
    list_select_related = ["environment__application", "proposed_by", "decided_by"]
    actions = ["approve", "reject"]

    # its page says the change in words, as the list does (not the stored {field: [from, to]})
    fields = ["application", "environment", "what", "reason", "state", "proposed", "decided", "decision_comment"]

    @admin.display(description="change")
    def what(self, obj):
        return obj.summary()

    @admin.display(description="proposed", ordering="proposed_at")
    def proposed(self, obj):
        return f"{obj.proposed_by.get_username()}, {obj.proposed_at:%Y-%m-%d %H:%M}"

    @admin.display(description="decided", ordering="decided_at")
    def decided(self, obj):
        return f"{obj.decided_by.get_username()}, {obj.decided_at:%Y-%m-%d %H:%M}" if obj.decided_by_id else "-"

    def has_decide_permission(self, request):
        return policy.check_may_administer(admin_actor(request)) is None  # who decides, as the service asks

    def _decide(self, request, queryset, *, action, title, service, done, required=False):
        actor = admin_actor(request)
        comment = confirm_with_comment(self, request, queryset, action=action, title=title, required=required,
                                       decide=lambda c: services.control_change_decision(
                                           actor=actor, change=c, approve=action == "approve").refusal)
        if not isinstance(comment, str):
            return comment
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


# --- delivery metrics ----------------------------------------------------------------------------------

class MetricsForm(BoundedDaysForm):
    application = forms.ChoiceField()
    environment = forms.ChoiceField()
    since = forms.DateField(required=False, widget=DATE_INPUT, help_text="First day; its ISO week is included.")
    until = forms.DateField(required=False, widget=DATE_INPUT, help_text="Last day (default: today).")

    def __init__(self, data, *, applications, environments):
        super().__init__(data)
        self.fields["application"].choices = [(a.name, a.name) for a in applications]
        self.fields["environment"].choices = [(e.name, e.name) for e in environments]


METRICS_COLUMNS = ["Week", "Succeeded", "Failed", "Failure rate", "Emergencies", "Emergency share", "Changes",
                   "Lead time", "Outages", "Restored", "Time to restore", "Decided requests", "Approval wait"]


def _metrics_row(w: metrics.WeekMetrics) -> list:
    return [w.label, w.succeeded, w.failed, charts.percent_text(w.change_failure_rate), w.emergencies,
            charts.percent_text(w.emergency_share), w.changes, charts.duration_text(w.lead_time),
            w.failures_to_restore, w.restored, charts.duration_text(w.time_to_restore), w.approval_decisions,
            charts.duration_text(w.approval_wait)]


def _duration_chart(key, title, description, labels, values):
    per, unit = charts.duration_unit(max((v for v in values if v is not None), default=0))
    return charts.bar_chart(
        key=key, title=title, description=description, labels=labels,
        series=[charts.Series(title, "bar-primary", [None if v is None else v / per for v in values])],
        text=lambda v: f"{v:.3g} {unit}")


def metrics_charts(found: metrics.EnvironmentMetrics) -> list[charts.Chart]:
    weeks = found.weeks
    # the week alone (W49) within one year; with its year where the weeks cross one (2025-W49, 2026-W01)
    labels = [w.label if weeks[0].label[:4] != weeks[-1].label[:4] else w.label.split("-")[1] for w in weeks]
    count = lambda v: f"{v:g}"  # noqa: E731
    return [
        charts.bar_chart(
            key="frequency", title="Deployments per week", labels=labels, text=count,
            description="Succeeded (the deployment frequency) and failed, in the week they finished.",
            series=[charts.Series("succeeded", "bar-ok", [w.succeeded for w in weeks]),
                    charts.Series("failed", "bar-failed", [w.failed for w in weeks])]),
        _duration_chart("lead-time", "Lead time for changes", "First successful build of a change to its "
                        "arrival here (average).", labels, [w.lead_time for w in weeks]),
        charts.bar_chart(
            key="failure-rate", title="Change failure rate", labels=labels, text=charts.percent_text, maximum=1,
            description="Failed among succeeded + failed deployments.",
            series=[charts.Series("change failure rate", "bar-failed", [w.change_failure_rate for w in weeks])]),
        _duration_chart("restore", "Time to restore", "A failed deployment to the next succeeded one "
                        "(average, in the week of the failure).", labels, [w.time_to_restore for w in weeks]),
        _duration_chart("approval-wait", "Time waiting for approval", "Request to the deciding approval or "
                        "rejection (average, in the week of the request).", labels, [w.approval_wait for w in weeks]),
        charts.bar_chart(
            key="emergency-share", title="Emergency share", labels=labels, text=charts.percent_text, maximum=1,
            description="Emergency deployments among succeeded + failed.",
            series=[charts.Series("emergency share", "bar-emergency", [w.emergency_share for w in weeks])]),
    ]


def _headline(found: metrics.EnvironmentMetrics) -> list[dict]:
    total = found.total
    return [
        {"what": "deployments a week", "value": f"{total.succeeded / max(len(found.weeks), 1):.1f}"},
        {"what": "lead time for changes", "value": charts.duration_text(total.lead_time)},
        {"what": "change failure rate", "value": charts.percent_text(total.change_failure_rate)},
        {"what": "time to restore", "value": charts.duration_text(total.time_to_restore)},
        {"what": "waiting for approval", "value": charts.duration_text(total.approval_wait)},
        {"what": "emergency share", "value": charts.percent_text(total.emergency_share)},
    ]


def metrics_csv(application: Application, found: metrics.EnvironmentMetrics, period: metrics.MetricsPeriod):
    """The page's numbers as CSV (durations in seconds, rates as fractions), formula cells neutralized."""
    rows = [w.as_dict() for w in [*found.weeks, found.total]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["application", "environment", *rows[0]])
    for row in rows:
        writer.writerow([safe_cell(v) for v in (application.name, found.environment.name, *row.values())])
    name = f"metrics-{application.name}-{found.environment.name}-{period.first_monday}-{period.last_day}.csv"
    response = HttpResponse(out.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{"".join(c for c in name if c.isalnum() or c in "-._")}"'
    return response


def metrics_page(admin_site, request):
    """Delivery metrics of one environment over whole ISO weeks: charts, a table and a CSV of the
    same numbers, and the coming freezes of the application. A fixed number of queries."""
    if not request.user.has_perm("environments.view_deployment"):
        raise PermissionDenied
    applications = list(Application.objects.order_by("name"))
    application = next((a for a in applications if a.name == request.GET.get("application")),
                       applications[0] if applications else None)
    environments = list(Environment.objects.filter(application=application).order_by("id")) if application else []
    environment = next((e for e in environments if e.name == request.GET.get("environment")),
                       metrics.production_of(environments))
    data = {"application": application.name if application else "",
            "environment": environment.name if environment else "",
            "since": request.GET.get("since", ""), "until": request.GET.get("until", "")}
    form = MetricsForm(data, applications=applications, environments=environments)
    period = metrics.MetricsPeriod.last_weeks()
    if form.is_valid() and (form.cleaned_data["since"] or form.cleaned_data["until"]):
        until = form.cleaned_data["until"] or timezone.now().date()
        since = form.cleaned_data["since"] or until - dt.timedelta(weeks=metrics.DEFAULT_WEEKS - 1)
        period = metrics.MetricsPeriod.covering(since, until)
        if metrics.monday_of(since) < period.first_monday:  # longer than a page's measures reach
            form.add_error("since", f"At most {metrics.MAX_WEEKS} weeks are measured: the latest are shown.")
    context = {**admin_site.each_context(request), "title": "Delivery metrics", "form": form,
               "application": application, "environment": environment, "period": period,
               "csv_url": "?" + urlencode({**data, "format": "csv"})}
    if environment is not None:
        (found,) = metrics.delivery_metrics(application, period=period, environment=environment)
        if request.GET.get("format") == "csv":
            return metrics_csv(application, found, period)
        context.update(charts=metrics_charts(found), headline=_headline(found), columns=METRICS_COLUMNS,
                       rows=[_metrics_row(w) for w in [*found.weeks, found.total]],
                       first_week=found.weeks[0].label, last_week=found.weeks[-1].label)
    return TemplateResponse(request, "admin/environments/metrics.html", context)
