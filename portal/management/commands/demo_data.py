"""Demo data: one application on a QA -> Staging -> Production path, its releasers, and a release.

Only in demo mode (settings.DEMO, PORTAL_DEMO=1): the demo users have known passwords.

Running it twice changes nothing: every step looks before it writes, and writes through services
(so the demo's own setup is in the audit chain like everything else).
"""

import hashlib
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from audit import chain
from audit.actors import Actor
from environments import policy
from environments.models import Environment
from environments.services import environment_grant, environment_save, group_membership_change
from portal.management import demo_history
from releases.models import Application, Build, Release
from releases.services import PullRequest, TestCounts, application_save, build_register, release_register

APPLICATION = "MAC"
ISSUE_PREFIX = "BIZPLAT"
RELEASERS = "mac-releasers"
DEMO_RELEASES = [  # version, issue key, branch
    ("1.0.0", f"{ISSUE_PREFIX}-101", f"feature/{ISSUE_PREFIX}-101-invoice-rounding"),
    ("1.1.0", f"{ISSUE_PREFIX}-102", f"feature/{ISSUE_PREFIX}-102-vat-export"),
    ("1.2.0", f"{ISSUE_PREFIX}-103", f"feature/{ISSUE_PREFIX}-103-ledger-totals"),
]

# name -> (email, password, groups, superuser)
USERS = {
    "alice": ("alice@example.com", "alice", ["developers"], False),
    "bob": ("bob@example.com", "bob", ["analysts", RELEASERS], False),
    "carol": ("carol@example.com", "carol", ["analysts", RELEASERS], False),
    "dave": ("dave@example.com", "dave", ["auditors"], False),
    "admin": ("admin@example.com", "admin", [], True),
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
        actor = Actor.system(via="command")
        with transaction.atomic():
            app = self._application(actor)
            qa, staging, production = self._environments(actor, app)
            self._groups(actor, production)
            self._users(actor)
            demo_history.build(application=app, production=production)
            self._release(actor)
        self.stdout.write(self.style.SUCCESS(
            f"Demo data ready: {app} with {qa.name} -> {staging.name} -> {production.name}; "
            f"users {', '.join(USERS)} (password = user name)."
        ))

    def _application(self, actor):
        app = Application.objects.filter(name=APPLICATION).first()
        if app is None:
            app = application_save(actor=actor, application=Application(
                name=APPLICATION, issue_key_prefix=ISSUE_PREFIX,
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
            wanted = {_permission(p) for p in perms}
            if set(group.permissions.all()) != wanted:
                group.permissions.set(wanted)
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
                user = User.objects.create_user(name, email=email, password=password, is_staff=True,
                                                is_superuser=superuser)
                chain.append(actor=actor, action="user.create", obj=user, data={"username": name, "email": email})
            for group_name in groups:
                group = Group.objects.get(name=group_name)
                if not user.groups.filter(pk=group.pk).exists():
                    group_membership_change(actor=actor, group=group, user=user, add=True)

    def _release(self, actor):
        """Three releases registered back to back, as CI does when changes merge within minutes: the
        first goes to QA at once, the second waits and is superseded by the third (latest wins), and
        the third follows the first through QA and Staging, waiting its turn in each."""
        artifact_dir = Path(settings.VAR_DIR) / "artifacts"
        artifact_dir.mkdir(parents=True, exist_ok=True)
        for number, (version, issue, branch) in enumerate(DEMO_RELEASES, start=1):
            artifact = artifact_dir / f"mac-{version}.tar.gz"
            if not artifact.exists():
                artifact.write_bytes(f"MAC {version} demo artifact\n".encode())
            sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
            if not Build.objects.filter(application__name=APPLICATION, number=str(number)).exists():
                build_register(
                    actor=actor, application=APPLICATION, number=str(number), commit=f"{number:08x}" * 5,
                    branch=branch, url=f"https://ci.example.com/MAC/{number}",
                    status="successful", tests=TestCounts(412 + number, 0, 3),
                )
            if not Release.objects.filter(application__name=APPLICATION, version=version).exists():
                release_register(
                    actor=actor, application=APPLICATION, version=version, build=str(number),
                    artifact_url=artifact.as_uri(), artifact_sha256=sha256,
                    issue_keys=[issue], implementers=["alice@example.com"],
                    pull_request=PullRequest(f"https://vcs.example.com/mac/pull/{6 + number}", "alice@example.com",
                                             ("erin",)),
                )
