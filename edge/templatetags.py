"""Template filters and tags of the portal's pages (registered in settings.TEMPLATES as the library `portal`)."""

from __future__ import annotations

import datetime as dt

from django import template
from django.contrib.admin.templatetags.admin_list import date_hierarchy
from django.contrib.admin.templatetags.base import InclusionAdminNode
from django.db.models import QuerySet

from edge.lists import CalendarChangeList
from environments.models import Deployment
from environments.selectors import waiting_phrase

register = template.Library()


@register.tag
def calendar_date_hierarchy(parser, token):
    """The admin's date hierarchy (same links, same template) read from the calendar between the list's
    first and last row instead of SELECT DISTINCT over all of them (see edge.lists.CalendarChangeList)."""
    return InclusionAdminNode(parser, token, func=lambda cl: date_hierarchy(CalendarChangeList(cl)),
                              template_name="date_hierarchy.html", takes_context=False)


@register.filter
def state_label(state: str) -> str:
    """A deployment state as people read it: "awaiting_approval" -> "awaiting approval"."""
    try:
        return Deployment.State(state).label.lower()
    except ValueError:
        return str(state).replace("_", " ")


THE_PORTAL = "the portal (automatic)"  # who asked, where no person or CI token did


@register.filter
def requester(deployment: Deployment) -> str:
    """Who asked for a deployment: a person's name, a CI token, or the portal itself (auto-deploy)."""
    if deployment.requested_by_id is None and deployment.requested_by_label.lower() == "system":  # as below
        return THE_PORTAL
    return deployment.requested_by_label


def asked_by_the_portal(deployments: QuerySet) -> QuerySet:
    """The deployments `requester` names THE_PORTAL (a list's search finds them by those words): no person
    and no CI token asked, so the audit's actor label is "system" (`iexact`: through the label's search
    index on PostgreSQL)."""
    return deployments.filter(requested_by__isnull=True, requested_by_label__iexact="system")


@register.filter
def waiting(waiting_for: str) -> str:
    """A queue entry's `waiting_for` in words (environments.selectors.waiting_phrase)."""
    return waiting_phrase(waiting_for)


@register.filter
def took(end: dt.datetime | None, start: dt.datetime | None) -> str:
    """How long from `start` to `end`, in words: "4 s", "2 min 5 s", "3 h 10 min"."""
    if not end or not start:
        return ""
    # whole seconds of the times as the pages write them (truncated), so that shown times and spans add up
    seconds = max(0, int(end.timestamp()) - int(start.timestamp()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@register.filter
def moment(value: str | dt.datetime | None) -> str:
    """A time as the pages write it, "2026-11-30 14:05 UTC", from a datetime or an ISO 8601 string."""
    if not value:
        return ""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return value
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
