"""The rules of DESIGN.md, in one place. Every entry point asks these functions through a service.

Each check returns None (allowed) or a Refusal: a stable code, one sentence a person understands,
and the HTTP status the API answers with (403: who you are; 409: the state of things).
Each check runs a fixed number of queries, whatever the size of the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from auditlog.models import LogEntry
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.db.models import Q
from django.utils import timezone
from guardian.models import GroupObjectPermission, UserObjectPermission

from audit.actors import Actor
from audit.models import AuditEvent
from environments.models import Approval, Deployment, Environment, FreezeWindow
from releases.models import Build, Implementer, Release, VcsAlias

DEPLOY = "deploy_environment"
APPROVE = "approve_environment"
GRANTABLE = (DEPLOY, APPROVE)


@dataclass(frozen=True)
class Refusal:
    code: str
    detail: str
    status: int = 409

    def as_dict(self) -> dict:
        return {"code": self.code, "detail": self.detail}


class PolicyRefusal(Exception):
    """Raised by a service when the policy refuses; the refusal is already in the audit chain."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.detail)
        self.refusal = refusal


def _forbidden(code: str, detail: str) -> Refusal:
    return Refusal(code, detail, 403)


def _conflict(code: str, detail: str) -> Refusal:
    return Refusal(code, detail, 409)


# --- facts the rules need -------------------------------------------------------------------------

def grants_on(environment: Environment):
    """The explicit deploy/approve grants on one environment: (group grants, user grants) querysets."""
    where = {"content_type": ContentType.objects.get_for_model(Environment), "object_pk": str(environment.pk),
             "permission__codename__in": GRANTABLE}
    return GroupObjectPermission.objects.filter(**where), UserObjectPermission.objects.filter(**where)


def environment_grants(user, environment: Environment) -> set[str]:
    """The explicit per-environment grants a user holds, directly or through a group.

    Superuser status grants nothing here: only an explicit grant counts (rule 4).
    """
    if user is None or not user.is_active:
        return set()
    by_group, direct = grants_on(environment)
    codenames = "permission__codename"
    return set(direct.filter(user=user).values_list(codenames, flat=True).union(
        by_group.filter(group__user=user).values_list(codenames, flat=True)))


def holds_any_grant(user) -> bool:
    """Whether a user holds a deploy or approve grant on any environment (directly or by group)."""
    if user is None or not user.is_active:
        return False
    return (
        UserObjectPermission.objects.filter(user=user, permission__codename__in=GRANTABLE).exists()
        or GroupObjectPermission.objects.filter(group__user=user, permission__codename__in=GRANTABLE).exists()
    )


def may_request_somewhere(user) -> bool:
    """Whether the admin should offer a user the deployment request and cancel actions (each is still
    decided by the rules): the model permission on deployments, or a grant on some environment."""
    return user.has_perm("environments.add_deployment") or holds_any_grant(user)


def may_decide_somewhere(user) -> bool:
    """Whether the admin should offer a user approve / reject / review (each is still decided by the rules)."""
    return user.has_perm("environments.change_deployment") or holds_any_grant(user)


def person_identities(user) -> set[str]:
    """Everything a person may appear as in VCS metadata, lower-case."""
    identities = {user.get_username().lower()}
    if user.email:
        identities.add(user.email.strip().lower())
    identities.update(VcsAlias.objects.filter(user=user).values_list("identity", flat=True))
    return identities


@dataclass(frozen=True)
class Implementers:
    identities: frozenset[str]
    user_ids: frozenset[int]

    def match(self, user) -> str | None:
        """How `user` is an implementer ('user', 'identity'), or None."""
        if user is None:
            return None
        if user.pk in self.user_ids:
            return "user"
        if self.identities & person_identities(user):
            return "identity"
        return None


def implementers_of(release: Release) -> Implementers:
    rows = list(release.implementers.values_list("identity", "user_id"))
    return Implementers(frozenset(i for i, _ in rows), frozenset(u for _, u in rows if u is not None))


# --- the worker ---------------------------------------------------------------------------------

def task_function_name(func) -> str:
    """A queued task's function as a dotted name (it may be queued as a name or as a pickled callable)."""
    if isinstance(func, str):
        return func
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"


def check_portal_task(func, hook, portal_tasks: frozenset[str]) -> Refusal | None:
    """The worker runs only the portal's own tasks: a function named by its dotted path on the
    portal's list (never a pickled callable), without a result hook (which the cluster would call
    too). Anything else in the queue came from outside the portal: a schedule or a resubmitted task
    naming any importable function would otherwise run with the worker's rights."""
    if isinstance(func, str) and func in portal_tasks and not hook:
        return None
    with_hook = f" with the result hook {hook}" if hook else ""
    return _forbidden(
        "NOT_A_PORTAL_TASK",
        f"The worker runs only the portal's own tasks; {task_function_name(func)}{with_hook} is not one of them.",
    )


# --- rule 2: build gate ---------------------------------------------------------------------------

def check_build_gate(build: Build) -> Refusal | None:
    if build.status != Build.Status.SUCCESSFUL:
        return Refusal(
            "BUILD_NOT_SUCCESSFUL",
            f"Build {build.number} is {build.get_status_display().lower()}; only a successful build can be released.",
            422,
        )
    return None


def check_finished_build_unchanged(build: Build, changed: dict) -> Refusal | None:
    """A finished build's report never changes (the same report again is fine)."""
    if changed and build.is_finished:
        return _conflict(
            "BUILD_FINISHED",
            f"{build} is already {build.get_status_display().lower()}; a finished build never changes.",
        )
    return None


def check_release_registration(application, version: str, build_number: str, build: Build | None,
                               existing: Release | None, digest: str) -> Refusal | None:
    """A version names one artifact, cut from a known, successful build (rule 2)."""
    if existing is not None and existing.registration_digest != digest:
        return _conflict(
            "RELEASE_CONFLICT",
            f"{application} {version} is already registered with other content; a version names one artifact only.",
        )
    if existing is None and build is None:
        return Refusal("UNKNOWN_BUILD", f"{application} has no build {build_number!r}; register the build first.", 422)
    if existing is None:
        return check_build_gate(build)
    return None


def check_may_register(actor: Actor, application, permission: str) -> Refusal | None:
    """CI tokens register for the applications they are scoped to; people need the model permission."""
    if r := check_token_scope(actor, application):
        return r
    if actor.is_person and not actor.user.has_perm(permission):
        return _forbidden("NOT_PERMITTED", f"You are not allowed to register builds or releases of {application}.")
    return None


# --- who may ask ----------------------------------------------------------------------------------

def readable_applications(actor: Actor) -> frozenset[int] | None:
    """The applications whose builds, releases and deployments an actor may read (None: all).

    A CI token reads only the applications it is scoped to; anything else answers as if it did not
    exist (404, not 403), so a token learns nothing about other applications.
    """
    return actor.token_applications if actor.is_ci else None


def check_token_scope(actor: Actor, application) -> Refusal | None:
    if actor.is_ci and application.pk not in actor.token_applications:
        return _forbidden("TOKEN_SCOPE", f"This CI token is not allowed to act on {application}.")
    return None


def check_ci_not_restricted(actor: Actor, environment: Environment) -> Refusal | None:
    if actor.is_ci and environment.restricted:
        return _forbidden(
            "CI_TOKEN_RESTRICTED",
            f"{environment} is restricted: a CI token can never request, approve or cancel deployments there.",
        )
    return None


def check_may_request(actor: Actor, environment: Environment, grants: set[str]) -> Refusal | None:
    """Rule 4: restricted environments need the explicit deploy grant; others a deploy permission.
    The portal itself (auto-deploy) deploys only to non-restricted environments."""
    if actor.is_system:
        if environment.restricted:
            return _forbidden("AUTO_DEPLOY_RESTRICTED", f"{environment} is restricted: it never deploys by itself.")
        return None
    if actor.is_ci:
        return None
    if environment.restricted:
        if DEPLOY not in grants:
            return _forbidden(
                "NOT_RELEASER",
                f"You are not a releaser of {environment}: requesting a deployment there needs the "
                "deploy permission granted on that environment.",
            )
        return None
    if actor.user is None or not (
        DEPLOY in grants or actor.user.has_perm("environments.add_deployment")
    ):
        return _forbidden("NOT_PERMITTED", f"You are not allowed to request deployments to {environment}.")
    return None


def check_may_approve(actor: Actor, environment: Environment, grants: set[str]) -> Refusal | None:
    if APPROVE not in grants:
        return _forbidden(
            "NOT_RELEASER",
            f"You are not a releaser of {environment}: approving there needs the approve permission "
            "granted on that environment.",
        )
    return None


# --- rule 3: separation of duties -----------------------------------------------------------------

def check_implementers_recorded(release: Release, environment: Environment, implementers: Implementers):
    if environment.restricted and not implementers.identities:
        return _conflict(
            "NO_IMPLEMENTERS",
            f"{release} records no implementers, so nobody can show that its approver did not write it; "
            f"it cannot go to {environment}.",
        )
    return None


def check_not_implementer(user, implementers: Implementers, code: str, role: str) -> Refusal | None:
    if user is not None and implementers.match(user):
        return _forbidden(code, f"You implemented this change, so you may not {role} it.")
    return None


# --- rule 9: reviewed change ----------------------------------------------------------------------

def check_code_review(release: Release, environment: Environment, implementers: Implementers):
    if not environment.requires_code_review:
        return None
    author = release.pull_request_author.strip().lower()
    independent = [
        r for r in release.pull_request_reviewers
        if r.strip().lower() != author and r.strip().lower() not in implementers.identities
    ]
    if not release.pull_request_url or not independent:
        return _conflict(
            "NO_CODE_REVIEW",
            f"{environment} requires a reviewed change: the pull request of {release} needs a reviewer "
            "who is neither its author nor an implementer.",
        )
    return None


# --- rule 1: promotion path -----------------------------------------------------------------------

def promotion_source(release: Release, environment: Environment) -> Deployment | None:
    """The latest succeeded deployment of this release to the environment it must come from."""
    if environment.promotes_from_id is None:
        return None
    return (
        Deployment.objects.filter(
            release=release, environment_id=environment.promotes_from_id, state=Deployment.State.SUCCEEDED
        )
        .order_by("-finished_at", "-id")
        .first()
    )


def check_promotion_path(release, environment, source: Deployment | None) -> Refusal | None:
    if environment.promotes_from_id is not None and source is None:
        return _conflict(
            "PROMOTION_PATH",
            f"{release} has not been deployed successfully to {environment.promotes_from.name}, "
            f"which comes before {environment.name}.",
        )
    return None


# --- rules 6 and 7: one at a time, freeze windows -------------------------------------------------

def check_not_busy(environment: Environment) -> Refusal | None:
    active = (
        Deployment.objects.filter(environment=environment, state__in=Deployment.ACTIVE_STATES)
        .values_list("id", flat=True)
        .first()
    )
    if active is not None:
        return _conflict(
            "ENVIRONMENT_BUSY",
            f"{environment} is busy with deployment #{active}; try again when it has finished.",
        )
    return None


def check_no_freeze(environment: Environment, emergency: bool) -> Refusal | None:
    if emergency:
        return None
    now = timezone.now()
    window = FreezeWindow.objects.filter(environment=environment, starts_at__lte=now, ends_at__gt=now).first()
    if window is not None:
        return _conflict(
            "FREEZE_WINDOW",
            f"{environment} is frozen until {window.ends_at:%Y-%m-%d %H:%M} UTC ({window.reason}); "
            "only an emergency deployment with a stated reason can go now.",
        )
    return None


def check_not_already_open(release: Release, environment: Environment) -> Refusal | None:
    open_id = (
        Deployment.objects.filter(release=release, environment=environment, state__in=Deployment.OPEN_STATES)
        .values_list("id", flat=True)
        .first()
    )
    if open_id is not None:
        return _conflict(
            "ALREADY_REQUESTED", f"{release} already has an open deployment to {environment.name} (#{open_id})."
        )
    return None


# --- decisions ------------------------------------------------------------------------------------

@dataclass
class RequestVerdict:
    refusal: Refusal | None = None
    promoted_from: Deployment | None = None
    queue_now: bool = False
    sod_checks: list[str] = field(default_factory=list)


def decide_request(
    *, actor: Actor, release: Release, environment: Environment, emergency_reason: str = ""
) -> RequestVerdict:
    """May `actor` ask for `release` to go to `environment`? (rules 1-7, 9)"""
    emergency = bool(emergency_reason.strip())
    verdict = RequestVerdict()

    def refuse(r):
        verdict.refusal = r
        return verdict

    if r := check_token_scope(actor, environment.application) or check_ci_not_restricted(actor, environment):
        return refuse(r)
    if environment.application_id != release.application_id:
        return refuse(_conflict("WRONG_APPLICATION", f"{environment} does not belong to {release.application}."))
    if r := check_build_gate(release.build):
        return refuse(r)
    grants = environment_grants(actor.user, environment) if actor.is_person else set()
    if r := check_may_request(actor, environment, grants):
        return refuse(r)
    if emergency and (not actor.is_person or DEPLOY not in grants):
        return refuse(_forbidden(
            "EMERGENCY_NOT_RELEASER", f"Only a releaser of {environment} may request an emergency deployment."
        ))
    implementers = implementers_of(release)
    if environment.restricted:
        if r := check_implementers_recorded(release, environment, implementers):
            return refuse(r)
        if r := check_not_implementer(actor.user, implementers, "SOD_IMPLEMENTER_REQUESTER", "request production of"):
            return refuse(r)
        verdict.sod_checks.append("requester_not_implementer")
    if r := check_code_review(release, environment, implementers):
        return refuse(r)
    verdict.promoted_from = promotion_source(release, environment)
    if r := check_promotion_path(release, environment, verdict.promoted_from):
        return refuse(r)
    if r := check_not_already_open(release, environment):
        return refuse(r)
    if r := check_no_freeze(environment, emergency):
        return refuse(r)
    verdict.queue_now = emergency or environment.required_approvals == 0
    if verdict.queue_now and (r := check_not_busy(environment)):
        return refuse(r)
    return verdict


def _check_open_for_decision(deployment: Deployment) -> Refusal | None:
    if deployment.state != Deployment.State.AWAITING_APPROVAL:
        return _conflict(
            "NOT_AWAITING_APPROVAL",
            f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()}, not awaiting approval.",
        )
    if deployment.expires_at is not None and deployment.expires_at <= timezone.now():
        return _conflict("REQUEST_EXPIRED", f"Deployment request #{deployment.pk} has expired; request it again.")
    return None


def decide_approval(*, actor: Actor, deployment: Deployment, approve: bool) -> tuple[Refusal | None, list[str]]:
    """May `actor` approve (or reject) `deployment`? (rules 3-5)"""
    environment = deployment.environment
    if actor.is_ci:
        return _forbidden(
            "CI_TOKEN_RESTRICTED", "A CI token can never approve or reject deployments."
        ), []
    if r := _check_open_for_decision(deployment):
        return r, []
    if r := check_may_approve(actor, environment, environment_grants(actor.user, environment)):
        return r, []
    role = "approve" if approve else "reject"
    implementers = implementers_of(deployment.release)
    if r := check_not_implementer(actor.user, implementers, "SOD_IMPLEMENTER_APPROVER", role):
        return r, []
    if deployment.requested_by_id == actor.user.pk:
        return _forbidden("SOD_REQUESTER_APPROVER", f"You requested this deployment, so you may not {role} it."), []
    if deployment.approvals.filter(approver=actor.user).exists():
        return _forbidden(
            "SOD_DISTINCT_APPROVERS", "You have already decided on this deployment; each approval must come "
            "from a different person."
        ), []
    return None, ["approver_not_implementer", "approver_not_requester", "approver_distinct"]


def decide_queue(deployment: Deployment) -> Refusal | None:
    """Can an approved deployment be queued now? (rules 6 and 7)"""
    return check_no_freeze(deployment.environment, deployment.emergency) or check_not_busy(deployment.environment)


def decide_finish(deployment: Deployment) -> Refusal | None:
    """Only a running deployment gets a result."""
    if deployment.state != Deployment.State.RUNNING:
        return _conflict(
            "NOT_RUNNING", f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()}, not running."
        )
    return None


def decide_cancel(*, actor: Actor, deployment: Deployment) -> Refusal | None:
    environment = deployment.environment
    if r := check_token_scope(actor, environment.application) or check_ci_not_restricted(actor, environment):
        return r
    if deployment.state not in Deployment.OPEN_STATES:
        return _conflict(
            "NOT_CANCELLABLE",
            f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()} and can no longer be cancelled.",
        )
    if actor.is_ci or actor.is_system:
        return None
    if deployment.requested_by_id == actor.user.pk:
        return None
    grants = environment_grants(actor.user, environment)
    if environment.restricted and DEPLOY not in grants:
        return _forbidden("NOT_RELEASER", f"Only the requester or a releaser of {environment} may cancel this.")
    return check_may_request(actor, environment, grants)


def decide_review(*, actor: Actor, deployment: Deployment) -> Refusal | None:
    """Rule 7: an emergency deployment is reviewed afterwards by a different eligible person."""
    if not actor.is_person:
        return _forbidden("NOT_A_PERSON", "Only a person can review an emergency deployment.")
    if not deployment.emergency:
        return _conflict("NOT_EMERGENCY", f"Deployment #{deployment.pk} is not an emergency deployment.")
    if deployment.reviewed_at is not None:
        return _conflict("ALREADY_REVIEWED", f"Deployment #{deployment.pk} has already been reviewed.")
    if deployment.state == Deployment.State.AWAITING_APPROVAL:
        return _conflict("NOT_STARTED", "An emergency deployment is reviewed after it has been queued.")
    if r := check_may_approve(actor, deployment.environment, environment_grants(actor.user, deployment.environment)):
        return r
    if r := check_not_implementer(actor.user, implementers_of(deployment.release), "SOD_IMPLEMENTER_REVIEWER",
                                  "review"):
        return r
    if deployment.requested_by_id == actor.user.pk:
        return _forbidden("SOD_REQUESTER_REVIEWER", "You requested this emergency deployment; someone else must "
                          "review it.")
    return None


def decide_grant(*, actor: Actor, environment: Environment, user=None, group: Group | None = None) -> Refusal | None:
    """Rule 4: only an administrator of environments grants, and never to themselves or their group."""
    if not actor.is_system:
        if not actor.is_person or not actor.user.has_perm("environments.change_environment"):
            return _forbidden("NOT_PERMITTED", "You may not change who can deploy or approve.")
        if user is not None and user.pk == actor.user.pk:
            return _forbidden("SELF_GRANT", "Nobody can grant deploy or approve rights to themselves.")
        if group is not None and actor.user.groups.filter(pk=group.pk).exists():
            return _forbidden(
                "SELF_GRANT", f"You belong to {group.name}; nobody can grant rights to a group they belong to."
            )
    return None


def decide_membership(*, actor: Actor, group: Group, user, add: bool = True) -> Refusal | None:
    """Rule 4 for groups: joining a group that holds deploy/approve grants is receiving those grants."""
    if actor.is_system:
        return None
    if not actor.is_person or not actor.user.has_perm("auth.change_user"):
        return _forbidden("NOT_PERMITTED", "You may not change group membership.")
    if not add:
        return None
    holds_grants = GroupObjectPermission.objects.filter(
        group=group, permission__codename__in=GRANTABLE
    ).exists()
    if holds_grants and user.pk == actor.user.pk:
        return _forbidden(
            "SELF_GRANT", f"{group.name} holds deploy or approve rights; nobody can add themselves to it."
        )
    return None


def evidence_of(user) -> list[str]:
    """What makes a user part of the evidence: the rows that name them and must stay as they are."""
    facts = [
        ("requested or reviewed deployments",
         Deployment.objects.filter(Q(requested_by=user) | Q(reviewed_by=user))),
        ("decided on deployments", Approval.objects.filter(approver=user)),
        ("implemented releases", Implementer.objects.filter(user=user)),
        ("acted in the audit log", AuditEvent.objects.filter(actor_id=user.pk)),
        ("changed settings (field history)", LogEntry.objects.filter(actor=user)),
    ]
    return [fact for fact, rows in facts if rows.exists()]


def decide_user_delete(*, actor: Actor, user) -> Refusal | None:
    """A user who is part of the evidence is never deleted (the evidence would lose them, or the
    database refuses): they are deactivated instead."""
    if not actor.is_system and not (actor.is_person and actor.user.has_perm("auth.delete_user")):
        return _forbidden("NOT_PERMITTED", "You may not delete users.")
    if evidence := evidence_of(user):
        return _conflict(
            "USER_IS_EVIDENCE",
            f"{user.get_username()} {' and '.join(evidence)}, so they are part of the evidence and cannot be "
            "deleted; deactivate the account instead (untick Active).",
        )
    return None
