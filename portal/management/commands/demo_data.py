"""Demo data: one application on a QA -> Staging -> Production path, its releasers, and releases
that leave something for each step of README's walk-through.

The releases' past is recorded through the services, in the audit chain like everything else: 1.0.0
reached Production (requested by bob, approved by carol), 1.1.0 (implemented by alice and bob)
reached Staging, 1.2.0 reached Staging and waits for an approval to go to Production. Those past
deployments are recorded by this command through the deploy engine's own services, without running
a playbook (their result says so). The two newest releases are left to the worker that `make run`
starts: 1.3.0, whose artifact in the store is damaged, fails in QA (the playbook refuses its
checksum), and 1.3.1, the fix for the same change, goes through QA and Staging by itself and then
waits for someone to request Production.

Only in demo mode (settings.DEMO, PORTAL_DEMO=1): the demo users have known passwords.

Running it twice changes nothing: every step looks before it writes, and writes through services.
"""

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from access.services import group_permissions_change, user_save
from audit.actors import Actor
from environments import policy, services
from environments.models import Deployment, Environment
from environments.services import environment_grant, environment_save, group_membership_change
from portal.management import demo_history
from releases.models import Application, Build, Release
from releases.services import PullRequest, TestCounts, application_save, build_register, release_register

APPLICATION = "MAC"
ISSUE_PREFIX = "BIZPLAT"
ISSUE_URL = "https://jira.example.com/browse/{key}"
RELEASERS = "mac-releasers"
HISTORY = Actor.command()  # the demo command, with the shell that ran it
HISTORY_DETAIL = "Recorded by demo_data as the demo's history; no playbook ran."


@dataclass(frozen=True)
class DemoRelease:
    version: str
    issue: int
    topic: str
    implementers: tuple[str, ...]
    reached: tuple[str, ...] = ()  # the environments its recorded history reached
    production_request: bool = False  # bob asked for Production (it awaits an approval)
    damaged_artifact: bool = False  # the artifact store holds a truncated file: the playbook refuses it

    @property
    def key(self) -> str:
        return f"{ISSUE_PREFIX}-{self.issue}"

    @property
    def branch(self) -> str:
        return f"feature/{self.key}-{self.topic}"


ALICE, BOB = "alice@example.com", "bob@example.com"
DEMO_RELEASES = [  # in the order CI registered them; the last two are deployed by the worker
    DemoRelease("1.0.0", 101, "invoice-rounding", (ALICE,), ("QA", "Staging", "Production")),
    DemoRelease("1.1.0", 102, "vat-export", (ALICE, BOB), ("QA", "Staging")),
    DemoRelease("1.2.0", 103, "ledger-totals", (ALICE,), ("QA", "Staging"), production_request=True),
    DemoRelease("1.3.0", 104, "payment-batches", (ALICE,), damaged_artifact=True),
    DemoRelease("1.3.1", 104, "payment-batches", (ALICE,)),
]

# name -> (email, password, groups, superuser)
USERS = {
    "alice": ("alice@example.com", "alice", ["developers"], False),
    "bob": ("bob@example.com", "bob", ["analysts", RELEASERS], False),
    "carol": ("carol@example.com", "carol", ["analysts", RELEASERS], False),
    "dave": ("dave@example.com", "dave", ["auditors"], False),
    "admin": ("admin@example.com", "admin", [], True),
    "otto": ("otto@example.com", "otto", [], True),  # the second administrator a weaker control waits for
}

VIEW_ALL = [
    "releases.view_application", "releases.view_build", "releases.view_release", "releases.view_vcsalias",
    "environments.view_environment", "environments.view_deployment", "environments.view_approval",
    "environments.view_freezewindow", "audit.view_auditevent",
    "environments.view_notificationchannel", "environments.view_notificationdelivery",
]
GROUP_PERMISSIONS = {
    "developers": VIEW_ALL + ["environments.add_deployment"],
    "analysts": VIEW_ALL + ["environments.add_deployment", "environments.change_deployment"],
    "auditors": VIEW_ALL + ["audit.export_reports"],
    RELEASERS: [],
}


def _permission(dotted: str) -> Permission:
    app_label, codename = dotted.split(".")
    return Permission.objects.get(content_type__app_label=app_label, codename=codename)


class Command(BaseCommand):
    help = "Load the demo: application MAC, its environments, releasers, users and a first release."

    def handle(self, *args, **options):
        if not settings.DEMO:
            raise CommandError(
                "demo_data creates users whose password is their name (admin/admin among them): it runs only "
                "in demo mode (PORTAL_DEMO=1), never against a real portal."
            )
        actor = Actor.command()
        # A fresh demo is set up before its history begins (so the access report's `since` and the
        # chain's times read as lived); a demo loaded again writes what it adds at today's time.
        fresh = not Application.objects.filter(name=APPLICATION).exists()
        with transaction.atomic():
            with demo_history.moved_time(demo_history.setup_moment(timezone.now())) if fresh else nullcontext():
                app = self._application(actor)
                qa, staging, production = self._environments(actor, app)
                self._groups(actor, production)
                self._users(actor)
            demo_history.build(application=app, production=production)
        for number, demo in enumerate(DEMO_RELEASES, start=1):
            self._release(actor, number, demo)
        self.stdout.write(self.style.SUCCESS(
            f"Demo data ready: {app} with {qa.name} -> {staging.name} -> {production.name}; "
            f"users {', '.join(USERS)} (password = user name)."
        ))

    def _application(self, actor):
        app = Application.objects.filter(name=APPLICATION).first()
        if app is None:
            app = application_save(actor=actor, application=Application(
                name=APPLICATION, issue_key_prefix=ISSUE_PREFIX, issue_url_pattern=ISSUE_URL,
                description="Demo application released by the portal."))
        return app

    def _environments(self, actor, app):
        def env(name, **fields):
            existing = Environment.objects.filter(application=app, name=name).first()
            if existing is not None:
                return existing
            return environment_save(actor=actor, environment=Environment(application=app, name=name, **fields))

        qa = env("QA", auto_deploy=True, playbook="deploy_demo.yml")
        staging = env("Staging", promotes_from=qa, auto_deploy=True, playbook="deploy_demo.yml")
        production = env("Production", promotes_from=staging, restricted=True, required_approvals=1,
                         requires_code_review=True, playbook="deploy_demo.yml")
        return qa, staging, production

    def _groups(self, actor, production):
        for name, perms in GROUP_PERMISSIONS.items():
            group, _ = Group.objects.get_or_create(name=name)
            group_permissions_change(actor=actor, group=group, permissions=[_permission(p) for p in perms])
        releasers = Group.objects.get(name=RELEASERS)
        held = policy.GroupObjectPermission.objects.filter(group=releasers, object_pk=str(production.pk))
        have = set(held.values_list("permission__codename", flat=True))
        for codename in policy.GRANTABLE:
            if codename not in have:
                environment_grant(actor=actor, environment=production, codename=codename, group=releasers)

    def _users(self, actor):
        User = get_user_model()
        for name, (email, password, groups, superuser) in USERS.items():
            user = User.objects.filter(username=name).first()
            if user is None:
                user = User(username=name, email=email, is_staff=True, is_superuser=superuser)
                user.set_password(password)
                user_save(actor=actor, user=user)
            for group_name in groups:
                group = Group.objects.get(name=group_name)
                if not user.groups.filter(pk=group.pk).exists():
                    group_membership_change(actor=actor, group=group, user=user, add=True)

    def _release(self, actor, number: int, demo: DemoRelease):
        """Register one release (as CI does) with its build; a new one with a past gets its past
        recorded in the same transaction. Registration requests QA by itself (auto-deploy)."""
        artifact_dir = Path(settings.VAR_DIR) / "artifacts"
        artifact_dir.mkdir(parents=True, exist_ok=True)
        artifact = artifact_dir / f"mac-{demo.version}.tar.gz"
        content = f"MAC {demo.version} demo artifact\n".encode()
        if not artifact.exists():
            artifact.write_bytes(content[:-6] if demo.damaged_artifact else content)
        if Release.objects.filter(application__name=APPLICATION, version=demo.version).exists():
            return
        with transaction.atomic():
            if not Build.objects.filter(application__name=APPLICATION, number=str(number)).exists():
                build_register(
                    actor=actor, application=APPLICATION, number=str(number), commit=f"{number:08x}" * 5,
                    branch=demo.branch, url=f"https://ci.example.com/MAC/{number}",
                    status="successful", tests=TestCounts(412 + 7 * number, 0, 3),
                )
            release, _ = release_register(
                actor=actor, application=APPLICATION, version=demo.version, build=str(number),
                artifact_url=artifact.as_uri(), artifact_sha256=hashlib.sha256(content).hexdigest(),
                issue_keys=[demo.key], implementers=list(demo.implementers),
                pull_request=PullRequest(f"https://vcs.example.com/mac/pull/{6 + number}", ALICE, ("erin",)),
            )
            self._history(release, demo)

    def _history(self, release: Release, demo: DemoRelease):
        User = get_user_model()
        shell = Actor.command().os_account  # the demo's people act through the command: its shell is recorded
        bob, carol = (Actor(user=User.objects.get(username=name), via="command", os_account=shell)
                      for name in ("bob", "carol"))
        for name in demo.reached:
            environment = Environment.objects.get(application=release.application, name=name)
            deployment = Deployment.objects.filter(release=release, environment=environment).first()
            if deployment is None:  # auto-deploy asked for QA and Staging; Production is asked for by bob
                deployment = services.deployment_request(actor=bob, release=release, environment=environment)
            if deployment.state == Deployment.State.AWAITING_APPROVAL:
                deployment = services.deployment_approve(actor=carol, deployment_id=deployment.pk,
                                                         comment="Change tickets and test results checked.")
            self._record_success(deployment)
        if demo.production_request:
            production = Environment.objects.get(application=release.application, name="Production")
            services.deployment_request(actor=bob, release=release, environment=production)

    def _record_success(self, deployment: Deployment):
        """A past deployment, recorded through the deploy engine's services (claim, then result)."""
        deployment.refresh_from_db()
        if deployment.state != Deployment.State.RUNNING:
            raise CommandError(f"{deployment} is {deployment.state}, not running: load the demo into a fresh "
                               "database (make clean) while no worker runs.")
        services.deployment_start(deployment_id=deployment.pk, engine="demo_data", actor=HISTORY)
        services.deployment_record_result(deployment_id=deployment.pk, state=Deployment.State.SUCCEEDED,
                                          detail=HISTORY_DETAIL, actor=HISTORY)
