"""Fixtures shared by the suite: a small world (application, promotion path, releasers), factories
that create related objects only when asked, and a transactional database whose append-only
tables can be emptied after the test (a path production has no use for)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test.client import ClientHandler

from access.services import user_permissions_change, user_save
from audit import triggers
from audit.actors import Actor
from environments import services as env_services
from environments.models import Deployment, Environment
from portal.handlers import ApiMiddleware, Dispatch
from releases import services as rel_services
from releases.models import Application

SYSTEM = Actor.system(via="test")


class ApiClientHandler(ApiMiddleware, ClientHandler):
    pass


@pytest.fixture
def client(client):
    """The test client, through the two middleware stacks of the portal's WSGI application
    (portal.handlers): the API's under /api/v1/, the site's elsewhere."""
    client.handler = Dispatch(client.handler, ApiClientHandler(client.handler.enforce_csrf_checks))
    return client
_numbers = itertools.count(1)


def person(user, via: str = "test") -> Actor:
    return Actor(user=user, via=via)


def ci_actor(*applications: Application, name: str = "ci") -> Actor:
    return Actor(via="api", token_id=None, token_name=name, token_kind="ci",
                 token_applications=frozenset(a.pk for a in applications))


@pytest.fixture
def make_user(db):
    def make(username: str, *, email: str | None = None, groups=(), perms=(), superuser=False, staff=True):
        # through the portal, as an administrator would: the account, its groups and permissions on the chain
        user = get_user_model()(username=username, email=email if email is not None else f"{username}@example.com",
                                is_staff=staff, is_superuser=superuser)
        user.set_password(username)
        user_save(actor=SYSTEM, user=user)
        for group in groups:
            env_services.group_membership_change(actor=SYSTEM, group=group, user=user, add=True)
        if perms:
            user_permissions_change(actor=SYSTEM, user=user, permissions=[Permission.objects.get(
                content_type__app_label=dotted.split(".")[0], codename=dotted.split(".")[1]) for dotted in perms])
        return user

    return make


class World:
    """MAC with QA -> Staging -> Production (restricted, 1 approval), and the people around it."""

    def __init__(self, make_user):
        self.app = Application.objects.create(name="MAC", issue_key_prefix="BIZPLAT")
        self.qa = Environment.objects.create(application=self.app, name="QA")  # auto-deploy: tests turn it on
        self.staging = Environment.objects.create(application=self.app, name="Staging", promotes_from=self.qa)
        self.production = env_services.environment_save(actor=SYSTEM, environment=Environment(  # audited
            application=self.app, name="Production", promotes_from=self.staging, restricted=True,
            required_approvals=1,
        ))
        self.releasers = Group.objects.create(name="mac-releasers")
        for codename in ("deploy_environment", "approve_environment"):
            env_services.environment_grant(actor=SYSTEM, environment=self.production, codename=codename,
                                           group=self.releasers)
        self.alice = make_user("alice", perms=["environments.add_deployment"])  # developer, implementer
        self.bob = make_user("bob", groups=[self.releasers])
        self.carol = make_user("carol", groups=[self.releasers])
        self.erin = make_user("erin", groups=[self.releasers])
        self.dave = make_user("dave")  # auditor: no rights
        self.ci = ci_actor(self.app)

    def build(self, *, status="successful", number=None, branch="feature/BIZPLAT-1-x"):
        build, _ = rel_services.build_register(
            actor=SYSTEM, application=self.app.name, number=str(number or next(_numbers)), commit="c0ffee" * 6,
            branch=branch, url="https://ci.example.com/1", status=status,
        )
        return build

    def release(self, version=None, *, implementers=("alice@example.com",), issue_keys=("BIZPLAT-1",),
                pull_request=None, build=None):
        version = version or f"1.0.{next(_numbers)}"
        release, _ = rel_services.release_register(
            actor=SYSTEM, application=self.app.name, version=version, build=(build or self.build()).number,
            artifact_url=f"file:///artifacts/mac-{version}.tar.gz",
            artifact_sha256=hashlib.sha256(version.encode()).hexdigest(),
            issue_keys=list(issue_keys), implementers=list(implementers), pull_request=pull_request,
        )
        return release

    def deploy(self, release, environment, *, actor=None, result=Deployment.State.SUCCEEDED) -> Deployment:
        """Request, (approve,) start and finish a deployment the way the deploy engine will."""
        deployment = env_services.deployment_request(actor=actor or self.ci, release=release,
                                                     environment=environment)
        if deployment.state == Deployment.State.AWAITING_APPROVAL:
            deployment = env_services.deployment_approve(actor=person(self.carol), deployment_id=deployment.pk)
        env_services.deployment_start(deployment_id=deployment.pk)
        return env_services.deployment_record_result(deployment_id=deployment.pk, state=result)

    def to_staging(self, release):
        self.deploy(release, self.qa)
        return self.deploy(release, self.staging)


@pytest.fixture
def world(db, make_user) -> World:
    return World(make_user)


@pytest.fixture
def _reinstall_append_only_triggers(django_db_blocker):
    yield
    with django_db_blocker.unblock():
        triggers.install_all(connection)


@pytest.fixture
def transactional_audit_db(_reinstall_append_only_triggers, transactional_db):
    """A transactional database (threads see each other's commits). The append-only triggers are
    dropped just before the test database is emptied and installed again right after."""
    yield
    triggers.drop_all(connection)
