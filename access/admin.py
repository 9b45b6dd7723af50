from django import forms
from django.contrib import admin, messages
from django.contrib.admin import actions as admin_actions
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_user_model, update_session_auth_hash
from django.contrib.auth.admin import GroupAdmin, UserAdmin, csrf_protect_m, sensitive_post_parameters_m
from django.contrib.auth.forms import UserChangeForm
from django.contrib.auth.models import Group, Permission
from django.db.models import Q
from django.http import HttpResponseRedirect
from django.shortcuts import redirect
from django.urls import reverse
from django_q.models import Failure, OrmQ, Schedule, Success

from access.models import ApiToken
from access.services import (
    group_delete,
    group_permissions_change,
    group_rename,
    token_revoke,
    user_delete,
    user_permissions_change,
    user_save,
    user_set_password,
)
from audit.services import audit_refusal
from core.decisions import PolicyRefusal
from edge.admin import OutcomeAdmin, admin_actor, offer_only, refusal_message, run_each
from edge.templatetags import moment
from environments import policy
from environments.services import group_membership_change

User = get_user_model()


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created with `manage.py create_token` (shown once); here they are listed and revoked."""

    list_display = ["name", "kind", "user", "scope", "key_prefix", "created_by", "created_at", "revoked_at"]
    list_filter = ["kind"]
    list_select_related = ["user"]
    actions = ["revoke"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("applications")  # the scope: one query a page

    @admin.display(description="applications")
    def scope(self, obj):
        """A CI token's applications; a personal token acts as its user, wherever they may."""
        return ", ".join(sorted(a.name for a in obj.applications.all())) or "-"

    @admin.display(description="created by", ordering="created_by_label")
    def created_by(self, obj):
        return obj.created_by_label

    def get_readonly_fields(self, request, obj=None):
        return ["kind", "name", "user", "applications", "key_prefix", "created_by", "created_at", "revoked_at"]

    def get_fields(self, request, obj=None):
        return self.get_readonly_fields(request, obj)

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """Nothing on a token is edited: its page shows it, and says how it is revoked."""
        token = self.get_object(request, unquote(object_id))
        how = ("Revoked: it no longer opens the API." if token is not None and token.revoked_at else
               "Revoke it from the list: select it, then Revoke selected tokens.")
        return super().change_view(request, object_id, form_url, extra_context={
            "title": "API token", "subtitle": how,
            "show_save": False, "show_save_and_continue": False, "show_save_and_add_another": False,
            "show_delete_link": False, **(extra_context or {}),
        })

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        actor = admin_actor(request)
        for token in queryset.filter(revoked_at__isnull=False):
            self.message_user(request, f"{token}: revoked already, at {moment(token.revoked_at)}.", messages.WARNING)
        run_each(self, request, queryset.filter(revoked_at__isnull=True),
                 lambda t: token_revoke(actor=actor, token=t), "revoked.")


# Permissions a user or a group can be given that give nothing: deploying and approving count only when
# granted per environment (rule 4: its Access page), audit events are never added, changed or deleted
# by hand (the chain and the database refuse), and the task queue's own pages are not served.
NO_RIGHT = (Q(content_type__app_label="environments", codename__in=policy.GRANTABLE)
            | Q(content_type__app_label="audit", codename__in=["add_auditevent", "change_auditevent",
                                                                "delete_auditevent"])
            | Q(content_type__app_label="auditlog", codename__in=["add_logentry", "change_logentry",
                                                                   "delete_logentry"])
            | Q(content_type__app_label="environments", codename__in=["change_approval", "delete_approval"])
            | Q(content_type__app_label="django_q"))
NO_RIGHT_SAID = ("Not offered: the right to deploy to or approve for an environment (given per environment, on "
                 "its Access page), and writing audit events, field history, approvals or the task queue's "
                 "records by hand (nobody may).")


def _offer_rights_only(field, held) -> None:
    """A permissions field offers only what gives a right (NO_RIGHT left out, unless already held: the
    form keeps what it shows), and says what it left out."""
    left_out = set(Permission.objects.filter(NO_RIGHT).exclude(pk__in=held).values_list("pk", flat=True))
    widget = getattr(field.widget, "widget", field.widget)
    widget.choices = [(v, label) for v, label in widget.choices if getattr(v, "value", v) not in left_out]
    field.help_text = f"{NO_RIGHT_SAID} {field.help_text}"


def _offer_permissions(field, held: set[int], decide) -> None:
    """A permissions field offers what `decide` (rights "app.codename" -> Decision: the policy function
    the service asks) allows. Where no new right may be given at all (one's own account or group, an
    account one made), only the permissions held, said once; otherwise each right is asked (someone not a
    superuser gives only what they hold)."""
    refusal = decide(["new permissions"]).refusal
    if refusal is not None:
        offer_only(field, {"the permissions it does not hold": refusal}, keep=held)
        return
    refused = {}
    for permission in Permission.objects.select_related("content_type").exclude(pk__in=held):
        if (refusal := decide([f"{permission.content_type.app_label}.{permission.codename}"]).refusal) is not None:
            refused[permission] = refusal
    offer_only(field, refused)


def _account_offers(fields: dict, actor, user) -> None:
    """An account's page offers what rule 4 lets this person do to it: on their own account, or one they
    made, a flag only to drop it, and no group or permission it does not hold (another administrator gives
    those). The field says why in the rule's sentence, asked of the functions the services ask
    (policy.decide_account_change, policy.decide_membership)."""
    made = policy.accounts_made_by(actor)
    for flag in ("is_staff", "is_superuser"):
        if flag in fields and not getattr(user, flag):
            refusal = policy.decide_account_change(actor=actor, user=user, raised=[flag], made=made).refusal
            if refusal is not None:  # not offered; a forged post still reaches user_save, refused on record
                fields[flag].widget.attrs["disabled"] = True
                fields[flag].help_text = f"{refusal.detail} {fields[flag].help_text}"
    if "user_permissions" in fields:
        _offer_permissions(fields["user_permissions"], set(user.user_permissions.values_list("pk", flat=True)),
                           lambda rights: policy.decide_account_change(actor=actor, user=user, raised=rights,
                                                                       made=made))
    if "groups" in fields:
        refused = {}
        for group in Group.objects.exclude(user=user).order_by("name"):
            refusal = policy.decide_membership(actor=actor, group=group, user=user, made=made).refusal
            if refusal is not None:
                refused[group] = refusal
        if any(r.code in ("SELF_GRANT", "SOD_ACCOUNT_MAKER") for r in refused.values()):
            fields["groups"].widget.can_add_related = False  # no group at all to join: nor one made here ("+")
        offer_only(fields["groups"], refused)


class MembershipCheckedUserForm(UserChangeForm):
    """Group changes go through group_membership_change: no one joins a releasers group by themselves."""

    request = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "user_permissions" in self.fields:
            held = self.instance.user_permissions.all() if self.instance.pk else []
            _offer_rights_only(self.fields["user_permissions"], held)
        if self.request is not None and self.instance.pk is not None:
            _account_offers(self.fields, admin_actor(self.request), self.instance)

    def clean_groups(self):
        groups = self.cleaned_data.get("groups")
        if groups is None or self.instance.pk is None:
            return groups
        current = set(self.instance.groups.values_list("pk", flat=True))
        for group in groups:
            if group.pk not in current:
                actor = admin_actor(self.request)  # who, and from where, as every admin event says
                decision = policy.decide_membership(actor=actor, group=group, user=self.instance)
                if not decision.allowed:  # on record, like every refusal (the admin's transaction commits)
                    audit_refusal(actor=actor, action="group.add_member", refusal=decision.refusal, obj=group,
                                  data={"group": group.name, "user": self.instance.get_username()})
                    raise forms.ValidationError(f"{decision.refusal.detail} ({decision.refusal.code})")
        return groups


class FormKnowsRequest:
    """The admin hands its form the request: what a form offers depends on who is asking."""

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        form.request = request
        return form


class PortalUserAdmin(FormKnowsRequest, OutcomeAdmin, UserAdmin):
    """Every change to an account goes through an audited service: its fields and flags (user_save),
    its password (user_set_password), its permissions and its groups (group_membership_change); deletion
    through user_delete, which refuses to delete a user who is part of the evidence (deactivate instead)."""

    form = MembershipCheckedUserForm
    actions = ["delete_selected"]
    list_display = [*UserAdmin.list_display, "is_active", "is_superuser"]  # a deactivated account shows as one

    def change_view(self, request, object_id, form_url="", extra_context=None):
        """Delete is offered only for an account the policy lets this person delete; otherwise the page
        says why, in the rule's sentence (a forged delete is still refused, on record: delete_view)."""
        user = self.get_object(request, unquote(object_id))
        if user is not None and self.has_delete_permission(request, user):
            refusal = policy.decide_user_delete(actor=admin_actor(request), user=user).refusal
            if refusal is not None:
                extra_context = {"show_delete": False, "not_deletable": refusal.detail, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        user = self.get_object(request, unquote(object_id))
        if user is not None and self.has_delete_permission(request, user):
            actor = admin_actor(request)
            refusal = policy.decide_user_delete(actor=actor, user=user).refusal
            if refusal is not None and request.method == "POST":
                try:
                    user_delete(actor=actor, user=user)  # refused again, and on record
                except PolicyRefusal as exc:
                    refusal = exc.refusal
                else:
                    return self.response_delete(request, str(user), user.pk)
            if refusal is not None:
                self.message_user(request, refusal_message(refusal), messages.ERROR)
                return redirect("admin:auth_user_change", user.pk)
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request, obj):
        user_delete(actor=admin_actor(request), user=obj)

    def delete_queryset(self, request, queryset):
        for user in queryset:
            user_delete(actor=admin_actor(request), user=user)

    @admin.action(description="Delete selected users", permissions=["delete"])
    def delete_selected(self, request, queryset):
        """Django's confirmation and deletion, unless a selected user is part of the evidence: then
        nobody is deleted and each refusal is shown (and, once confirmed, on record)."""
        actor = admin_actor(request)
        refused = [u for u in queryset if not policy.decide_user_delete(actor=actor, user=u).allowed]
        if not refused:
            return admin_actions.delete_selected(self, request, queryset)
        if request.POST.get("post"):
            run_each(self, request, refused, lambda u: user_delete(actor=actor, user=u), "deleted.")
        else:
            for user in refused:
                refusal = policy.decide_user_delete(actor=actor, user=user).refusal
                self.message_user(request, refusal_message(refusal, user), messages.ERROR)
        self.message_user(request, f"Nobody was deleted: {len(refused)} of the {len(queryset)} selected "
                          f"{'is' if len(refused) == 1 else 'are'} part of the evidence.", messages.WARNING)
        return None

    def save_model(self, request, obj, form, change):
        try:
            user_save(actor=admin_actor(request), user=obj)
        except PolicyRefusal as exc:  # on record; the admin's transaction commits the refusal
            self.not_applied(request, refusal_message(exc.refusal))

    def save_related(self, request, form, formsets, change):
        wanted_groups = form.cleaned_data.pop("groups", None)
        wanted_permissions = form.cleaned_data.pop("user_permissions", None)
        super().save_related(request, form, formsets, change)
        user = form.instance
        actor = admin_actor(request)
        if wanted_permissions is not None:
            try:
                user_permissions_change(actor=actor, user=user, permissions=wanted_permissions)
            except PolicyRefusal as exc:
                self.not_applied(request, refusal_message(exc.refusal))
        if wanted_groups is None:
            return
        current = set(user.groups.all())
        for group in sorted(set(wanted_groups) ^ current, key=lambda g: g.name):
            try:
                group_membership_change(actor=actor, group=group, user=user, add=group in wanted_groups)
            except PolicyRefusal as exc:
                self.not_applied(request, refusal_message(exc.refusal, group))

    @sensitive_post_parameters_m
    @csrf_protect_m
    def user_change_password(self, request, id, form_url=""):
        """Django's page, with the valid submission handed to user_set_password (audited)."""
        user = self.get_object(request, unquote(id))
        if request.method != "POST" or user is None or not self.has_change_permission(request, user):
            return super().user_change_password(request, id, form_url)
        form = self.change_password_form(user, request.POST)
        if not form.is_valid() or not (form.cleaned_data["set_usable_password"] or "unset-password" in request.POST):
            return super().user_change_password(request, id, form_url)  # shows the errors
        usable = form.cleaned_data["set_usable_password"]
        try:
            user = user_set_password(actor=admin_actor(request), user=user,
                                     password=form.cleaned_data["password1"] if usable else None)
        except PolicyRefusal as exc:  # on record; the admin's transaction commits the refusal
            self.message_user(request, refusal_message(exc.refusal), messages.ERROR)
            return redirect("admin:auth_user_change", user.pk)
        self.log_change(request, user, self.construct_change_message(request, form, None))
        self.message_user(request, "Password changed successfully." if usable
                          else "Password-based authentication was disabled.", messages.SUCCESS)
        update_session_auth_hash(request, user)
        return HttpResponseRedirect(reverse(f"{self.admin_site.name}:{user._meta.app_label}_{user._meta.model_name}"
                                            "_change", args=(user.pk,)))


admin.site.unregister(User)
admin.site.register(User, PortalUserAdmin)


class GroupRightsForm(forms.ModelForm):
    """A group's page offers its members no new rights for it: only the permissions it holds, with the
    rule's sentence (policy.decide_group_permissions, which group_permissions_change asks)."""

    request = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "permissions" in self.fields:
            _offer_rights_only(self.fields["permissions"], self.instance.permissions.all() if self.instance.pk else [])
        if self.request is None or self.instance.pk is None or "permissions" not in self.fields:
            return
        actor, group = admin_actor(self.request), self.instance
        # what the policy reads of the person and the group, read once for every right asked below
        members = set(group.user_set.values_list("pk", flat=True))
        made, belongs = policy.accounts_made_by(actor) & members, actor.user.pk in members
        _offer_permissions(self.fields["permissions"], set(group.permissions.values_list("pk", flat=True)),
                           lambda rights: policy.decide_group_permissions(actor=actor, group=group, added=rights,
                                                                          made=made, belongs=belongs))


class PortalGroupAdmin(FormKnowsRequest, OutcomeAdmin, GroupAdmin):
    """A group's permissions go through group_permissions_change: audited, and nobody gives a group they
    belong to more rights. Deleting one says who lost what (group_delete)."""

    form = GroupRightsForm

    def save_model(self, request, obj, form, change):
        if change and "name" in form.changed_data:
            group_rename(actor=admin_actor(request), group=obj, name=obj.name)
        else:
            super().save_model(request, obj, form, change)

    def delete_model(self, request, obj):
        group_delete(actor=admin_actor(request), group=obj)

    def delete_queryset(self, request, queryset):
        for group in queryset:
            group_delete(actor=admin_actor(request), group=group)

    def save_related(self, request, form, formsets, change):
        wanted = form.cleaned_data.pop("permissions", None)
        super().save_related(request, form, formsets, change)
        if wanted is None:
            return
        try:
            group_permissions_change(actor=admin_actor(request), group=form.instance, permissions=wanted)
        except PolicyRefusal as exc:  # on record; the admin's transaction commits the refusal
            self.not_applied(request, refusal_message(exc.refusal))


admin.site.unregister(Group)
admin.site.register(Group, PortalGroupAdmin)

# django-q2's own pages would let whoever may add a schedule, resubmit a task or edit the queue make
# the worker call any importable function; the portal's schedules come from its migrations.
for _model in (Schedule, Success, Failure, OrmQ):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)
