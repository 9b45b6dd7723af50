"""The analysts' pages, as bob, carol (releasers), alice (developer, implementer) and dave (auditor) see
them: the release board, a release, a deployment, a change's journey. What a page offers is what the
policy allows; what it does not offer, it explains in the rule's sentence; a forged form is refused
by the service with that sentence and is in the audit chain."""

import datetime as dt
import html
import re

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEvent
from edge.templatetags import took
from environments import services
from environments.models import Deployment, DeploymentEvent, Environment, FreezeWindow
from releases import selectors as release_selectors
from releases.models import Application
from tests.conftest import SYSTEM, person

State = Deployment.State
VIEW = ["view_deployment", "view_release", "view_auditevent", "view_environment", "view_build", "view_application"]
NOT_RELEASER_REQUEST = ("You are not a releaser of MAC Production: requesting a deployment there needs the deploy "
                        "permission granted on that environment.")
NOT_RELEASER_APPROVE = ("You are not a releaser of MAC Production: approving there needs the approve permission "
                        "granted on that environment.")


@pytest.fixture
def people(world):
    """The world's people with the view rights the demo gives them (analysts may also request)."""
    view = Permission.objects.filter(codename__in=VIEW)
    for user in (world.alice, world.bob, world.carol, world.dave):
        user.user_permissions.add(*view)
    add = Permission.objects.get(codename="add_deployment")
    world.bob.user_permissions.add(add)
    world.carol.user_permissions.add(add)
    return world


def page(client, user, url, **params):
    client.force_login(user)
    response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    return response


def text(response) -> str:
    return re.sub(r"\s+", " ", html.unescape(response.content.decode()))


def buttons(response) -> list[str]:
    """The labels of the buttons that change something (the search's Find and Log out change nothing)."""
    labels = re.findall(r'<button type="submit"[^>]*>\s*([^<]*?)\s*</button>', response.content.decode())
    return [label for label in labels if label not in ("Find", "Log out")]


def release_url(release):
    return reverse("admin:releases_release_change", args=[release.pk])


def deployment_url(deployment):
    return reverse("admin:environments_deployment_change", args=[deployment.pk])


def in_staging(world, **kw):
    release = world.release(**kw)
    world.to_staging(release)
    return release


def awaiting(world, release=None):
    release = release or in_staging(world)
    return services.deployment_request(actor=person(world.bob), release=release, environment=world.production)


# --- the release board ---------------------------------------------------------------------------

def test_board_shows_what_runs_where_its_queues_and_the_releases_on_their_way(client, people):
    live = people.release("2.0.0")
    people.to_staging(live)
    people.deploy(live, people.production, actor=person(people.bob))
    newer = in_staging(people, version="2.1.0")
    pending = awaiting(people, newer)
    response = page(client, people.dave, reverse("admin:index"))
    board = response.context["board"]
    (mac,) = board
    columns = {c["environment"].name: c for c in mac["environments"]}
    assert list(columns) == ["QA", "Staging", "Production"]  # promotion order
    assert columns["Production"]["current"].release == live
    assert columns["Staging"]["current"].release == newer
    assert [e["id"] for e in columns["Production"]["queue"]] == [pending.pk]
    way = {row["release"].version: [s["label"] for s in row["steps"]] for row in mac["on_the_way"]}
    assert way == {"2.1.0": ["done", "done", "waiting, 0 of 1 approval"]}  # 2.0.0 reached the end of the path
    assert mac["on_the_way_count"] == 1
    body = text(response)
    assert "deployed by bob, approved by carol" in body
    assert "waiting for approval (0 of 1)" in body
    assert 'id="releases-release"' in body  # the app list stays below: settings remain reachable


def test_board_says_a_release_ran_before_where_a_rollback_replaced_it(client, people):
    older, newer = in_staging(people, version="3.0.0"), in_staging(people, version="3.1.0")
    stale = awaiting(people, older)
    people.deploy(newer, people.production, actor=person(people.bob))
    services.deployment_approve(actor=person(people.carol), deployment_id=stale.pk)  # 3.0.0 back: a rollback
    services.deployment_start(deployment_id=stale.pk)
    services.deployment_record_result(deployment_id=stale.pk, state=Deployment.State.SUCCEEDED)
    again = awaiting(people, newer)
    services.deployment_cancel(actor=person(people.bob), deployment_id=again.pk)
    (mac,) = page(client, people.dave, reverse("admin:index")).context["board"]
    way = {row["release"].version: [s["label"] for s in row["steps"]] for row in mac["on_the_way"]}
    assert way["3.1.0"] == ["done", "done", "cancelled; ran here before"]
    people.deploy(older, people.staging, actor=person(people.bob))  # Staging back to 3.0.0 too
    (mac,) = page(client, people.dave, reverse("admin:index")).context["board"]
    way = {row["release"].version: [s["label"] for s in row["steps"]] for row in mac["on_the_way"]}
    assert way["3.1.0"] == ["done", "done; rolled back to 3.0.0", "cancelled; ran here before"]
    assert "done; rolled back to 3.0.0" in text(page(client, people.dave, reverse("admin:index")))


def test_board_counts_every_release_on_its_way_and_shows_the_latest(client, people):
    live = in_staging(people)
    people.deploy(live, people.production, actor=person(people.bob))
    waiting = awaiting(people)  # registered early, but open: always shown
    newer = [people.release() for _ in range(10)]
    (mac,) = page(client, people.dave, reverse("admin:index")).context["board"]
    shown = [row["release"] for row in mac["on_the_way"]]
    assert mac["on_the_way_count"] == 11
    assert shown == [*reversed(newer[-7:]), waiting.release]  # the open one first, then the latest 7
    assert "the latest 8 shown" in text(page(client, people.dave, reverse("admin:index")))


def test_waiting_for_me_lists_only_what_the_policy_lets_each_person_decide(client, people):
    pending = awaiting(people)
    mine = awaiting(people, in_staging(people, implementers=["carol@example.com"]))  # carol implemented it
    waiting = {u.username: [d.pk for d in page(client, u, reverse("admin:index")).context["waiting_for_me"]]
               for u in (people.alice, people.bob, people.carol, people.dave)}
    assert waiting == {"alice": [], "bob": [], "carol": [pending.pk], "dave": []}
    assert mine.pk not in waiting["carol"]
    bob = page(client, people.bob, reverse("admin:index"))
    assert [d.pk for d in bob.context["my_requests"]] == [mine.pk, pending.pk] and bob.context["my_open_requests"] == 2
    assert buttons(bob) == []  # nothing for bob to decide, so no button
    carol = page(client, people.carol, reverse("admin:index"))
    assert buttons(carol) == ["Approve", "Reject"]


def test_carol_approves_in_place_from_the_board(client, people):
    pending = awaiting(people)
    client.force_login(people.carol)
    response = client.post(reverse("admin:environments_deployment_act", args=[pending.pk]),
                           {"action": "approve", "comment": "checked", "next": reverse("admin:index")}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:index")
    pending.refresh_from_db()
    assert pending.state == State.RUNNING  # Production was free: it started at once
    event = AuditEvent.objects.get(action="deployment.approve")
    assert (event.actor_username, event.via, event.data["comment"]) == ("carol", "admin", "checked")
    assert "approved, now running" in text(response)
    assert response.context["waiting_for_me"] == []


def test_a_rejection_from_the_board_needs_a_comment(client, people):
    pending = awaiting(people)
    client.force_login(people.carol)
    url = reverse("admin:environments_deployment_act", args=[pending.pk])
    response = client.post(url, {"action": "reject", "comment": " ", "next": "/admin/"}, follow=True)
    assert "Not rejected: the comment must say why." in text(response)
    pending.refresh_from_db()
    assert pending.state == State.AWAITING_APPROVAL
    client.post(url, {"action": "reject", "comment": "wrong ticket"})
    pending.refresh_from_db()
    assert pending.state == State.REJECTED


def test_searching_an_issue_key_opens_the_changes_journey(client, people):
    release = in_staging(people, issue_keys=["BIZPLAT-64951"])
    client.force_login(people.alice)
    response = client.get(reverse("admin:index"), {"q": " bizplat-64951 "}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:change_journey", args=["BIZPLAT-64951"])
    journey = response.context["journey"]
    assert journey.as_dict() == release_selectors.change_detail("BIZPLAT-64951")  # one selector for both
    assert journey.summary == (f"BIZPLAT-64951 runs in QA and Staging ({release.version}); "
                               "has not reached Production yet.")
    assert journey.summary in text(response)
    version = client.get(reverse("admin:index"), {"q": release.version})  # a version whole opens its release
    assert version.url == reverse("admin:releases_release_change", args=[release.pk])
    prefix = release.version.rsplit(".", 1)[0]  # part of one: the releases it may be
    versions = client.get(reverse("admin:index"), {"q": prefix})
    assert versions.url == reverse("admin:releases_release_changelist") + f"?q={prefix}"
    missing = client.get(reverse("admin:change_journey", args=["BIZPLAT-404"]))
    assert missing.status_code == 404 and missing.templates[0].name == "admin/releases/change_journey.html"
    assert "No build or release carries BIZPLAT-404." in text(missing)  # the API's sentence, on the portal's page


def test_a_deployment_or_page_that_is_not_there_leads_back_to_the_board(client, people):
    """An analyst pasting #71 from a message into the board's search, or a mistyped address: the board
    saying what is not there, as for a release, or the portal's own page with the way back (an
    analysts' walk found Django's bare "Not Found")."""
    client.force_login(people.bob)
    response = client.get(reverse("admin:index"), {"q": "#999999"}, follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:index")
    assert '<li class="warning">There is no deployment #999999.</li>' in text(response)
    deployment = awaiting(people)
    number = client.get(reverse("admin:index"), {"q": str(deployment.pk)})  # 71 as the list reads it: #71
    assert number.url == deployment_url(deployment)
    nothing = client.get(reverse("admin:index"), {"q": "999999"})  # no such deployment: the releases' search
    assert nothing.url == reverse("admin:releases_release_changelist") + "?q=999999"
    for address in ("/admin/changes/", "/admin/no-such-page/"):
        missing = client.get(address)
        assert missing.status_code == 404
        assert "Not found | Release Portal" in text(missing)
        assert f"There is no page at {address}" in text(missing)
        assert f'href="{reverse("admin:index")}">Back to the release board' in missing.content.decode()
        assert 'id="logout-form"' in missing.content.decode()  # the person's own links, as on every page
    client.force_login(people.dave)  # an auditor: no API token is made on a page (the command makes them)
    denied = client.get(reverse("admin:access_apitoken_add"))
    assert denied.status_code == 403 and "Not allowed | Release Portal" in text(denied)
    assert "Your account may not open /admin/access/apitoken/add/" in text(denied)
    assert 'id="logout-form"' in denied.content.decode() and "Change password" in text(denied)
    client.logout()  # nobody signed in: no links of a person
    assert 'id="logout-form"' not in client.get("/admin/no-such-page/").content.decode()
    # the page shown when the portal fails is rendered without a request or a database
    failed = render_to_string("500.html")
    assert "Server error | Release Portal" in failed and 'href="/admin/">Back to the release board' in failed


def test_journey_says_who_approved_and_where_the_change_is_now(client, people):
    release = in_staging(people, issue_keys=["BIZPLAT-7"])
    people.deploy(release, people.production, actor=person(people.bob))
    journey = page(client, people.dave, reverse("admin:change_journey", args=["BIZPLAT-7"])).context["journey"]
    production = next(r for r in journey.reached if r["environment"] == "Production")
    assert (production["requested_by"], production["approved_by"]) == ("bob", ["carol"])
    assert [n["state"] for n in journey.now] == ["deployed", "deployed", "deployed"]
    assert journey.summary == f"BIZPLAT-7 runs in QA, Staging and Production ({release.version})."
    in_staging(people, issue_keys=["BIZPLAT-8"])  # a later change takes QA and Staging
    journey = page(client, people.dave, reverse("admin:change_journey", args=["BIZPLAT-7"])).context["journey"]
    assert journey.summary == (f"BIZPLAT-7 runs in Production ({release.version}); ran in QA and Staging, where "
                               "later releases replaced it.")


def test_journey_says_where_a_change_was_rolled_back(client, people):
    older = in_staging(people, version="2.0.0", issue_keys=["BIZPLAT-6"])
    change = in_staging(people, version="2.1.0", issue_keys=["BIZPLAT-7"])
    people.deploy(older, people.production, actor=person(people.bob))
    people.deploy(change, people.production, actor=person(people.bob))
    people.deploy(older, people.production, actor=person(people.bob))  # back to 2.0.0: a rollback
    shown = page(client, people.dave, reverse("admin:change_journey", args=["BIZPLAT-7"]))
    assert shown.context["journey"].summary == (
        "BIZPLAT-7 runs in QA and Staging (2.1.0); ran in Production, which was rolled back to 2.0.0.")
    assert "2.0.0 runs here now (rolled back to it)." in text(shown)


def test_journey_shows_an_emergency_as_one_and_who_reviewed_it(client, people):
    release = in_staging(people, issue_keys=["BIZPLAT-8"])
    emergency = services.deployment_request(actor=person(people.bob), release=release,
                                            environment=people.production, emergency_reason="payments down")
    services.deployment_start(deployment_id=emergency.pk)
    services.deployment_record_result(deployment_id=emergency.pk, state=State.SUCCEEDED)
    url = reverse("admin:change_journey", args=["BIZPLAT-8"])
    before = re.sub(r"<[^>]+>", "", text(page(client, people.dave, url)))
    assert "Emergency: skipped the approval wait (payments down); not reviewed yet" in before
    services.deployment_review(actor=person(people.carol), deployment_id=emergency.pk, comment="checked")
    production = next(r for r in page(client, people.dave, url).context["journey"].reached
                      if r["environment"] == "Production")
    assert (production["emergency"], production["reviewed_by"], production["approved_by"]) == (True, "carol", [])
    assert "reviewed by carol" in text(page(client, people.dave, url))


# --- a release's page: Deploy to ... or why not --------------------------------------------------

def standing(response) -> dict[str, dict]:
    """Per environment: the offered buttons and the refusal sentences shown."""
    return {s["environment"].name: {"offered": [o.label for o in s["offers"] if o.allowed],
                                    "why_not": [o.refusal.detail for o in s["offers"] if not o.allowed]}
            for s in response.context["page"]["standing"]}


def test_release_page_offers_each_person_what_the_policy_allows_and_says_why_not(client, people):
    release = in_staging(people)
    seen = {u.username: standing(page(client, u, release_url(release)))
            for u in (people.alice, people.bob, people.carol, people.dave)}
    assert seen["bob"]["Production"] == {"offered": ["Deploy to Production"], "why_not": []}
    assert seen["carol"]["Production"] == {"offered": ["Deploy to Production"], "why_not": []}
    assert seen["alice"]["Production"] == {"offered": [], "why_not": [NOT_RELEASER_REQUEST]}
    assert seen["alice"]["QA"]["offered"] == ["Deploy to QA"]  # a developer redeploys where she may
    assert seen["dave"] == {name: {"offered": [], "why_not": [f"You are not allowed to request deployments to "
                                                               f"MAC {name}."]} for name in ("QA", "Staging")} | {
        "Production": {"offered": [], "why_not": [NOT_RELEASER_REQUEST]}}
    dave = page(client, people.dave, release_url(release))
    assert buttons(dave) == [] and NOT_RELEASER_REQUEST in text(dave)
    alice = page(client, people.alice, release_url(release))
    assert "Deploy to Production" not in text(alice) and NOT_RELEASER_REQUEST in text(alice)


def test_release_page_explains_separation_of_duties_and_the_promotion_path(client, people):
    bobs = in_staging(people, implementers=["alice@example.com", "bob@example.com"])
    assert standing(page(client, people.bob, release_url(bobs)))["Production"] == {
        "offered": [], "why_not": ["You implemented this change, so you may not request production of it."]}
    assert standing(page(client, people.carol, release_url(bobs)))["Production"]["offered"] == ["Deploy to Production"]
    fresh = people.release()
    seen = standing(page(client, people.bob, release_url(fresh)))
    assert seen["Staging"]["why_not"] == [f"MAC {fresh.version} has not been deployed successfully to QA, which "
                                          "comes before Staging."]
    assert seen["QA"]["offered"] == ["Deploy to QA"]


def test_bob_deploys_to_production_from_the_release_page(client, people):
    release = in_staging(people)
    client.force_login(people.bob)
    response = client.post(reverse("admin:releases_release_deploy", args=[release.pk]),
                           {"environment": people.production.pk}, follow=True)
    deployment = Deployment.objects.get(release=release, environment=people.production)
    assert response.redirect_chain[-1][0] == deployment_url(deployment)
    assert deployment.state == State.AWAITING_APPROVAL and deployment.requested_by == people.bob
    assert "requested for Production" in text(response)
    event = AuditEvent.objects.get(action="deployment.request", object_id=str(deployment.pk))
    assert (event.actor_username, event.via) == ("bob", "admin")


def test_a_forged_deploy_form_is_refused_with_the_rules_sentence_and_audited(client, people):
    release = in_staging(people)
    client.force_login(people.alice)
    response = client.post(reverse("admin:releases_release_deploy", args=[release.pk]),
                           {"environment": people.production.pk}, follow=True)
    assert response.redirect_chain[-1][0] == release_url(release)
    assert f"Refused (NOT_RELEASER). {NOT_RELEASER_REQUEST}" in text(response)
    event = AuditEvent.objects.get(action="deployment.request.refused")
    assert (event.code, event.actor_username, event.via, event.data["detail"]) == (
        "NOT_RELEASER", "alice", "admin", NOT_RELEASER_REQUEST)
    assert not Deployment.objects.filter(environment=people.production).exists()
    other = Environment.objects.create(application=Application.objects.create(name="HAMS", issue_key_prefix="HAMS"),
                                       name="QA")
    response = client.post(reverse("admin:releases_release_deploy", args=[release.pk]), {"environment": other.pk},
                           follow=True)
    assert "Choose an environment of this release's application." in text(response)


def test_under_a_freeze_a_releaser_is_offered_an_emergency_deployment(client, people):
    release = in_staging(people)
    now = timezone.now()
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=people.production, reason="year-end close", starts_at=now - dt.timedelta(hours=1),
        ends_at=now + dt.timedelta(days=1)))
    bob = page(client, people.bob, release_url(release))
    offers = [(o.action, o.allowed) for s in bob.context["page"]["standing"] for o in s["offers"]
              if s["environment"] == people.production]
    assert offers == [("deploy", False), ("emergency", True)]
    assert "is frozen until" in text(bob) and "Emergency deployment to Production" in text(bob)
    assert "Emergency deployment" not in text(page(client, people.alice, release_url(release)))
    client.force_login(people.bob)
    url = reverse("admin:releases_release_deploy", args=[release.pk])
    assert "needs its reason" in text(client.post(url, {"environment": people.production.pk, "emergency": "1"},
                                                  follow=True))
    too_long = text(client.post(url, {"environment": people.production.pk, "emergency": "1",
                                      "emergency_reason": "x" * 2001}, follow=True))
    assert "The emergency's reason: Ensure this value has at most 2000 characters (it has 2001)." in too_long
    assert "Choose an environment" not in too_long
    client.post(url, {"environment": people.production.pk, "emergency": "1", "emergency_reason": "payments down"})
    deployment = Deployment.objects.get(release=release, environment=people.production)
    assert (deployment.emergency, deployment.emergency_reason, deployment.state) == (True, "payments down", "running")
    shown = text(page(client, people.carol, deployment_url(deployment)))
    assert "Approvals (an emergency skips the wait)" in shown and "0 of 1 required" not in shown
    # what it went past, as the exceptions report says it (an analysts' walk found it only there)
    assert re.search(r"payments down \(it went past a freeze: frozen until 20[0-9-]+ [0-9:]+ UTC", shown)
    assert "an emergency deployment skips the approval wait; someone else reviews it afterwards" in shown


def freeze_production(people):
    now = timezone.now()
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=people.production, reason="year-end close", starts_at=now - dt.timedelta(hours=1),
        ends_at=now + dt.timedelta(days=1)))


def test_an_emergency_nobody_could_review_is_said_before_it_is_asked_and_on_its_page(client, people):
    """bob and erin implemented it, carol asks: no releaser is left to review it (rule 7)."""
    release = in_staging(people, implementers=("bob@example.com", "erin@example.com"))
    freeze_production(people)
    assert "Nobody could review it afterwards" in text(page(client, people.carol, release_url(release)))
    client.post(reverse("admin:releases_release_deploy", args=[release.pk]),
                {"environment": people.production.pk, "emergency": "1", "emergency_reason": "payments down"})
    deployment = Deployment.objects.get(release=release, environment=people.production, emergency=True)
    assert "Nobody can review it yet:" in text(page(client, people.dave, deployment_url(deployment)))
    alice = page(client, people.alice, deployment_url(deployment))
    assert offers(alice)["review"] == "NOT_RELEASER"
    assert ("reviewing an emergency deployment there needs the approve permission" in
            alice.context["offers"][-1].refusal.detail)

    services.environment_grant(actor=SYSTEM, environment=people.production, codename="approve_environment",
                               user=people.dave)
    shown = text(page(client, people.dave, deployment_url(deployment)))
    assert 'neither implemented nor requested it: <span id="reviewers">dave</span>.' in shown
    board = page(client, people.dave, reverse("admin:index"))
    assert [d.pk for d in board.context["reviews_for_me"]] == [deployment.pk]
    assert "Waiting for me (1)" in text(board) and "Emergencies for you to review" in text(board)
    carols = page(client, people.carol, reverse("admin:index"))
    assert carols.context["reviews_for_me"] == []  # she asked for it: the board says so, in the rule's sentence
    assert ("Review: You requested this emergency deployment; someone else must review it."
            in text(carols).split("Emergencies awaiting review")[1])
    assert "Review:" not in text(board).split("Emergencies awaiting review")[1]  # dave may: the button says it
    assert "Nobody could review it afterwards" not in text(page(client, people.carol, release_url(
        in_staging(people, implementers=("bob@example.com",)))))


def test_a_rollback_is_said_before_the_click_on_the_release_page_and_the_board(client, people):
    oldest, older, newer = (in_staging(people, version=v) for v in ("2.9.0", "3.0.0", "3.1.0"))
    awaiting(people, older)
    people.deploy(newer, people.production, actor=person(people.bob))
    assert "A rollback: Production runs 3.1.0, registered after 3.0.0." in text(
        page(client, people.carol, reverse("admin:index")))
    warned = "A rollback: Production runs 3.1.0, registered after 2.9.0; deploying puts the older release back."
    assert warned in text(page(client, people.carol, release_url(oldest)))
    assert "A rollback: Production" not in text(page(client, people.alice, release_url(oldest)))  # not hers to ask
    assert "A rollback" not in text(page(client, people.carol, release_url(newer)))


# --- a deployment's page -------------------------------------------------------------------------

def offers(response) -> dict[str, str]:
    return {o.action: "offered" if o.allowed else o.refusal.code for o in response.context["offers"]}


def test_deployment_page_says_what_it_replaces_and_when_that_is_a_rollback(client, people):
    older, newer = in_staging(people, version="3.0.0"), in_staging(people, version="3.1.0")
    stale = awaiting(people, older)
    people.deploy(newer, people.production, actor=person(people.bob))  # approved and run before the old request
    shown = text(page(client, people.carol, deployment_url(stale)))
    assert "<dt>Replaces</dt><dd id=\"replaces\">3.1.0, which runs in Production now" in shown
    assert "3.1.0 was registered after 3.0.0: this deployment puts the older release back (a rollback)." in shown
    latest = in_staging(people, version="3.2.0")
    shown = text(page(client, people.carol, deployment_url(awaiting(people, latest))))
    assert "<dd id=\"replaces\">3.1.0, which runs in Production now" in shown and "rollback" not in shown
    # once it ran, the page still says what it replaced, and that it was a rollback (as the changes report)
    services.deployment_approve(actor=person(people.carol), deployment_id=stale.pk)
    services.deployment_start(deployment_id=stale.pk)
    services.deployment_record_result(deployment_id=stale.pk, state=State.SUCCEEDED)
    shown = text(page(client, people.dave, deployment_url(stale)))
    assert "<dt>Replaced</dt><dd id=\"replaced\">" in shown
    assert ">3.1.0</a>, which ran in Production when it started" in shown
    assert "3.1.0 was registered after 3.0.0: this deployment took the environment back to the older release" in shown


def test_deployment_page_offers_approve_reject_cancel_the_way_the_policy_decides(client, people):
    pending = awaiting(people)
    url = deployment_url(pending)
    seen = {u.username: offers(page(client, u, url)) for u in (people.alice, people.bob, people.carol, people.dave)}
    assert seen == {
        "alice": {"approve": "NOT_RELEASER", "reject": "NOT_RELEASER", "cancel": "NOT_RELEASER"},
        "bob": {"approve": "SOD_REQUESTER_APPROVER", "reject": "SOD_REQUESTER_APPROVER", "cancel": "offered"},
        "carol": {"approve": "offered", "reject": "offered", "cancel": "offered"},
        "dave": {"approve": "NOT_RELEASER", "reject": "NOT_RELEASER", "cancel": "NOT_RELEASER"},
    }
    carol = page(client, people.carol, url)
    assert buttons(carol) == ["Approve", "Reject", "Cancel this deployment"]
    bob = page(client, people.bob, url)
    assert buttons(bob) == ["Cancel this deployment"]
    assert "You requested this deployment, so you may not approve it." in text(bob)
    for user in (people.alice, people.dave):
        response = page(client, user, url)
        assert buttons(response) == [] and NOT_RELEASER_APPROVE in text(response)


def test_the_requester_cancels_from_the_page(client, people):
    pending = awaiting(people)
    client.force_login(people.bob)
    response = client.post(reverse("admin:environments_deployment_act", args=[pending.pk]), {"action": "cancel"},
                           follow=True)
    pending.refresh_from_db()
    assert pending.state == State.CANCELLED and f"{pending.release} to Production: cancelled." in text(response)
    assert offers(page(client, people.bob, deployment_url(pending))) == {}  # nothing left to do
    event = AuditEvent.objects.get(action="deployment.cancel", object_id=str(pending.pk))
    assert (event.actor_username, event.via) == ("bob", "admin")


def test_an_emergency_is_reviewed_from_its_page_by_someone_else(client, people):
    release = in_staging(people)
    emergency = services.deployment_request(actor=person(people.bob), release=release,
                                            environment=people.production, emergency_reason="payments down")
    services.deployment_start(deployment_id=emergency.pk)
    services.deployment_record_result(deployment_id=emergency.pk, state=State.SUCCEEDED)
    url = deployment_url(emergency)
    assert offers(page(client, people.bob, url)) == {"review": "SOD_REQUESTER_REVIEWER"}
    assert offers(page(client, people.alice, url)) == {"review": "NOT_RELEASER"}
    carol = page(client, people.carol, url)
    assert offers(carol) == {"review": "offered"} and buttons(carol) == ["Mark as reviewed"]
    assert "Awaiting review" in text(carol) and "payments down" in text(carol)
    client.force_login(people.carol)
    act = reverse("admin:environments_deployment_act", args=[emergency.pk])
    assert "Not reviewed: the comment must say why." in text(client.post(act, {"action": "review"}, follow=True))
    done = text(client.post(act, {"action": "review", "comment": "outage ticket INC-7 checked"}, follow=True))
    assert f"Open deployment #{emergency.pk}</a>" in done  # it ended: nothing to follow
    emergency.refresh_from_db()
    assert (emergency.reviewed_by, emergency.review_comment) == (people.carol, "outage ticket INC-7 checked")
    assert "Reviewed by carol" in text(page(client, people.dave, url))


def test_a_forged_approval_is_refused_with_the_rules_sentence_and_audited(client, people):
    pending = awaiting(people)
    client.force_login(people.alice)
    response = client.post(reverse("admin:environments_deployment_act", args=[pending.pk]),
                           {"action": "approve", "comment": "lgtm"}, follow=True)
    assert f"Refused (NOT_RELEASER). {NOT_RELEASER_APPROVE}" in text(response)
    pending.refresh_from_db()
    assert pending.state == State.AWAITING_APPROVAL
    event = AuditEvent.objects.get(action="deployment.approve.refused")
    assert (event.code, event.actor_username, event.via, event.object_id, event.data["detail"]) == (
        "NOT_RELEASER", "alice", "admin", str(pending.pk), NOT_RELEASER_APPROVE)


def test_deployment_page_reads_as_sentences(client, people):
    pending = awaiting(people)
    before = text(page(client, people.dave, deployment_url(pending)))
    assert "Expires" in before and "Emergency" not in before and "icon-no" not in before
    assert before.count("Requested by") == 1
    # its state says it awaits approval; the sentence beside it says how far (not "Waiting for approval" again)
    assert 'Awaiting approval</span> <span data-live="place">0 of 1 approvals given.</span>' in before
    done = services.deployment_approve(actor=person(people.carol), deployment_id=pending.pk)
    services.deployment_start(deployment_id=done.pk)
    services.deployment_record_result(deployment_id=done.pk, state=State.SUCCEEDED)
    after = text(page(client, people.dave, deployment_url(pending)))
    assert "Expires" not in after  # decided: the expiry no longer matters
    for sentence in ("The requester did not implement the change.",
                     "No one who approved or rejected it implemented the change.",
                     "No one who approved or rejected it requested the deployment.",
                     "Each approval or rejection came from a different person."):
        assert f"✓ {sentence}" in after
    assert "approver_not_requester" not in after


def test_deployment_page_shows_progress_and_the_latest_log_lines(client, people):
    deployment = services.deployment_request(actor=people.ci, release=people.release(), environment=people.qa)
    services.deployment_start(deployment_id=deployment.pk, engine="test:1")
    DeploymentEvent.objects.bulk_create(DeploymentEvent(deployment=deployment, counter=n, event="verbose",
                                                        stdout=f"line {n}") for n in range(1, 301))
    Deployment.objects.filter(pk=deployment.pk).update(progress={
        "hosts_total": 3, "hosts_done": 1, "current_task": "Health check", "current_host": "web2",
        "hosts": {"web1": "done", "web2": "upgrading"}})
    response = page(client, people.dave, deployment_url(deployment))
    body = text(response)
    assert '<progress data-live="hosts_done" value="1" max="3">' in body and "Health check" in body
    assert "line 300" in body and "line 101" in body and "line 100 " not in body  # the tail, not the head
    assert 'data-live-url="' + reverse("admin:environments_deployment_live", args=[deployment.pk]) in body
    assert 'src="/static/portal/live.js"' in body and "<script>" not in body  # the project's own file, no inline
    live = client.get(reverse("admin:environments_deployment_live", args=[deployment.pk])).json()
    assert (live["state"], live["open"], live["hosts_done"], live["hosts_total"], live["current_task"]) == (
        "running", True, 1, 3, "Health check")
    assert live["log"].splitlines()[-1] == "line 300" and len(live["log"].splitlines()) == 200 and live["log_cut"]
    whole = b"".join(client.get(reverse("admin:environments_deployment_log", args=[deployment.pk])).streaming_content)
    assert whole.decode().splitlines() == [f"line {n}" for n in range(1, 301)]


def test_a_deployment_that_ended_before_any_host_says_so_not_0_of_0(client, people):
    """A deployment refused at its start, or one whose run reported no host, has no progress to draw
    (an analysts' walk found "0 of 0 hosts done" under an empty bar); one just started does."""
    ended = people.deploy(people.release(), people.qa, result=State.FAILED)
    body = text(page(client, people.dave, deployment_url(ended)))
    assert "No host reported progress." in body and "hosts done" not in body and "<progress" not in body
    started = services.deployment_request(actor=people.ci, release=people.release(), environment=people.qa)
    services.deployment_start(deployment_id=started.pk, engine="test:1")
    body = text(page(client, people.dave, deployment_url(started)))
    assert "hosts done" in body and "<progress" in body and "No host reported" not in body  # it fills as it runs


def test_pages_need_view_permission(client, people, make_user):
    pending = awaiting(people)
    nobody = make_user("nobody")
    client.force_login(nobody)
    assert client.get(deployment_url(pending)).status_code == 403
    assert client.get(reverse("admin:environments_deployment_live", args=[pending.pk])).status_code == 403
    assert client.post(reverse("admin:environments_deployment_act", args=[pending.pk]),
                       {"action": "approve"}).status_code == 403
    assert client.get(reverse("admin:change_journey", args=["BIZPLAT-1"])).status_code == 403
    assert client.get(reverse("admin:index")).context["board"] is None


# --- lists and the audit events ------------------------------------------------------------------

def test_issue_keys_link_to_the_applications_tracker(client, people):
    people.app.issue_url_pattern = "https://jira.example.com/browse/{key}"
    people.app.full_clean()
    people.app.save()
    release = people.release(issue_keys=["BIZPLAT-77"])
    body = page(client, people.dave, release_url(release)).content.decode()
    assert 'href="https://jira.example.com/browse/BIZPLAT-77"' in body
    assert f'href="{reverse("admin:change_journey", args=["BIZPLAT-77"])}"' in body
    journey = page(client, people.dave, reverse("admin:change_journey", args=["BIZPLAT-77"])).content.decode()
    assert 'href="https://jira.example.com/browse/BIZPLAT-77"' in journey
    people.app.issue_url_pattern = "jira.example.com/browse/"
    with pytest.raises(ValidationError, match=r"\{key\}"):
        people.app.full_clean()


def test_lists_offer_no_action_that_the_pages_do_better(client, people):
    release = in_staging(people)
    for url in (reverse("admin:environments_deployment_changelist"), reverse("admin:releases_release_changelist")):
        response = page(client, people.carol, url)
        assert 'name="action"' not in response.content.decode()
    listing = page(client, people.dave, reverse("admin:releases_release_changelist"))
    row = next(r for r in listing.context["cl"].result_list if r.pk == release.pk)
    assert row.runs_in == ["QA", "Staging"]
    newer = in_staging(people)
    listing = page(client, people.dave, reverse("admin:releases_release_changelist"))
    rows = {r.pk: r.runs_in for r in listing.context["cl"].result_list}
    assert (rows[release.pk], rows[newer.pk]) == ([], ["QA", "Staging"])  # where it runs now, not where it has been


def test_audit_list_says_how_a_deployment_ended(client, people):
    release = people.release()
    people.deploy(release, people.qa)
    people.deploy(release, people.staging, result=State.FAILED)
    body = text(page(client, people.dave, reverse("admin:audit_auditevent_changelist")))
    assert "deployment.finish: succeeded" in body and "deployment.finish: failed" in body


def test_an_emergency_is_an_open_exception_on_the_board_until_someone_else_reviews_it(client, people, settings):
    world = people
    release = world.release()
    world.to_staging(release)
    now = timezone.now()
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=world.production, reason="quarter close", starts_at=now - dt.timedelta(hours=1),
        ends_at=now + dt.timedelta(hours=2)))
    emergency = services.deployment_request(actor=person(world.bob), release=release, environment=world.production,
                                            emergency_reason="payments down")
    board = text(page(client, world.carol, reverse("admin:index")))
    assert "Emergencies awaiting review (1)" in board and f"#{emergency.pk}" in board and "awaiting review" in board
    assert '<p class="frozen">' in board and "UTC: quarter close" in board  # the freeze on Production's column
    Deployment.objects.filter(pk=emergency.pk).update(
        requested_at=now - dt.timedelta(days=settings.PORTAL_REVIEW_DUE_DAYS + 1))
    board = page(client, world.carol, reverse("admin:index")).content.decode()
    assert 'class="overdue"' in board and "review overdue" in board
    services.deployment_review(actor=person(world.carol), deployment_id=emergency.pk, comment="checked")
    assert "Emergencies awaiting review (0)" in text(page(client, world.carol, reverse("admin:index")))


def test_spans_add_up_with_the_times_the_pages_show():
    """A page writes times to the second (truncated): the span between two of them is their difference."""
    queued = dt.datetime(2026, 11, 30, 23, 37, 53, 900_000, tzinfo=dt.UTC)
    started = dt.datetime(2026, 11, 30, 23, 38, 13, 100_000, tzinfo=dt.UTC)  # shown 23:38:13
    finished = dt.datetime(2026, 11, 30, 23, 38, 16, 950_000, tzinfo=dt.UTC)  # shown 23:38:16
    assert (took(started, queued), took(finished, started)) == ("20 s", "3 s")  # 53 + 20 = 13, 13 + 3 = 16


def test_the_deployment_list_names_the_portal_as_the_pages_do(client, people):
    people.qa.auto_deploy = True
    people.qa.save(update_fields=["auto_deploy"])
    people.release()
    listed = text(page(client, people.dave, reverse("admin:environments_deployment_changelist")))
    assert "the portal (automatic)" in listed


def test_every_page_says_its_times_are_utc_and_a_freeze_shows_its_own_zone_too(client, people, make_user):
    services.freeze_window_save(actor=SYSTEM, window=FreezeWindow(
        environment=people.production, reason="close", timezone="Europe/Berlin",
        starts_at=dt.datetime(2026, 12, 30, 23, tzinfo=dt.UTC), ends_at=dt.datetime(2027, 1, 2, 5, tzinfo=dt.UTC)))
    root = make_user("root", superuser=True)
    listed = text(page(client, root, reverse("admin:environments_freezewindow_changelist")))
    assert "2026-12-30 23:00 UTC (2026-12-31 00:00 Europe/Berlin)" in listed
    assert "2027-01-02 05:00 UTC (2027-01-02 06:00 Europe/Berlin)" in listed
    for url in (reverse("admin:index"), reverse("admin:environments_deployment_changelist")):
        assert "times in UTC" in text(page(client, root, url))
