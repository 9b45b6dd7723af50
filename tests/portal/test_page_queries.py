"""Every page keeps a fixed number of queries, whatever the size of the history: the board, a release,
a deployment, a change's journey and the lists (searched for an issue key, filtered) are counted with a
short history and with a longer one. The lists of growing tables show a few rows a page here, so that
both histories span pages (a list of one page reads its rows in one query; one of many finds its
page's keys first: edge.lists.LargeTablePaginator)."""

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.admin import AuditEventAdmin
from audit.models import AuditEvent
from environments import services
from environments.admin import DeploymentAdmin
from environments.models import Deployment
from releases.admin import ReleaseAdmin
from tests.conftest import person


@pytest.fixture(autouse=True)
def _lists_of_a_few_rows(monkeypatch):
    for model_admin in (AuditEventAdmin, DeploymentAdmin, ReleaseAdmin):
        monkeypatch.setattr(model_admin, "list_per_page", 2)


def queries(client, url) -> int:
    client.get(url)  # warm the caches a long-running process keeps (content types, permissions)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code, response.get("Location"))
        if getattr(response, "streaming", False):
            b"".join(response.streaming_content)
    return len(captured)


def grow_history(world, releases: int):
    """Releases that went all the way to Production, each with its approvals and audit events."""
    for _ in range(releases):
        release = world.release(issue_keys=["BIZPLAT-1", "BIZPLAT-2"])
        world.to_staging(release)
        world.deploy(release, world.production, actor=person(world.bob))


def awaiting_production(world, key: str, *, implementers=("alice@example.com",)) -> Deployment:
    release = world.release(issue_keys=[key], implementers=implementers)
    world.to_staging(release)
    return services.deployment_request(actor=person(world.bob), release=release, environment=world.production)


def scene(world, key: str) -> dict[str, str]:
    """The same situation at any history size: a release carrying `key` in Staging and waiting for an
    approval to Production, and the pages that show it."""
    pending = awaiting_production(world, key)
    release = pending.release
    return {
        "board": reverse("admin:index"),
        "release": reverse("admin:releases_release_change", args=[release.pk]),
        "deployment": reverse("admin:environments_deployment_change", args=[pending.pk]),
        "live": reverse("admin:environments_deployment_live", args=[pending.pk]),
        "journey": reverse("admin:change_journey", args=[key]),
        "releases": reverse("admin:releases_release_changelist"),
        "deployments": reverse("admin:environments_deployment_changelist"),
        "deployments, the second page": reverse("admin:environments_deployment_changelist") + "?p=2",
        "deployments of the key": reverse("admin:environments_deployment_changelist") + f"?q={key}",
        "succeeded deployments": reverse("admin:environments_deployment_changelist") + "?state__exact=succeeded",
        "releases of the key": reverse("admin:releases_release_changelist") + f"?q={key.lower()}",
        "audit events": reverse("admin:audit_auditevent_changelist"),
        "audit events of an action": reverse("admin:audit_auditevent_changelist") + "?action=deployment.request",
        "audit events searched for a word": reverse("admin:audit_auditevent_changelist") + "?q=bob",
        "audit events searched for an action": reverse("admin:audit_auditevent_changelist") + "?q=deployment.request",
    }


def test_pages_keep_a_fixed_query_count_as_history_grows(client, world):
    world.carol.user_permissions.add(*Permission.objects.filter(codename__in=[
        "view_deployment", "view_release", "view_environment", "add_deployment", "view_auditevent"]))
    client.force_login(world.carol)

    grow_history(world, 2)
    urls = scene(world, "BIZPLAT-100")
    short = {name: queries(client, url) for name, url in urls.items()}
    services.deployment_cancel(actor=person(world.bob), deployment_id=Deployment.objects.get(
        state=Deployment.State.AWAITING_APPROVAL).pk)

    grow_history(world, 12)
    # More requests waiting for a decision: some carol may decide, one she implemented (she may not).
    for n in range(3):
        awaiting_production(world, f"BIZPLAT-30{n}")
    awaiting_production(world, "BIZPLAT-310", implementers=["Carol@Example.com"])
    urls = scene(world, "BIZPLAT-200")
    long = {name: queries(client, url) for name, url in urls.items()}
    assert len(client.get(urls["board"]).context["waiting_for_me"]) == 4  # 1 with the short history

    assert long == short
    assert short["board"] <= 40 and short["release"] <= 60, short  # a few per environment, none per release


def every_other_page(world, pending: Deployment) -> dict[str, str]:
    """The rest of the site an administrator or an auditor opens, around the same situation."""
    release = pending.release
    build = release.build
    event = AuditEvent.objects.order_by("-seq").first()
    return {
        "builds": reverse("admin:releases_build_changelist"),
        "build": reverse("admin:releases_build_change", args=[build.pk]),
        "applications": reverse("admin:releases_application_changelist"),
        "application": reverse("admin:releases_application_change", args=[world.app.pk]),
        "environments": reverse("admin:environments_environment_changelist"),
        "environment": reverse("admin:environments_environment_change", args=[world.production.pk]),
        "environment access": reverse("admin:environments_environment_access", args=[world.production.pk]),
        "metrics": reverse("admin:environments_metrics"),
        "metrics CSV": reverse("admin:environments_metrics") + "?format=csv",
        "freeze windows": reverse("admin:environments_freezewindow_changelist"),
        "control changes": reverse("admin:environments_controlchange_changelist"),
        "notification deliveries": reverse("admin:environments_notificationdelivery_changelist"),
        "API tokens": reverse("admin:access_apitoken_changelist"),
        "users": reverse("admin:auth_user_changelist"),
        "user": reverse("admin:auth_user_change", args=[world.carol.pk]),
        "groups": reverse("admin:auth_group_changelist"),
        "group": reverse("admin:auth_group_change", args=[world.releasers.pk]),
        "deployment log": reverse("admin:environments_deployment_log", args=[pending.pk]),
        "audit event": reverse("admin:audit_auditevent_change", args=[event.pk]),
        "audit reports": reverse("admin:audit_reports"),
        "field history": reverse("admin:auditlog_logentry_changelist"),
    }


def test_every_other_page_keeps_a_fixed_query_count_as_history_grows(client, world, make_user):
    client.force_login(make_user("root", superuser=True))
    grow_history(world, 2)
    pending = awaiting_production(world, "BIZPLAT-100")
    short = {name: queries(client, url) for name, url in every_other_page(world, pending).items()}
    services.deployment_cancel(actor=person(world.bob), deployment_id=pending.pk)
    grow_history(world, 12)
    for n in range(3):
        awaiting_production(world, f"BIZPLAT-30{n}")
    pending = awaiting_production(world, "BIZPLAT-200")
    long = {name: queries(client, url) for name, url in every_other_page(world, pending).items()}
    assert long == short
