"""The portal's admin site. Its front page is the release board (what runs where, what waits in each
queue, the releases on their way, what waits for the signed-in person and what they asked for), with
a search for a change's issue key; a change's journey has a page of its own."""

from __future__ import annotations

from urllib.parse import urlencode

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse

from core.decisions import NotFound
from edge.admin import admin_actor
from edge.lists import as_number
from environments import selectors as env_selectors
from releases import selectors as release_selectors
from releases.models import as_issue_key

BOARD_PERMISSIONS = ("releases.view_release", "environments.view_deployment")


def may_see_board(user) -> bool:
    return user.has_perms(BOARD_PERMISSIONS)


class PortalAdminSite(admin.AdminSite):
    site_header = "Release Portal"
    site_title = "Release Portal"
    index_title = "Release board"

    def get_urls(self):
        return [
            path("changes/<str:issue_key>/", self.admin_view(self.change_journey_view), name="change_journey"),
            *super().get_urls(),
        ]

    def index(self, request, extra_context=None):
        """The release board; `?q=` opens a change's journey (an issue key), a release (its version), a
        deployment (#71, or 71 where no version is that) or searches the releases."""
        query = request.GET.get("q", "").strip()
        if query:
            if key := as_issue_key(query):
                return redirect("admin:change_journey", issue_key=key)
            if query.startswith("#") and (number := as_number(query)) is not None:  # as the pages name it
                return redirect("admin:environments_deployment_change", number)
            if (release := release_selectors.the_release_of_version(query)) is not None:  # a version, whole
                return redirect("admin:releases_release_change", release)
            if (number := as_number(query)) is not None and env_selectors.deployment_exists(number):  # 71 as #71
                return redirect("admin:environments_deployment_change", number)
            return redirect(reverse("admin:releases_release_changelist") + "?" + urlencode({"q": query}))
        return super().index(request, extra_context={**self.board_context(request), **(extra_context or {})})

    def board_context(self, request) -> dict:
        if not may_see_board(request.user):
            return {"board": None}
        mine, mine_open = env_selectors.requests_of(request.user)
        board = env_selectors.release_board()
        entries = {e["id"]: e for app in board for env in app["environments"] for e in env["queue"]}
        for deployment in mine:
            deployment.queue_entry = entries.get(deployment.pk)
        exceptions, actor = env_selectors.open_exceptions(), admin_actor(request)
        waiting = env_selectors.awaiting_decision_of(actor)
        decisions, reviews = env_selectors.review_decisions(actor, exceptions), []
        for x in exceptions:  # one the person may not review says why, in the rule's own sentence
            decision = decisions.get(x["deployment"].pk)
            x["why_not"] = None if decision is None else decision.refusal
            if decision is not None and decision.allowed:
                reviews.append(x["deployment"])
        proposals = env_selectors.proposals_waiting(actor)
        return {
            "board": board, "waiting_count": len(waiting) + len(reviews) + (proposals["others"] if proposals else 0),
            "proposals": proposals,
            "waiting_for_me": waiting,
            "my_requests": mine, "my_open_requests": mine_open,
            "open_exceptions": exceptions,
            "reviews_for_me": reviews,
        }

    def change_journey_view(self, request, issue_key: str):
        """Where is my change: its branch builds, pull request, releases, every environment it reached
        and where it is now (the same selector as GET /api/v1/changes/{issue_key})."""
        if not may_see_board(request.user):
            raise PermissionDenied
        context = {**self.each_context(request), "title": f"Where is {issue_key}?", "key": issue_key}
        try:
            journey = release_selectors.change_journey(issue_key)
        except NotFound as exc:  # the page all the same, with the sentence and the search box
            return TemplateResponse(request, "admin/releases/change_journey.html",
                                    {**context, "journey": None, "missing": str(exc)}, status=404)
        applications = [r.application for r in journey.releases] + [b.application for b in journey.builds]
        context.update(title=f"Where is {journey.key}?", key=journey.key, journey=journey,
                       issue_url=next((url for a in applications if (url := a.issue_url(journey.key))), ""))
        return TemplateResponse(request, "admin/releases/change_journey.html", context)


def error_page(template: str, status: int):
    """Django's 404 and 403 handler, rendering the portal's page with what every admin page has (the
    person's own links: change password, log out), which Django's own handlers leave out."""

    def handler(request, exception=None):
        # the API's requests pass no session middleware (portal.handlers): no person, no links
        person = admin.site.each_context(request) if hasattr(request, "user") else {}
        context = {**person, "exception": str(exception or "")}
        return TemplateResponse(request, template, context, status=status).render()

    return handler


page_not_found = error_page("404.html", 404)
permission_denied = error_page("403.html", 403)
