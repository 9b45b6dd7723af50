"""An emergency during a freeze, in a browser (this module runs after test_portal.py, whose walk-through
needs Production unfrozen): bob deploys with a stated reason, it runs, the board counts it as an open
exception until carol reviews it; bob (the requester) and alice (not a releaser) get no review button
but the rule's sentence."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from django.utils import timezone

from audit.actors import Actor
from environments.models import Deployment, Environment, FreezeWindow
from environments.services import freeze_window_end, freeze_window_save
from releases.models import Release
from releases.services import PullRequest, TestCounts, build_register, release_register
from tests.processes import wait_for

VERSION = "1.9.0"
SYSTEM = Actor.system(via="test")


@pytest.fixture(autouse=True)
def _reads(django_db_blocker):
    with django_db_blocker.unblock():
        yield


@pytest.fixture
def frozen_production_with_a_release_in_staging(portal, tmp_path):
    """A release the worker takes through QA and Staging, then a freeze holding Production."""
    artifact = Path(tmp_path) / f"mac-{VERSION}.tar.gz"
    artifact.write_bytes(b"MAC emergency fix\n")
    build_register(actor=SYSTEM, application="MAC", number="90", commit="9" * 40, branch="hotfix/BIZPLAT-190-ledger",
                   url="https://ci.example.com/MAC/90", status="successful", tests=TestCounts(10, 0, 0))
    release_register(actor=SYSTEM, application="MAC", version=VERSION, build="90", artifact_url=artifact.as_uri(),
                     artifact_sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(), issue_keys=["BIZPLAT-190"],
                     implementers=["alice@example.com"],
                     pull_request=PullRequest("https://vcs.example.com/mac/pull/90", "alice@example.com", ("erin",)))

    def in_staging():
        d = Deployment.objects.filter(release__version=VERSION, environment__name="Staging").first()
        return d is not None and d.state == Deployment.State.SUCCEEDED

    wait_for(in_staging, timeout=300, what=f"the worker to take {VERSION} through QA and Staging", pause=1)
    now = timezone.now()
    window = freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=Environment.objects.get(application__name="MAC", name="Production"),
        reason="year-end close", starts_at=now - dt.timedelta(minutes=5), ends_at=now + dt.timedelta(hours=2)))
    yield
    freeze_window_end(actor=SYSTEM, window=window, reason="the test is over")


def test_an_emergency_during_a_freeze_runs_and_stays_open_until_someone_else_reviews_it(
        frozen_production_with_a_release_in_staging, bob_page, alice_page, carol_page):
    bob = bob_page
    response = bob.goto(f"/admin/releases/release/{Release.objects.get(version=VERSION).pk}/change/")
    assert response.status == 200, bob.locator("body").inner_text()[:2000]
    assert bob.get_by_role("button", name="Deploy to Production").count() == 0  # frozen: emergencies only
    form = bob.locator("form.emergency")
    assert "does not skip separation of duties" in " ".join(form.inner_text().split())
    form.locator("textarea[name=emergency_reason]").fill("Ledger totals wrong in production")
    form.get_by_role("button", name="Emergency deployment to Production").click()

    def emergency():
        return Deployment.objects.filter(release__version=VERSION, environment__name="Production",
                                         emergency=True).first()

    wait_for(lambda: getattr(emergency(), "state", None) == Deployment.State.SUCCEEDED, timeout=180,
             what="the emergency deployment to run", pause=1)
    deployment = emergency()
    assert deployment.emergency_reason == "Ledger totals wrong in production" and deployment.requested_by_label == "bob"

    carol = carol_page
    carol.goto("/admin/")
    exceptions = carol.locator("#open-exceptions").inner_text()
    assert f"#{deployment.pk}" in exceptions and "awaiting review" in exceptions

    for person, sentence in ((bob, "You requested this emergency deployment; someone else must review it."),
                             (alice_page, "You are not a releaser of MAC Production")):
        person.goto(f"/admin/environments/deployment/{deployment.pk}/change/")
        assert person.get_by_role("button", name="Mark as reviewed").count() == 0
        assert sentence in person.locator("body").inner_text()

    carol.goto(f"/admin/environments/deployment/{deployment.pk}/change/")
    carol.locator("textarea#review-comment").fill("Fix checked against the ledger; freeze exception accepted")
    carol.get_by_role("button", name="Mark as reviewed").click()
    wait_for(lambda: Deployment.objects.get(pk=deployment.pk).reviewed_at is not None, timeout=30,
             what="the review", pause=0.5)
    carol.goto("/admin/")
    assert f"#{deployment.pk} " not in carol.locator("#open-exceptions").inner_text()  # closed (the demo's own stays)
