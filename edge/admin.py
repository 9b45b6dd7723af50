"""Small helpers for admin actions that call services and show the policy's sentence."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import csrf_protect_m
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.utils.http import url_has_allowed_host_and_scheme

from audit.actors import Actor
from core.decisions import Decision, PolicyRefusal
from core.times import FIRST_DAY, LAST_DAY

# A day, picked in the browser's calendar and sent as YYYY-MM-DD: the same on every page that asks for one.
DATE_INPUT = forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d")


class BoundedDaysForm(forms.Form):
    """A form whose `since` and `until` days stay within the days a person can mean (core.times), the
    last not before the first."""

    def _bounded(self, name):
        day = self.cleaned_data.get(name)
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            raise forms.ValidationError(f"Choose a day between {FIRST_DAY} and {LAST_DAY}.")
        return day

    def clean_since(self):
        return self._bounded("since")

    def clean_until(self):
        return self._bounded("until")

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["until"] < data["since"]:
            raise forms.ValidationError("The last day comes before the first.")
        return data


class OutcomeAdmin(admin.ModelAdmin):
    """A save refused in part, or only proposed, is not "changed successfully": the page says what
    happened (not_applied: the rule's sentence, or the proposal) in place of Django's success message,
    and shows the object again (or `outcome_url`)."""

    outcome_url: str | None = None

    @csrf_protect_m
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        """Without the transaction Django puts around a whole form: each service the form calls is a
        transaction of its own, committed with its audit event. A transaction that appended holds the
        chain's lock until it commits, so a later service's row locks in the same transaction (a
        membership's group, a proposal's application) were taken under it, and could wait for another
        service holding that row while it waited for the chain: a deadlock. A refused or only proposed
        part is on record either way, and said on the page (not_applied); the other parts apply."""
        return self._changeform_view(request, object_id, form_url, extra_context)

    def not_applied(self, request, text: str, level=messages.ERROR) -> None:
        self.message_user(request, text, level)
        request.portal_not_applied = True

    def _outcome(self, request, obj, default):
        if not getattr(request, "portal_not_applied", False):
            return default()
        opts = self.opts
        if self.outcome_url is None and obj.pk is not None:
            return redirect(f"admin:{opts.app_label}_{opts.model_name}_change", obj.pk)
        return redirect(self.outcome_url or f"admin:{opts.app_label}_{opts.model_name}_changelist")

    # Django's own history ("Changed ...") would list what was refused or only proposed: it is not
    # written then (the audit chain holds what happened, the refusals and proposals included).
    def log_addition(self, request, obj, message):
        if not getattr(request, "portal_not_applied", False):
            return super().log_addition(request, obj, message)
        return None

    def log_change(self, request, obj, message):
        if not getattr(request, "portal_not_applied", False):
            return super().log_change(request, obj, message)
        return None

    def response_add(self, request, obj, post_url_continue=None):
        return self._outcome(request, obj, lambda: super(OutcomeAdmin, self).response_add(request, obj,
                                                                                         post_url_continue))

    def response_change(self, request, obj):
        return self._outcome(request, obj, lambda: super(OutcomeAdmin, self).response_change(request, obj))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by services; the admin shows them and changes nothing."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def admin_actor(request) -> Actor:
    return Actor(user=request.user, via="admin", remote_addr=request.META.get("REMOTE_ADDR", ""))


def refusal_message(refusal, subject=None) -> str:
    """How a page shows a refusal: the rule's code and its sentence (and what it was about)."""
    return f"{subject}: refused ({refusal.code}). {refusal.detail}" if subject is not None else (
        f"Refused ({refusal.code}). {refusal.detail}")


def offer_only(field: forms.ModelChoiceField, refused: dict, keep: set | None = None) -> None:
    """Leave out of a choice's options what the policy refuses ({object: refusal}, asked of the function
    the action's service asks), or offer only the primary keys in `keep`; the field then says what it left
    out, in the rule's sentence, before its own help. The field still accepts every object: a post naming
    one not offered reaches the service, which refuses it on record."""
    left_out = {obj.pk for obj in refused if hasattr(obj, "pk")}

    def offered(value) -> bool:
        pk = getattr(value, "value", value)  # a ModelChoiceIteratorValue, or "" for no choice
        return pk == "" or (pk in keep if keep is not None else pk not in left_out)

    widget = getattr(field.widget, "widget", field.widget)  # inside the admin's related-object wrapper
    widget.choices = [(value, label) for value, label in widget.choices if offered(value)]  # as narrowed so far
    by_sentence: dict[str, list[str]] = {}
    for obj, refusal in refused.items():
        by_sentence.setdefault(refusal.detail, []).append(str(obj))
    said = " ".join(f"Not offered: {_some(names)}. {detail}" for detail, names in by_sentence.items())
    field.help_text = " ".join(filter(None, [said, str(field.help_text or "")]))


def _some(names: list[str], shown: int = 5) -> str:
    """"a, b, c, d, e and 12 more": a help line names a few of many."""
    return ", ".join(names) if len(names) <= shown + 1 else f"{', '.join(names[:shown])} and {len(names) - shown} more"


def run_each(modeladmin: admin.ModelAdmin, request, objects: Iterable, call: Callable, done: str) -> None:
    """Call a service for each object; report each success and each refusal (with its rule's sentence)."""
    for obj in objects:
        try:
            call(obj)
        except PolicyRefusal as exc:
            modeladmin.message_user(request, refusal_message(exc.refusal, obj), messages.ERROR)
        except ValidationError as exc:  # what the change would break (a cycle, say): nothing was applied
            modeladmin.message_user(request, f"{obj}: {' '.join(exc.messages)}", messages.ERROR)
        else:
            modeladmin.message_user(request, f"{obj}: {done}", messages.SUCCESS)


def confirm_with_comment(modeladmin, request, queryset, *, action: str, title: str, required: bool = False,
                         label: str = "Comment", decide: Callable | None = None):
    """Show an intermediate page asking for a comment; returns the comment once posted, else a response.
    With `decide` (object -> the policy's refusal, or None), the page says which of the selected the
    person may not act on and why, and goes on with the others only; if none is left, it offers nothing.
    A post that names them all the same reaches the service, which refuses them on record."""
    comment = request.POST.get("comment", "").strip()
    if "apply" in request.POST and (comment or not required):
        return comment
    rows = [(obj, decide(obj) if decide else None) for obj in queryset]
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title, "rows": rows, "offered": [obj for obj, refusal in rows if refusal is None],
        "action": action, "required": required, "label": label,
        "opts": modeladmin.model._meta, "error": "apply" in request.POST and required and not comment,
        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, "admin/portal/confirm_with_comment.html", context)


@dataclass(frozen=True)
class Offer:
    """An action a page may show: offered when the policy allows it now, otherwise the rule's sentence
    says why not. The page asks the same decide_* function that the service will ask."""

    action: str
    label: str
    decision: Decision
    target: object = None  # what the action is about (e.g. the environment of a deployment request)
    note: str = ""  # what the person should know before acting (e.g. that nobody could review it after)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def refusal(self):
        return self.decision.refusal


def call_service(request, call: Callable, done: Callable[[object], str]):
    """Call a service for a page's form; show its success, or the refusal in the rule's sentence (the
    refusal is already in the audit chain). Returns the service's result, or None when refused."""
    try:
        result = call()
    except PolicyRefusal as exc:
        messages.error(request, refusal_message(exc.refusal))
        return None
    messages.success(request, done(result))
    return result


def next_url(request, default: str) -> str:
    """Where a page's form returns to: its `next` field when it points into this site, else `default`."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return target
    return default
