"""Pages at scale: query count and server time of each page, in process (Django's test client)
against the seeded database, logged in as the seeded superuser.

To measure another page, add a Page to PAGES: a name and a path (with {release}, {deployment},
{issue_key}, {year}, {month} filled from the seeded data), and auth="token" for an API path.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    auth: str = "session"  # "session": the admin, logged in; "token": the API with a CI token


PAGES = [
    Page("admin front page (board)", "/admin/"),
    Page("deployments list (with its count)", "/admin/environments/deployment/"),
    Page("deployments searched for an issue key", "/admin/environments/deployment/?q={issue_key}"),
    Page("deployments searched for a version", "/admin/environments/deployment/?q=1.0.5000"),
    Page("deployments searched for a person (300,000 approvals)", "/admin/environments/deployment/?q=bench-approver"),
    Page("deployments sorted by requester", "/admin/environments/deployment/?o=3"),
    Page("deployments, page 5,000", "/admin/environments/deployment/?p=5000"),
    Page("deployments of one month (its days that hold one)",
         "/admin/environments/deployment/?requested_at__year={year}&requested_at__month={month}"),
    Page("releases searched for a version", "/admin/releases/release/?q=1.0.5000"),
    Page("audit events list", "/admin/audit/auditevent/"),
    Page("audit events searched for a version", "/admin/audit/auditevent/?q=1.0.50000"),
    Page("audit events searched for an action", "/admin/audit/auditevent/?q=deployment.request"),
    Page("release page", "/admin/releases/release/{release}/change/"),
    Page("deployment page", "/admin/environments/deployment/{deployment}/change/"),
    Page("change journey (API)", "/api/v1/changes/{epic_key}", auth="token"),
    Page("change journey (page)", "/admin/changes/{epic_key}/"),
    Page("deployment page's live refresh (JSON)", "/admin/environments/deployment/{deployment}/live/"),
    Page("delivery metrics (12 weeks of every environment)",
         "/admin/environments/environment/metrics/?application=MAC"),
]
REPEATS = 5
SLOW_SECONDS = 2.0  # a page slower than this is timed once, not REPEATS times
TARGET_MS = 200


def seeded_values() -> dict:
    from django.utils import timezone

    from environments.models import Deployment
    from releases.models import Release

    release = Release.objects.filter(version="1.0.50000").values_list("pk", flat=True).first()
    deployment = (Deployment.objects.filter(release_id=release, environment__name="Production")
                  .order_by("id").values_list("pk", flat=True).first())
    requested = timezone.localtime(Deployment.objects.get(pk=deployment).requested_at)
    return {"release": release, "deployment": deployment, "issue_key": "BIZPLAT-50000",
            "year": requested.year, "month": requested.month,
            "epic_key": f"BIZPLAT-{1000000 + 49999 // 10}"}


def measure(token: str, log=print) -> list[dict]:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    warnings.filterwarnings("ignore", message="No directory at", module="django.core.handlers.base")
    values = seeded_values()
    client = Client()
    client.force_login(get_user_model().objects.get(username="bench-admin"))
    rows = []
    for page in PAGES:
        path = page.path.format(**values)
        headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if page.auth == "token" else {}
        times, queries, status, slowest = [], 0, 0, 0.0
        for attempt in range(REPEATS + 1):  # the first request warms templates and caches
            with CaptureQueriesContext(connection) as captured:
                t0 = time.perf_counter()
                response = client.get(path, **headers)
                if getattr(response, "streaming", False):
                    b"".join(response.streaming_content)
                elapsed = time.perf_counter() - t0
            status, queries = response.status_code, len(captured.captured_queries)
            slowest = max((float(q["time"]) for q in captured.captured_queries), default=0.0) * 1000
            if attempt:
                times.append(elapsed)
            if elapsed > SLOW_SECONDS and attempt:
                break
            if elapsed > SLOW_SECONDS * 5:  # far too slow to repeat at all
                times.append(elapsed)
                break
        row = {"name": page.name, "path": path, "status": status, "queries": queries,
               "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000,
               "slowest_query_ms": slowest, "timed": len(times)}
        rows.append(row)
        log(f"  {page.name}: {row['status']} {queries} queries, {row['median_ms']:.0f} ms"
            f" (slowest query {slowest:.0f} ms)", flush=True)
    return rows
