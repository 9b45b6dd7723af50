"""The analysts' portal in a browser, on the demo as `make run` serves it (with its worker): bob promotes
a release from its page, carol approves it in place, the deployment page follows the playbook without a
reload, and the board then shows the release in Production; alice gets no button and the rule's
sentence, and her forged approval is refused and on record; dave sees everything and can change
nothing; a change's journey is one search away. The test run saves the screenshots README shows."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Error as PlaywrightError

from audit.models import AuditEvent
from environments.models import Deployment
from tests.processes import wait_for

R = "1.3.1"  # the demo's release that the worker takes through QA and Staging
NOT_RELEASER_APPROVE = ("You are not a releaser of MAC Production: approving there needs the approve permission "
                        "granted on that environment.")
NOT_RELEASER_REQUEST = ("You are not a releaser of MAC Production: requesting a deployment there needs the deploy "
                        "permission granted on that environment.")


def deployment(version: str, environment: str) -> Deployment | None:
    return (Deployment.objects.filter(release__version=version, environment__name=environment)
            .order_by("-id").first())


@pytest.fixture(autouse=True)
def _reads(django_db_blocker):
    """The tests read what the portal's processes committed (autocommit: each read sees the latest)."""
    with django_db_blocker.unblock():
        yield


@pytest.fixture(scope="module")
def r_in_staging(portal, django_db_blocker):
    """The worker has run what demo_data queued: 1.3.0 failed in QA, 1.3.1 went through QA and Staging."""
    with django_db_blocker.unblock():
        wait_for(lambda: getattr(deployment(R, "Staging"), "state", None) == Deployment.State.SUCCEEDED,
                 timeout=300, what=f"the worker to take {R} through QA and Staging", pause=1)


def changing_forms(page) -> list[str]:
    """The forms on the page that a person could post to change something (log-out aside): a form that
    posts and has a button. The search and the report download only read."""
    forms = page.locator("form[method=post]").all()
    return [f.get_attribute("action") or "" for f in forms if f.get_attribute("id") != "logout-form"
            and f.locator("button, input[type=submit]").count()]


def board_column(page, environment: str):
    return page.locator(f'#board-mac .env-card[data-environment="{environment}"]')


def test_bob_deploys_r_carol_approves_in_place_and_the_board_shows_it_in_production(
        r_in_staging, bob_page, carol_page, screenshot):
    bob = bob_page
    bob.goto("/admin/")
    assert board_column(bob, "Staging").locator(".env-version").inner_text() == R
    way = bob.locator(f'table.steps tr[data-release="{R}"]')
    assert [c.inner_text() for c in way.locator("td.step").all()] == ["done", "done", "-"]
    way.get_by_role("link", name=R).click()
    screenshot(bob, "release")
    production = bob.locator('#standing [data-environment="Production"]')
    production.get_by_role("button", name="Deploy to Production").click()
    bob.wait_for_url(re.compile(r"/admin/environments/deployment/\d+/change/$"))
    assert "requested for Production" in bob.locator(".messagelist").inner_text()
    assert "You requested this deployment, so you may not approve it." in bob.locator("#actions").inner_text()
    assert bob.get_by_role("button", name="Approve").count() == 0

    carol = carol_page
    carol.goto("/admin/")
    pending = deployment(R, "Production")
    row = carol.locator(f'#waiting-for-me tr[data-deployment="{pending.pk}"]')
    row.locator("input[name=comment]").fill("BIZPLAT-104 and its tests checked")
    screenshot(carol, "board")
    row.get_by_role("button", name="Approve").click()
    carol.wait_for_url("**/admin/")
    assert "approved, now running" in carol.locator(".messagelist").inner_text()
    carol.get_by_role("link", name=f"Follow deployment #{pending.pk}").click()
    carol.wait_for_url(f"**/admin/environments/deployment/{pending.pk}/change/")
    carol.wait_for_load_state("load")
    assert carol.locator("#state").inner_text() in ("Queued", "Running")

    reloads = []
    carol.on("load", lambda _: reloads.append(True))  # the page reloads once, when the state changes
    first = carol.locator('#progress span[data-live="current_task"]').inner_text()
    tasks = []

    def moving():
        if reloads:
            return True
        try:
            task = carol.locator('#progress span[data-live="current_task"]').inner_text(timeout=2000)
        except PlaywrightError:
            return bool(reloads)
        if task not in ("-", "") and task not in tasks:
            tasks.append(task)
            if len(tasks) == 1 and not reloads:
                screenshot(carol, "deployment-running")
        return False

    wait_for(moving, timeout=180, what="the deployment to finish", pause=0.5)
    # the current task moved on while the page stayed (however fast the playbook on a busy machine)
    assert [t for t in tasks if t != first], (first, tasks)
    carol.wait_for_load_state()
    assert carol.locator("#state").inner_text() == "Succeeded"
    assert "1 of 1 hosts done" in carol.locator("#progress .progress").inner_text()
    assert "PLAY RECAP" in carol.locator("pre.output-log").inner_text()

    bob.goto("/admin/")
    assert board_column(bob, "Production").locator(".env-version").inner_text() == R
    assert "approved by carol" in board_column(bob, "Production").inner_text()
    assert bob.offline.blocked == carol.offline.blocked == []


def test_alice_gets_no_button_the_rules_sentence_and_her_forged_approval_is_on_record(r_in_staging, alice_page):
    alice = alice_page
    release = deployment(R, "Staging").release
    alice.goto(f"/admin/releases/release/{release.pk}/change/")
    production = alice.locator('#standing [data-environment="Production"]')
    assert production.get_by_role("button").count() == 0
    assert NOT_RELEASER_REQUEST in production.inner_text()

    waiting = deployment("1.2.0", "Production")  # the demo's request awaiting approval
    alice.goto(f"/admin/environments/deployment/{waiting.pk}/change/")
    assert alice.get_by_role("button", name="Approve").count() == 0
    assert NOT_RELEASER_APPROVE in alice.locator("#actions").inner_text()
    assert changing_forms(alice) == []
    alice.evaluate("""(url) => {  // the form she was not given, made by hand
        const form = document.createElement("form");
        form.method = "post"; form.action = url;
        const fields = {csrfmiddlewaretoken: document.querySelector("[name=csrfmiddlewaretoken]").value,
                        action: "approve", comment: "looks fine to me"};
        for (const [name, value] of Object.entries(fields)) {
            const input = document.createElement("input");
            input.type = "hidden"; input.name = name; input.value = value; form.appendChild(input);
        }
        document.body.appendChild(form); form.submit();
    }""", f"/admin/environments/deployment/{waiting.pk}/act/")
    alice.wait_for_load_state()
    assert f"Refused (NOT_RELEASER). {NOT_RELEASER_APPROVE}" in alice.locator(".messagelist").inner_text()
    waiting.refresh_from_db()
    assert waiting.state == Deployment.State.AWAITING_APPROVAL
    event = AuditEvent.objects.filter(action="deployment.approve.refused", actor_username="alice").get()
    assert (event.code, event.via, event.object_id, event.data["detail"]) == (
        "NOT_RELEASER", "admin", str(waiting.pk), NOT_RELEASER_APPROVE)
    alice.goto("/admin/audit/auditevent/?code__exact=NOT_RELEASER")
    assert "deployment.approve.refused" in alice.locator("#result_list").inner_text()


def test_dave_sees_everything_downloads_a_report_and_can_change_nothing(r_in_staging, dave_page, tmp_path):
    dave = dave_page
    release = deployment(R, "Staging").release
    failed = deployment("1.3.0", "QA")
    for url in ("/admin/", f"/admin/releases/release/{release.pk}/change/",
                f"/admin/environments/deployment/{deployment('1.2.0', 'Production').pk}/change/",
                f"/admin/environments/deployment/{failed.pk}/change/", "/admin/changes/BIZPLAT-104/",
                "/admin/environments/deployment/", "/admin/releases/release/", "/admin/audit/auditevent/"):
        dave.goto(url)
        assert dave.locator("#content").is_visible(), url
        assert changing_forms(dave) == [], url
        assert dave.evaluate("document.documentElement.scrollWidth") <= 1366, url  # fits the screen
    dave.goto(f"/admin/environments/deployment/{failed.pk}/change/")
    assert dave.locator("#result").inner_text().startswith(
        'Result: Failed on localhost, task "Refuse an artifact whose SHA-256 differs from the release\'s": '
        "Checksum mismatch for mac-1.3.0.tar.gz")
    dave.goto("/admin/")
    dave.get_by_role("link", name="SOX reports").click()
    dave.select_option("#id_report", "changes")
    with dave.expect_download() as download:
        dave.get_by_role("button", name="Download").click()
    assert download.value.suggested_filename.startswith("changes-") and download.value.suggested_filename.endswith(
        ".zip")
    assert dave.offline.blocked == []


def test_searching_a_change_shows_its_journey_through_every_environment(r_in_staging, bob_page, screenshot):
    wait_for(lambda: getattr(deployment(R, "Production"), "state", None) == Deployment.State.SUCCEEDED,
             timeout=180, what=f"{R} to reach Production", pause=1)  # the first test took it there
    bob = bob_page
    bob.goto("/admin/")
    bob.fill("#board-q", "bizplat-104")
    bob.get_by_role("button", name="Find").click()
    bob.wait_for_url("**/admin/changes/BIZPLAT-104/")
    assert bob.locator("#summary").inner_text() == f"BIZPLAT-104 runs in QA, Staging and Production ({R})."
    now = {card.get_attribute("data-environment"): card.inner_text() for card in bob.locator("#now .standing > div")
           .all()}
    assert list(now) == ["QA", "Staging", "Production"] and all("runs here" in text for text in now.values())
    assert bob.locator("#builds tbody tr").count() == 2  # both builds of its branch
    assert "MAC 1.3.0" in bob.locator("#releases").inner_text() and "failed" in bob.locator("#releases").inner_text()
    assert "carol" in bob.locator("#reached").inner_text()  # who approved Production
    screenshot(bob, "journey")
