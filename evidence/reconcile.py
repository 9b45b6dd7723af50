"""The working tables read again against the audit chain.

The changes, exceptions and access reports and the admin's pages are read from the working tables
(deployments, approvals, VCS aliases). The application never writes them but through its services, and
each service writes an audit event in the same transaction; someone who writes the database directly
changes the tables and not the chain (which verify_audit proves). This module says where the two
disagree, for the restricted deployments of a period (who requested it, emergency or not and why, who
approved and who rejected it, who reviewed an emergency, the state it is in), for the VCS aliases
separation of duties matches implementers by, and for who may deploy to or approve for a restricted
environment now (the grants, and the members of the groups that hold them). People are compared by
their user id, which a rename does not change, or by every name the chain knows them by.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import Q

from audit import chain as audit_chain
from audit.models import AuditEvent
from core.times import iso
from environments import policy
from environments.models import Approval, ControlChange, Deployment, Environment
from environments.services import settings_of
from evidence.columns import Period
from releases.models import VcsAlias

DEPLOYMENT = "environments.deployment"
ENVIRONMENT = "environments.environment"
RELEASE = "releases.release"
BUILD = "releases.build"
CONTROL_CHANGE = "environments.controlchange"
CHUNK = 1000
REQUEST_TIME_SLACK = 60  # seconds between a request's time in the table and its event's (one transaction)


@dataclass(frozen=True)
class Mismatch:
    subject: str  # "deployment #12", "VCS alias #3"
    what: str  # the field that disagrees
    table: str  # what the table says
    chain: str  # what the audit chain says
    deployment: Deployment | None = None
    # An account's right the table holds and no event gave: the event that would record it, as
    # (action, object type, pk, name, data) (adopt_rights)
    adopt: tuple | None = field(default=None, compare=False)

    def sentence(self) -> str:
        return f"{self.subject}: {self.what} is {self.table!r} in the table, {self.chain!r} in the audit chain"


def _who(user_id, label) -> str:
    return f"{label} (user id {user_id})" if user_id else str(label)


def _deployment_mismatches(d: Deployment, events: list[AuditEvent], names: dict[int, set[str]]
                           ) -> Iterator[Mismatch]:
    for mismatch in _disagreements(d, events, names.get(d.environment_id, set())):
        yield Mismatch(f"deployment #{d.pk}", *mismatch, deployment=d)


def _disagreements(d: Deployment, events: list[AuditEvent], environment_names: set[str]
                   ) -> Iterator[tuple[str, str, str]]:
    """(what, the table's, the chain's) for each thing the table and the deployment's events disagree on
    (`environment_names`: every name the chain knows its environment by)."""
    requests = [e for e in events if e.action == "deployment.request"]
    if not requests:
        yield ("its request", f"requested by {d.requested_by_label}", "no deployment.request event")
        return
    request = requests[0]
    said = request.data or {}
    # what was requested where: a release's version and artifact never change, an environment's name
    # only through its events
    if (d.release.version, d.release.artifact_sha256) != (said.get("version"), said.get("artifact_sha256")):
        yield ("release", f"{d.release.version} ({d.release.artifact_sha256})",
               f"{said.get('version')} ({said.get('artifact_sha256')})")
    if said.get("environment") not in environment_names | {d.environment.name}:
        yield ("environment", d.environment.name, str(said.get("environment")))
    if abs((d.requested_at - request.created_at).total_seconds()) > REQUEST_TIME_SLACK:
        yield ("requested at", iso(d.requested_at), iso(request.created_at))
    # The label is the requester's name as it was then (a person's user name, ci:<token>, system): a
    # later rename changes neither it nor the event.
    if (request.actor_id, request.actor_username) != (d.requested_by_id, d.requested_by_label):
        yield (
            "requested by",
            _who(d.requested_by_id, d.requested_by_label),
            _who(request.actor_id, request.actor_username),
        )
    said = (bool(request.data.get("emergency")), request.data.get("emergency_reason", ""))
    if said != (d.emergency, d.emergency_reason):
        yield ("emergency (and its reason)", repr((d.emergency, d.emergency_reason)), repr(said))
    for decision, action, what in (
        (Approval.Decision.APPROVE, "deployment.approve", "approved by (user ids)"),
        (Approval.Decision.REJECT, "deployment.reject", "rejected by (user ids)"),
    ):
        table = sorted(a.approver_id for a in d.approvals.all() if a.decision == decision)
        chain = sorted(e.actor_id for e in events if e.action == action)
        if table != chain:
            yield (what, str(table), str(chain))
    reviews = [e.actor_id for e in events if e.action == "deployment.review"]
    if (reviews[-1] if reviews else None) != d.reviewed_by_id:
        yield ("reviewed by (user id)", str(d.reviewed_by_id), str(reviews[-1] if reviews else None))
    states = [e.data["state"] for e in events if "state" in (e.data or {})]
    if states and states[-1] != d.state:
        yield ("state", d.state, states[-1])


def restricted_requested(period: Period):
    """The deployments to restricted environments requested in the period (of its application only, if
    it names one): the population of the changes and exceptions reports."""
    found = Deployment.objects.filter(
        environment__restricted=True, requested_at__gte=period.since, requested_at__lt=period.until
    )
    return found.filter(release__application__name=period.application) if period.application else found


def deployments(period: Period, settings_events: list[tuple[int, dict, bool]]) -> Iterator[Mismatch]:
    """The restricted deployments requested in the period, each against its own audit events.
    `settings_events`: every environment's (`_settings_events()`)."""
    population = restricted_requested(period)
    # And those whose request the chain puts in the period: a requested_at moved by SQL takes a
    # deployment out of the changes report, not out of this check.
    # (in whichever environment its row is now: one moved out of a restricted environment by SQL too)
    names, restricted = environment_history(settings_events)
    requested = AuditEvent.objects.filter(action="deployment.request", object_type=DEPLOYMENT,
                                          created_at__gte=period.since, created_at__lt=period.until,
                                          data__environment__in=sorted({n for pk in restricted for n in names[pk]}))
    by_chain = Deployment.objects.filter(pk__in=[
        int(i) for i in requested.values_list("object_id", flat=True) if i.isdigit()])
    if period.application:
        by_chain = by_chain.filter(release__application__name=period.application)
    ids = sorted({*population.values_list("id", flat=True), *by_chain.values_list("id", flat=True)})
    seen_releases: set[int] = set()
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        events = defaultdict(list)
        for event in (
            AuditEvent.objects.filter(object_type=DEPLOYMENT, object_id__in=[str(i) for i in chunk])
            .only("seq", "created_at", "action", "actor_id", "actor_username", "data", "object_id")
            .order_by("seq")
        ):
            events[int(event.object_id)].append(event)
        chunk_deployments = list(
            Deployment.objects.filter(pk__in=chunk)
            .select_related("release__application", "release__build", "environment")
            .prefetch_related("approvals", "release__issues", "release__implementers")
            .order_by("id")
        )
        for d in chunk_deployments:
            yield from _deployment_mismatches(d, events[d.pk], names)
        releases = {d.release_id: d.release for d in chunk_deployments if d.release_id not in seen_releases}
        seen_releases.update(releases)
        yield from _release_mismatches(releases)


BUILD_FIELDS = ("commit", "branch", "url", "status", "tests_passed", "tests_failed", "tests_skipped")


def _release_mismatches(releases: dict) -> Iterator[Mismatch]:
    """The releases of those deployments, and the builds they were cut from, against their events: a
    release's registration (artifact, build, issue keys, implementers, pull request) never changes; a
    build's report is its registration and its updates."""
    if not releases:
        return
    registered = {int(e.object_id): e.data or {} for e in AuditEvent.objects.filter(
        action="release.register", object_type=RELEASE, object_id__in=[str(pk) for pk in releases]).only(*ONLY)}
    builds = {r.build_id: r.build for r in releases.values()}
    reported: dict[int, dict] = defaultdict(dict)
    for e in AuditEvent.objects.filter(action__in=("build.register", "build.update"), object_type=BUILD,
                                       object_id__in=[str(pk) for pk in builds]).only(*ONLY).order_by("seq"):
        data = e.data or {}
        reported[int(e.object_id)].update(data if e.action == "build.register" else data.get("changed") or {})
    for pk, release in sorted(releases.items()):
        subject = f"release {release}"
        if (said := registered.get(pk)) is None:
            yield Mismatch(subject, "its registration", "registered", "no release.register event")
            continue
        pr = said.get("pull_request") or {}
        for what, table, chain in (
            ("artifact_url", release.artifact_url, said.get("artifact_url")),
            ("artifact_sha256", release.artifact_sha256, said.get("artifact_sha256")),
            ("build", release.build.number, said.get("build")),
            ("issue_keys", sorted(i.key for i in release.issues.all()), said.get("issue_keys")),
            ("implementers", sorted(i.identity for i in release.implementers.all()), said.get("implementers")),
            ("pull_request_url", release.pull_request_url, pr.get("url", "")),
            ("pull_request_author", release.pull_request_author, pr.get("author", "")),
            ("pull_request_reviewers", release.pull_request_reviewers, pr.get("reviewers", [])),
        ):
            if table != chain:
                yield Mismatch(subject, what, str(table), str(chain))
    for pk, build in sorted(builds.items()):
        said = reported.get(pk)
        if said is None:
            yield Mismatch(f"build {build}", "its registration", "registered", "no build.register event")
            continue
        for name in BUILD_FIELDS:
            if name in said and said[name] != getattr(build, name):
                yield Mismatch(f"build {build}", name, str(getattr(build, name)), str(said[name]))


def aliases() -> Iterator[Mismatch]:
    """Every VCS alias (whatever the period: an alias matches implementers for good) against the event
    that added it; and every alias the chain added that is no longer there."""
    added = {
        int(e.object_id): e for e in AuditEvent.objects.filter(action="vcs_alias.add").only("seq", "object_id", "data")
    }
    aliases = list(VcsAlias.objects.select_related("user").order_by("id"))
    names = defaultdict(set)  # a person's names: their user name now, and the old ones kept as aliases
    for alias in aliases:
        names[alias.user_id].update({alias.user.get_username(), alias.identity})
    for alias in aliases:
        event, subject = added.pop(alias.pk, None), f"VCS alias #{alias.pk}"
        if event is None:
            yield Mismatch(subject, "identity", alias.identity, "no vcs_alias.add event")
        elif event.data.get("identity") != alias.identity:
            yield Mismatch(subject, "identity", alias.identity, str(event.data.get("identity")))
        elif event.data.get("user") not in names[alias.user_id]:
            yield Mismatch(subject, f"the owner of alias {alias.identity}", alias.user.get_username(),
                           str(event.data.get("user")))
    for pk, event in sorted(added.items()):
        yield Mismatch(
            f"VCS alias #{pk}",
            "identity",
            "(no row)",
            f"{event.data.get('identity')} of {event.data.get('user')}, added at seq {event.seq}",
        )


def _names(model, pks: set[int], action: str, renamed) -> dict[int, set[str]]:
    """Every name the chain knows each user or group by: the one it has now and those its renames
    (`action` events, `renamed(data)` -> (from, to) or None) gave it."""
    names = defaultdict(set)
    for pk, name in model.objects.filter(pk__in=pks).values_list("pk", "name" if model is Group else "username"):
        names[pk].add(name)
    for e in AuditEvent.objects.filter(action=action, object_id__in=[str(pk) for pk in pks]).only("object_id", "data"):
        if (change := renamed(e.data or {})) is not None:
            names[int(e.object_id)].update(change)
    return names


def _ended(event: AuditEvent | None, gave: str, never: str) -> str | None:
    """What the chain says of a right the table holds: None (the latest event gave it), or why not."""
    if event is None:
        return never
    return None if event.action == gave else f"{event.action} at seq {event.seq}"


ONLY = ("seq", "action", "object_id", "data")


class _Stream:
    """The events about one kind of right (a grant, a membership), found two ways: one written since
    grantees' ids are recorded (`key(event, True)` is not None) by the grantee's id; an earlier one by
    the names the chain knows the grantee by, and then the deletions of a user or group of that name
    count too (a name outlives its owner; an id does not come back)."""

    def __init__(self, events, key, deletions: tuple[tuple[str, str], ...]):
        self.by_id, self.by_name = {}, {}
        for e in events.only(*ONLY).order_by("seq"):
            if (by_id := key(e, True)) is not None:
                self.by_id[by_id] = e
            else:
                self.by_name[key(e, False)] = e
        self.deleted = {}  # (action, object id) and (action, name) -> the latest deletion
        for action, name_field in deletions:
            for e in AuditEvent.objects.filter(action=action).only(*ONLY).order_by("seq"):
                self.deleted[(action, int(e.object_id))] = self.deleted[(action, (e.data or {}).get(name_field))] = e

    def latest(self, id_key, name_keys, deletion: str, pk: int, names: set[str]) -> AuditEvent | None:
        """The latest event about a right: its own (by id, or by name) or its holder's deletion."""
        found = [self.by_id.get(id_key), self.deleted.get((deletion, pk))]
        if by_name := [e for e in (self.by_name.get(k) for k in name_keys) if e is not None]:
            found += by_name + [self.deleted.get((deletion, name)) for name in names]
        return max((e for e in found if e is not None), key=lambda e: e.seq, default=None)


@dataclass(frozen=True)
class Right:
    """A right to deploy to or approve for a restricted environment held now, directly or through a
    group, with the latest audit events about it."""

    environment: Environment
    codename: str
    user: object
    group: Group | None
    grant: AuditEvent | None  # the latest event about the grant (to the user, or to the group)
    membership: AuditEvent | None  # through a group: the latest about the user's membership of it

    def why_not_given(self) -> str | None:
        return _ended(self.grant, "environment.grant", "never granted")

    def why_not_member(self) -> str | None:
        if self.group is None:
            return None
        if self.membership is not None and "adopted" in (self.membership.data or {}):
            # adopt_rights never gives one: it was recorded while the group held no such grant
            return f"adopted at seq {self.membership.seq}, never given through the portal"
        return _ended(self.membership, "group.add_member", "never added")

    def since(self) -> AuditEvent | None:
        """The event from which the chain says the user holds it; None if the chain does not say so."""
        if self.why_not_given() or self.why_not_member():
            return None
        return max((e for e in (self.grant, self.membership) if e is not None), key=lambda e: e.seq)


def _member_key(e, by_id):
    d = e.data or {}
    if by_id:
        return (int(e.object_id), d["user_id"]) if "user_id" in d else None
    return (int(e.object_id), d.get("user"))


_USER_DELETED = ("user.delete", "username")
_GROUP_DELETED = ("group.delete", "group")


def _memberships(group_pks: set[int]) -> _Stream:
    """The membership events of these groups: `.latest((group pk, user pk), [(group pk, name)...],
    "user.delete", user pk, names)` is the latest about one member."""
    return _Stream(AuditEvent.objects.filter(action__in=("group.add_member", "group.remove_member"),
                                             object_id__in={str(pk) for pk in group_pks}),
                   _member_key, (_USER_DELETED, _GROUP_DELETED))


def _user_names(pks: set[int]) -> dict[int, set[str]]:
    return _names(get_user_model(), pks, "user.change",
                  lambda d: (d["changed"]["username"]["from"], d["changed"]["username"]["to"])
                  if "username" in d.get("changed", {}) else None)


def held_rights(environments) -> list[Right]:
    """Each right to deploy or approve on these restricted environments held now (the grants, and the
    members of the groups that hold them), each with the audit events that gave or ended it."""
    held = []  # (environment, codename, user, group or None)
    for env in environments:
        by_group, direct = policy.grants_on(env)
        for gp in by_group.select_related("group", "permission").order_by("id"):
            held += [(env, gp.permission.codename, user, gp.group) for user in gp.group.user_set.order_by("id")]
        held += [(env, up.permission.codename, up.user, None) for up in direct.select_related("user", "permission")
                 .order_by("id")]
    if not held:
        return []
    users = _user_names({u.pk for _, _, u, _ in held})
    groups = _names(Group, {g.pk for _, _, _, g in held if g}, "group.rename", lambda d: (d["from"], d["to"]))

    def grant_key(e, by_id):
        d = e.data or {}
        if by_id:
            role = "group" if d.get("group_id") is not None else "user"
            return (int(e.object_id), d.get("permission"), role, d[f"{role}_id"]) if f"{role}_id" in d else None
        return (int(e.object_id), d.get("permission"), d.get("group"), d.get("user"))

    grants = _Stream(AuditEvent.objects.filter(action__in=("environment.grant", "environment.revoke"),
                                               object_id__in={str(env.pk) for env, _, _, _ in held}),
                     grant_key, (("group.delete", "group"), _USER_DELETED))
    memberships = _memberships({g.pk for _, _, _, g in held if g})
    rights = []
    for env, codename, user, group in held:
        names = users[user.pk]
        if group is None:
            grant = grants.latest((env.pk, codename, "user", user.pk),
                                  [(env.pk, codename, None, n) for n in sorted(names)], "user.delete", user.pk, names)
            membership = None
        else:
            group_names = groups[group.pk]
            grant = grants.latest((env.pk, codename, "group", group.pk),
                                  [(env.pk, codename, n, None) for n in sorted(group_names)],
                                  "group.delete", group.pk, group_names)
            membership = memberships.latest((group.pk, user.pk), [(group.pk, n) for n in sorted(names)],
                                            "user.delete", user.pk, names)
        rights.append(Right(env, codename, user, group, grant, membership))
    return rights


def rights(period: Period) -> Iterator[Mismatch]:
    """Each right to deploy to or approve for a restricted environment held now against the chain: the
    latest event about that grant gave it (environment.grant, not a revoke, nor the deletion of its
    holder since), and the latest about a holding group's member added them (group.add_member)."""
    environments = Environment.objects.filter(restricted=True).select_related("application").order_by("id")
    if period.application:
        environments = environments.filter(application__name=period.application)
    seen = set()
    for right in held_rights(environments):
        user, group = right.user, right.group
        through = f" through group {group.name}" if group else ""
        if why := right.why_not_given():
            yield Mismatch(f"{right.codename} on {right.environment}", f"the right of {user.get_username()}{through}",
                           "held", why)
        if group is not None and (group.pk, user.pk) not in seen:
            seen.add((group.pk, user.pk))
            if why := right.why_not_member():
                yield Mismatch(f"group {group.name}", f"the membership of {user.get_username()}", "member", why)


RAISED_FLAGS = ("is_superuser", "is_staff")


def accounts() -> Iterator[Mismatch]:
    """Every account's rights beyond a grant on an environment against the events that gave them: its
    superuser and staff flags, its being active after the chain deactivated it, and the model
    permissions it holds directly or through a group (with its membership of that group). A right to
    change accounts, groups or environments given by SQL shows here, as a grant does in rights()."""
    user_model = get_user_model()
    said: dict[int, dict] = {}  # user pk -> its flags as the chain last set them
    given: dict[tuple[str, int], set[str]] = defaultdict(set)  # ("user" or "group", pk) -> model permissions
    labels = {"user": user_model._meta.label_lower, "group": Group._meta.label_lower}
    kinds = {label: kind for kind, label in labels.items()}
    for e in AuditEvent.objects.filter(
        action__in=("user.create", "user.change", "user.permissions", "user.delete", "group.permissions",
                    "group.delete"), object_type__in=kinds,
    ).only(*ONLY, "object_type").order_by("seq"):
        data, pk = e.data or {}, int(e.object_id)
        if e.action.endswith(".delete"):  # an id written again by SQL gets nothing the deleted one had
            if e.action == "user.delete":
                said.pop(pk, None)
            given.pop((kinds[e.object_type], pk), None)
        elif e.action == "user.create":  # Django's defaults where an event does not say (the demo's before)
            said[pk] = {"is_active": data.get("is_active", True), "is_staff": data.get("is_staff", False),
                        "is_superuser": data.get("is_superuser", False)}
        elif e.action == "user.change":
            for flag, change in (data.get("changed") or {}).items():
                if flag in (*RAISED_FLAGS, "is_active"):
                    said.setdefault(pk, {})[flag] = change.get("to")
        else:
            held = given[(kinds[e.object_type], pk)]
            held |= set(data.get("added") or [])
            held -= set(data.get("removed") or [])
    users = {pk: (name, flags) for pk, name, *flags in user_model.objects.order_by("pk").values_list(
        "pk", user_model.USERNAME_FIELD, "is_active", *RAISED_FLAGS)}
    for pk, (name, (active, *raised)) in users.items():
        chain = said.get(pk)
        for flag, value in zip(RAISED_FLAGS, raised, strict=True):
            if value and (chain is None or chain.get(flag) is not True):
                was = None if chain is None else chain.get(flag, False)
                yield Mismatch(f"account {name}", flag, "True", "no user.create event" if chain is None else str(was),
                               adopt=("user.change", labels["user"], pk, name,
                                      {"user": name, "changed": {flag: {"from": was, "to": True}}}))
        if active and chain is not None and chain.get("is_active") is False:
            yield Mismatch(f"account {name}", "is_active", "True", "False", adopt=(
                "user.change", labels["user"], pk, name,
                {"user": name, "changed": {"is_active": {"from": False, "to": True}}}))
    permissions = (("user", user_model.user_permissions.through, "user_id"), ("group", Group.permissions.through,
                                                                             "group_id"))
    group_names = dict(Group.objects.values_list("pk", "name"))
    holding = set()  # the groups that hold a model permission
    for kind, through, column in permissions:
        for pk, app_label, codename in through.objects.order_by(column, "permission__content_type__app_label",
                                                                "permission__codename").values_list(
                column, "permission__content_type__app_label", "permission__codename"):
            if kind == "group":
                holding.add(pk)
            if (label := f"{app_label}.{codename}") not in given[(kind, pk)]:
                name = users[pk][0] if kind == "user" else group_names[pk]
                yield Mismatch(f"account {name}" if kind == "user" else f"group {name}",
                               f"the model permission {label}", "held", "never given",
                               adopt=(f"{kind}.permissions", labels[kind], pk, name,
                                      {kind: name, "added": [label], "removed": []}))
    if not holding:
        return
    members = list(user_model.groups.through.objects.filter(group_id__in=holding).order_by("group_id", "user_id")
                   .values_list("group_id", "user_id"))
    names, stream = _user_names({user for _, user in members}), _memberships(holding)
    # A membership that brings a right to deploy to or approve for a restricted environment is never
    # adopted: another administrator gives it through the portal, where rule 4 is asked.
    granting = policy.groups_granting_restricted()
    for group, user in members:
        latest = stream.latest((group, user), [(group, n) for n in sorted(names[user])], "user.delete", user,
                               names[user])
        if (gone := stream.deleted.get((_GROUP_DELETED[0], group))) and (latest is None or gone.seq > latest.seq):
            latest = gone  # the group was deleted since: its id written again by SQL is another group
        if why := _ended(latest, "group.add_member", "never added"):
            yield Mismatch(f"group {group_names[group]}", f"the membership of {users[user][0]}", "member", why,
                           adopt=None if group in granting else (
                               "group.add_member", labels["group"], group, group_names[group],
                               {"group": group_names[group], "user": users[user][0], "user_id": user}))


# The events adopt_rights writes (each with `adopted`: its reason).
ADOPTED_ACTIONS = ("user.change", "user.permissions", "group.permissions", "group.add_member")


def adopt_rights(*, actor, reason: str, dry_run: bool = False) -> list[Mismatch]:
    """Record on the chain the accounts' rights the tables hold and no event gave (accounts()): rights
    made before the portal audited them (an administrator made with createsuperuser) or outside it. Each
    is the event the portal would have written (user.change, user.permissions, group.permissions,
    group.add_member) with `adopted`: the reason, by `actor`; the exceptions report of its period lists
    it (RIGHT_MADE_OUTSIDE_PORTAL), later ones no longer do. What it found, adopted unless `dry_run`."""
    if not reason.strip():
        raise ValueError("Say why these rights are adopted: the reason is part of the record.")
    with transaction.atomic():
        found = [m for m in accounts() if m.adopt is not None]
        if not dry_run:
            for m in found:
                action, object_type, pk, name, data = m.adopt
                audit_chain.append(actor=actor, action=action, object_type=object_type, object_id=str(pk),
                                   object_repr=name, data={**data, "adopted": reason.strip()})
    return found


def _settings_events():
    """The events that set environments' settings, oldest first: their creation and changes (`changed`:
    from, to) and the control changes approved for them (`now`: every setting after). (environment id,
    {setting: value}, is_creation) each."""
    changes = ControlChange.objects.filter(freeze_window__isnull=True, environment__isnull=False)
    changed = dict(changes.values_list("pk", "environment_id"))
    own = Q(action__in=("environment.create", "environment.change"), object_type=ENVIRONMENT)
    events = AuditEvent.objects.filter(own | Q(action="control_change.approve", object_type=CONTROL_CHANGE,
                                               object_id__in=[str(pk) for pk in changed])).only(*ONLY).order_by("seq")
    for e in events:
        data = e.data or {}
        if e.action == "control_change.approve":
            yield changed[int(e.object_id)], data.get("now") or {}, False
        else:
            yield (int(e.object_id), {name: new for name, (_old, new) in (data.get("changed") or {}).items()},
                   e.action == "environment.create")


def environment_history(settings_events: list[tuple[int, dict, bool]]) -> tuple[dict[int, set[str]], set[int]]:
    """Every name the chain knows each environment by, and the environments it has ever made restricted."""
    names: dict[int, set[str]] = defaultdict(set)
    restricted = set()
    for pk, name, is_restricted in Environment.objects.values_list("pk", "name", "restricted"):
        names[pk].add(name)
        if is_restricted:
            restricted.add(pk)
    for pk, settings, _created in settings_events:
        if "name" in settings:
            names[pk].add(settings["name"])
        if settings.get("restricted"):
            restricted.add(pk)
    return names, restricted


def environment_settings(period: Period, settings_events: list[tuple[int, dict, bool]]) -> Iterator[Mismatch]:
    """Each environment's settings (its name, promotion path, restriction, approvals, code review,
    automatic deployment, playbook and inventory) against what its events set: its creation and changes
    and the control changes approved for it. A restricted environment must have been made through the
    portal (an environment.create event); one the chain made restricted is read whatever its row says."""
    environments = Environment.objects.select_related("application").order_by("id")
    if period.application:
        environments = environments.filter(application__name=period.application)
    environments = list(environments)
    if not environments:
        return
    said: dict[int, dict] = defaultdict(dict)
    created = set()
    for pk, settings, is_creation in settings_events:
        said[pk].update(settings)
        if is_creation:
            created.add(pk)
    for env in environments:
        subject = f"environment {env}"
        if env.pk not in created:
            if env.restricted:
                yield Mismatch(subject, "its creation", "exists", "no environment.create event")
            continue
        for name, value in settings_of(env).items():
            if name in said[env.pk] and said[env.pk][name] != value:
                yield Mismatch(subject, name, str(value), str(said[env.pk][name]))


def mismatches(period: Period) -> Iterator[Mismatch]:
    settings_events = list(_settings_events())  # read once: the deployments' environments and their settings
    yield from deployments(period, settings_events)
    yield from aliases()
    seen = set()  # a membership both a grant and a model permission come through is said once
    for mismatch in itertools.chain(rights(period), accounts()):
        if mismatch not in seen:
            seen.add(mismatch)
            yield mismatch
    yield from environment_settings(period, settings_events)
