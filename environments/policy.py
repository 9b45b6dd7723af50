"""The rules of DESIGN.md, in one place. Every entry point asks these functions through a service,
and the pages ask the same functions to decide what to offer.

Each `check_*` returns None (allowed) or a Refusal: a stable code, one sentence a person understands,
and the HTTP status the API answers with (403: who you are; 409: the state of things). Each `decide_*`
answers in one shape, a Decision: the refusal or nothing, the separation-of-duties checks made, and
what happens next. Each runs a fixed number of queries, whatever the size of the history.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property, lru_cache

from auditlog.models import LogEntry
from confusable_homoglyphs import confusables
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.db.models import Q, Subquery, Value
from django.db.models.functions import Lower
from django.utils import timezone
from guardian.models import GroupObjectPermission, UserObjectPermission

from audit.actors import Actor
from audit.models import AuditEvent
from core.compiled import CompiledRead, Pending, model_fields, together
from core.decisions import Decision, Next, Refusal, conflict, forbidden, no
from environments.models import Approval, ControlChange, Deployment, Environment, FreezeOccurrence, FreezeWindow
from releases.models import Build, Implementer, Release, VcsAlias

DEPLOY = "deploy_environment"
APPROVE = "approve_environment"
GRANTABLE = (DEPLOY, APPROVE)


# --- facts the rules need -------------------------------------------------------------------------

def grants_on(environment: Environment):
    """The explicit deploy/approve grants on one environment: (group grants, user grants) querysets."""
    return _grants_on_any([environment.pk])


def _grants_on_any(environment_ids):
    where = {"content_type": ContentType.objects.get_for_model(Environment),
             "object_pk__in": [str(pk) for pk in environment_ids], "permission__codename__in": GRANTABLE}
    return GroupObjectPermission.objects.filter(**where), UserObjectPermission.objects.filter(**where)


def groups_granting_restricted() -> set[int]:
    """The groups holding a grant to deploy to or approve for a restricted environment (their members do)."""
    restricted = list(Environment.objects.filter(restricted=True).values_list("pk", flat=True))
    return set(_grants_on_any(restricted)[0].values_list("group_id", flat=True))


def group_environment_grants(group: Group) -> list[str]:
    """A group's grants on environments, as "permission on environment" (what its members hold through it)."""
    rows = GroupObjectPermission.objects.filter(group=group, permission__codename__in=GRANTABLE).values_list(
        "permission__codename", "object_pk")
    names = {str(e.pk): str(e) for e in Environment.objects.filter(pk__in=[int(pk) for _, pk in rows])
             .select_related("application")}
    return sorted(f"{codename} on {names.get(pk, pk)}" for codename, pk in rows)


def environment_grants(user, environment: Environment) -> set[str]:
    """The explicit per-environment grants a user holds, directly or through a group.

    Superuser status grants nothing here: only an explicit grant counts (rule 4).
    """
    return environment_grants_among(user, [environment.pk])[environment.pk]


def environment_grants_among(user, environment_ids) -> dict[int, set[str]]:
    """`environment_grants` for each of several environments, in one query (a listing of many decisions)."""
    found: dict[int, set[str]] = {pk: set() for pk in environment_ids}
    if user is None or not user.is_active or not found:
        return found
    by_group, direct = _grants_on_any(found)
    columns = ("object_pk", "permission__codename")
    for object_pk, codename in direct.filter(user=user).values_list(*columns).union(
            by_group.filter(group__user=user).values_list(*columns)):
        found[int(object_pk)].add(codename)
    return found


def holds_any_grant(user) -> bool:
    """Whether a user holds a deploy or approve grant on any environment (directly or by group)."""
    if user is None or not user.is_active:
        return False
    return (
        UserObjectPermission.objects.filter(user=user, permission__codename__in=GRANTABLE).exists()
        or GroupObjectPermission.objects.filter(group__user=user, permission__codename__in=GRANTABLE).exists()
    )


# An e-mail address inside an identity: git's "Name <e-mail>", "e-mail (Name)", "mailto:e-mail".
ADDRESS_IN = re.compile(r"[^\s<>()\[\]{},;:\"'`]+@[^\s<>()\[\]{},;:\"'`]+")
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Me", "Mn"})  # controls, formats, marks left over


def _hidden(c: str) -> bool:
    """A character a reader does not see: formatting (zero-width, direction, tags), a control, a
    combining mark or variation selector NFKC left alone, or a letter that shows as a blank."""
    return unicodedata.category(c) in HIDDEN_CATEGORIES or c in BLANK_LOOKING


def _as_shown(text: str) -> str:
    """`text` as a reader sees it, lower-case: in Unicode's compatibility form ('ｂｏｂ' and '𝐛𝐨𝐛' are
    'bob'), without what does not show (_hidden), single spaces, and each letter that looks like an
    ASCII letter or digit (a Cyrillic 'о', a Latin 'ɑ') written as that one (Unicode's confusables)."""
    text = "".join(c for c in unicodedata.normalize("NFKC", text).lower() if not _hidden(c))
    text = " ".join(text.split())
    if text.isascii():
        return text
    return "".join(c if c.isascii() else _ascii_twin(c) for c in text)


# Shapes one reads as another: the ASCII letters and digits Unicode's confusables take for one another
# (an upper-case I or a 1 for an l, a 0 for an O), and the Cyrillic palochka, a bar like an l in either
# case (the table takes the small one, what lower-casing makes of the capital, for an i).
_SAME_SHAPE = str.maketrans({"I": "l", "1": "l", "0": "o", "O": "o", "\u04c0": "l", "\u04cf": "l"})


def _as_drawn(text: str) -> str:
    """`text` as a reader sees its letters' shapes: each taken for the one it is drawn like before
    lower-casing ('a1ice', 'aӏice' and 'AIice' are 'alice'; 'b0b' is 'bob'), then each other letter
    for its ASCII twin as _as_shown does."""
    text = " ".join("".join(c for c in unicodedata.normalize("NFKC", text) if not _hidden(c)).split())
    text = text.translate(_SAME_SHAPE).lower()
    return "".join(c if c.isascii() else _ascii_twin(c) for c in text)


@lru_cache(maxsize=4096)
def _ascii_twin(c: str) -> str:
    """The ASCII letter or digit a character looks like (Unicode's confusables), else itself."""
    twins = [h["c"] for h in confusables.confusables_data.get(c, ()) if h["c"].isascii() and h["c"].isalnum()]
    return twins[0].lower() if twins else c


@lru_cache(maxsize=8192)  # pure; asked for the same few people's identities again and again
def identity_forms(identity: str) -> frozenset[str]:
    """What a VCS identity (or a person's user name, e-mail or alias) may name a person by, lower-case:
    itself, as a reader sees it (_as_shown, _as_drawn), and the e-mail addresses inside any ("Name <e-mail>")."""
    forms = {identity.strip().lower()}
    forms.add(_as_shown(identity))
    forms.add(_as_drawn(identity))
    forms |= {address.rstrip(".") for form in list(forms) for address in ADDRESS_IN.findall(form)}
    forms.discard("")
    return frozenset(forms)


def _mailbox(form: str) -> str | None:
    """An address's mailbox without its "+tag" (bob+ci@example.com is bob@example.com's), if it has one."""
    local, at, domain = form.rpartition("@")
    if at and "+" in local and (box := local.split("+", 1)[0]):
        return f"{box}@{domain}"
    return None


@dataclass(frozen=True)
class Shown:
    """What some identities show: their forms, and the mailboxes of their +tagged addresses."""

    forms: frozenset[str]
    mailboxes: frozenset[str]

    def meets(self, other: Shown) -> bool:
        """Whether the two name one person: a form in common, or one's +tagged address is the other's
        mailbox (two +tags of one shared mailbox, dev+alice@ and dev+bob@, do not meet)."""
        return bool(self.forms & other.forms or self.mailboxes & other.forms or self.forms & other.mailboxes)

    @property
    def searched(self) -> frozenset[str]:
        """What to look a person up by (their user name, e-mail or alias as stored)."""
        return self.forms | self.mailboxes


def shown(identities) -> Shown:
    forms = frozenset(f for identity in identities for f in identity_forms(identity))
    return Shown(forms, frozenset(m for f in forms if (m := _mailbox(f))))


def person_identities(user) -> set[str]:
    """Everything a person may appear as in VCS metadata, lower-case."""
    identities = {user.get_username().lower()}
    if user.email:
        identities.add(user.email.strip().lower())
    identities.update(VcsAlias.objects.filter(user=user).values_list("identity", flat=True))
    return identities


def identity_users(identities) -> dict[str, set[int]]:
    """The people each VCS identity (lower-case) may be: by VCS alias, e-mail or user name, any case.
    One query, whatever the number of identities."""
    return _identity_users(identities)[0]


def _identity_rows(identities):
    """The aliases and the people the identities (lower-case) may be, together: (True, user, alias, "")
    and (False, user, e-mail, user name), an e-mail or user name in any case."""
    aliases = VcsAlias.objects.filter(identity__in=identities).order_by().values_list(
        Value(True), "user_id", "identity", Value(""))
    people = get_user_model().objects.alias(email_lower=Lower("email"), username_lower=Lower("username")).filter(
        Q(email_lower__in=identities) | Q(username_lower__in=identities)).order_by().values_list(
        Value(False), "id", "email", "username")
    return aliases.union(people, all=True)


# Every release registration asks (its implementers): compiled once per number of identities.
_IDENTITY_ROWS = CompiledRead(_identity_rows, (str,))


def identity_users_read(identities) -> Pending:
    """resolve_identity_users' read of these identities (all their forms), to be run with others
    (core.compiled.together)."""
    return _IDENTITY_ROWS.later(sorted(shown(identities).searched))


def _identity_users(identities, read: Pending | None = None) -> tuple[dict[str, set[int]], dict[str, int]]:
    """identity_users (by any of an identity's forms), and the user each identity itself is a VCS alias
    of (`read`: identity_users_read's of the same identities, when run already)."""
    identities = sorted(set(identities))
    found: dict[str, set[int]] = {}
    aliased: dict[str, int] = {}
    if not identities:
        return found, aliased
    by_form: dict[str, set[int]] = {}
    for is_alias, user_id, first, second in (identity_users_read(identities) if read is None else read).tuples():
        if is_alias:
            by_form.setdefault(first, set()).add(user_id)
            aliased[first] = user_id
            continue
        for form in {(first or "").strip().lower(), second.lower()}:
            by_form.setdefault(form, set()).add(user_id)
    for identity in identities:
        if users := {pk for form in shown([identity]).searched for pk in by_form.get(form, ())}:
            found[identity] = users
    return found, {identity: aliased[identity] for identity in identities if identity in aliased}


def resolve_identity_users(identities, read: Pending | None = None) -> dict[str, int]:
    """One portal user per VCS identity, where one is known: the VCS alias first, else the user whose
    e-mail or user name it is (case-insensitive). `read`: identity_users_read's, when run already."""
    found, aliased = _identity_users(identities, read)
    return {identity: aliased.get(identity, min(users)) for identity, users in found.items()}


def decide_alias(*, user, identity: str) -> Decision:
    """Rule 3's identities name one person each: an alias may not be an identity that is already
    someone's (another person's user name or e-mail, or any alias), or it would take a change away from
    the person who implemented it."""
    identity = identity.strip().lower()
    found, aliased = _identity_users([identity])
    if found.get(identity, set()) - {user.pk}:
        return no(conflict("IDENTITY_TAKEN", f"{identity} is already another person's user name, e-mail or VCS "
                                              "alias; an identity names one person."))
    if identity in aliased:
        return no(conflict("IDENTITY_TAKEN", f"{identity} is already a VCS alias of {user.get_username()}."))
    return Decision()


def identities_of_users(user_ids) -> dict[int, set[str]]:
    """`person_identities` of many people at once (two queries)."""
    user_ids = sorted(set(user_ids))
    found: dict[int, set[str]] = {pk: set() for pk in user_ids}
    if not user_ids:
        return found
    for pk, username, email in get_user_model().objects.filter(pk__in=user_ids).values_list("pk", "username",
                                                                                            "email"):
        found[pk].add(username.lower())
        if email:
            found[pk].add(email.strip().lower())
    for user_id, identity in VcsAlias.objects.filter(user_id__in=user_ids).values_list("user_id", "identity"):
        found[user_id].add(identity)
    return found


@dataclass(frozen=True)
class Implementers:
    identities: frozenset[str]
    user_ids: frozenset[int]

    @cached_property
    def shown(self) -> Shown:
        return shown(self.identities)

    def match(self, user, identities: set[str] | None = None) -> str | None:
        """How `user` is an implementer ('user', 'identity'), or None. `identities`: the person's, when
        already read (person_identities)."""
        if user is None:
            return None
        if user.pk in self.user_ids:
            return "user"
        if self.shown.meets(shown(person_identities(user) if identities is None else identities)):
            return "identity"
        return None


class ImplementersIndex:
    """The implementers of many releases, asked which of them a person implemented: Implementers.match
    of each release at once (a report over a year of releases asks it for every holder of a right)."""

    def __init__(self, rows):
        """rows: (release key, identity, user id or None)."""
        self.by_user: dict[int, set] = {}
        self.by_form: dict[str, set] = {}
        self.by_mailbox: dict[str, set] = {}
        for key, identity, user_id in rows:
            if user_id is not None:
                self.by_user.setdefault(user_id, set()).add(key)
            implementer = shown([identity])
            for form in implementer.forms:
                self.by_form.setdefault(form, set()).add(key)
            for mailbox in implementer.mailboxes:
                self.by_mailbox.setdefault(mailbox, set()).add(key)

    def implemented_by(self, user, identities: set[str]) -> set:
        """The keys of the releases `user` implemented (`identities`: theirs, person_identities): what
        Implementers.match says of each."""
        person = shown(identities)
        found = set(self.by_user.get(user.pk, ()))
        for form in person.forms | person.mailboxes:
            found |= self.by_form.get(form, set())
        for form in person.forms:
            found |= self.by_mailbox.get(form, set())
        return found


def implementers_of(release: Release) -> Implementers:
    """A release's implementers (from `prefetch_related("implementers")` where the caller prefetched them)."""
    if "implementers" in getattr(release, "_prefetched_objects_cache", {}):
        rows = [(i.identity, i.user_id) for i in release.implementers.all()]
    else:
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
    return forbidden(
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
    """A build is one CI run of one commit on one branch: a report of the same number for another
    commit or branch is another run (BUILD_CONFLICT, whatever its status), and a finished build's report
    never changes (the same report again is fine)."""
    if "commit" in changed or "branch" in changed:
        return conflict(
            "BUILD_CONFLICT",
            f"{build} is commit {build.commit} on {build.branch}; this report names commit "
            f"{changed.get('commit', build.commit)} on {changed.get('branch', build.branch)}. A build number names "
            "one CI run: send a number unique across the application's jobs and branches.",
        )
    if changed and build.is_finished:
        return conflict(
            "BUILD_FINISHED",
            f"{build} is already {build.get_status_display().lower()}; a finished build never changes "
            f"(this report differs in {', '.join(sorted(changed))}).",
        )
    return None


def check_release_registration(application, version: str, build_number: str, build: Build | None,
                               existing: Release | None, digest: str, differs: tuple[str, ...] = ()
                               ) -> Refusal | None:
    """A version names one artifact, cut from a known, successful build (rule 2). `differs`: the fields in
    which a registration of a version registered already, written otherwise (`digest`), differs from the
    first one; none: the same registration written another way (a time in another time zone)."""
    if existing is not None and existing.registration_digest != digest and differs:
        return conflict(
            "RELEASE_CONFLICT",
            f"{application} {version} is already registered with other content; a version names one artifact only"
            + f" (this registration differs in {', '.join(differs)}).",
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
        return forbidden("NOT_PERMITTED", f"You are not allowed to register builds or releases of {application}.")
    return None


# --- who may ask ----------------------------------------------------------------------------------

def readable_applications(actor: Actor) -> frozenset[int] | None:
    """The applications whose builds, releases and deployments an actor may read (None: all).

    A CI token reads only the applications it is scoped to; anything else answers as if it did not
    exist (404, not 403), so a token learns nothing about other applications.
    """
    return actor.token_applications if actor.is_ci else None


TOKEN_SCOPE = "TOKEN_SCOPE"  # the API answers it as "no such application" (releases.api)


def check_token_scope(actor: Actor, application) -> Refusal | None:
    if actor.is_ci and application.pk not in actor.token_applications:
        return forbidden(TOKEN_SCOPE, f"This CI token is not allowed to act on {application}.")
    return None


def check_ci_not_restricted(actor: Actor, environment: Environment) -> Refusal | None:
    if actor.is_ci and environment.restricted:
        return forbidden(
            "CI_TOKEN_RESTRICTED",
            f"{environment} is restricted: a CI token can never request, approve or cancel deployments there.",
        )
    return None


def check_may_request(actor: Actor, environment: Environment, grants: set[str]) -> Refusal | None:
    """Rule 4: restricted environments need the explicit deploy grant; others a deploy permission.
    The portal itself (auto-deploy) deploys only to non-restricted environments."""
    if actor.is_system:
        if environment.restricted:
            return forbidden("AUTO_DEPLOY_RESTRICTED", f"{environment} is restricted: it never deploys by itself.")
        return None
    if actor.is_ci:
        return None
    if environment.restricted:
        if DEPLOY not in grants:
            return forbidden(
                "NOT_RELEASER",
                f"You are not a releaser of {environment}: requesting a deployment there needs the "
                "deploy permission granted on that environment.",
            )
        return None
    if actor.user is None or not (
        DEPLOY in grants or actor.user.has_perm("environments.add_deployment")
    ):
        return forbidden("NOT_PERMITTED", f"You are not allowed to request deployments to {environment}.")
    return None


def check_may_approve(actor: Actor, environment: Environment, grants: set[str], doing: str = "approving"
                      ) -> Refusal | None:
    if APPROVE not in grants:
        return forbidden(
            "NOT_RELEASER",
            f"You are not a releaser of {environment}: {doing} there needs the approve permission "
            "granted on that environment.",
        )
    return None


# --- rule 3: separation of duties -----------------------------------------------------------------

def check_implementers_recorded(release: Release, environment: Environment, implementers: Implementers):
    if environment.restricted and not implementers.identities:
        return conflict(
            "NO_IMPLEMENTERS",
            f"{release} records no implementers, so nobody can show that its approver did not write it; "
            f"it cannot go to {environment}.",
        )
    return None


def check_not_implementer(user, implementers: Implementers, code: str, role: str,
                          identities: set[str] | None = None) -> Refusal | None:
    if user is not None and implementers.match(user, identities):
        return forbidden(code, f"You implemented this change, so you may not {role} it.")
    return None


# --- rule 9: reviewed change ----------------------------------------------------------------------

def independent_reviewers(release: Release, implementers: Implementers) -> list[str]:
    """The pull request's reviewers who are neither its author nor an implementer, under any identity.

    Reviewers are resolved to people exactly like implementers (user, e-mail or user name in any
    case, VCS aliases); a reviewer who is the author's person or an implementer's person does not count.
    A fixed number of queries, whatever the number of reviewers.
    """
    author = release.pull_request_author.strip().lower()
    reviewers = {r.strip().lower() for r in release.pull_request_reviewers if r and r.strip()}
    candidates = reviewers - {author} - implementers.identities
    if not candidates:
        return []
    people = identity_users(candidates | {author} if author else candidates)
    excluded_users = set(implementers.user_ids) | people.get(author, set())
    excluded = shown(implementers.identities | ({author} if author else set()))
    identities = identities_of_users(pk for r in candidates for pk in people.get(r, ()))
    return sorted(
        r for r in candidates
        if not shown([r]).meets(excluded)
        and not any(pk in excluded_users or shown(identities[pk]).meets(excluded) for pk in people.get(r, ()))
    )


def check_code_review(release: Release, environment: Environment, implementers: Implementers):
    if not environment.requires_code_review:
        return None
    if not release.pull_request_url or not independent_reviewers(release, implementers):
        return conflict(
            "NO_CODE_REVIEW",
            f"{environment} requires a reviewed change: the pull request of {release} needs a reviewer "
            "who is neither its author nor an implementer.",
        )
    return None


# --- rule 1: promotion path -----------------------------------------------------------------------

_PROMOTION_SOURCE = CompiledRead(lambda release_id, environment_id: Deployment.objects.filter(
    release_id=release_id, environment_id=environment_id, state=Deployment.State.SUCCEEDED,
).order_by("-finished_at", "-id").values(*model_fields(Deployment))[:1], int, int)


def promotion_source_read(release: Release, environment: Environment) -> Pending | None:
    """promotion_source's read, to be run with others (core.compiled.together); None where the
    environment starts its promotion path."""
    if environment.promotes_from_id is None:
        return None
    return _PROMOTION_SOURCE.later(release.pk, environment.promotes_from_id)


def promotion_source(release: Release, environment: Environment, read: Pending | None = None) -> Deployment | None:
    """The latest succeeded deployment of this release to the environment it must come from (`read`:
    promotion_source_read's, when run already)."""
    if environment.promotes_from_id is None:
        return None
    found = (promotion_source_read(release, environment) if read is None else read).instances(Deployment)
    return found[0] if found else None


def check_promotion_path(release, environment, source: Deployment | None) -> Refusal | None:
    if environment.promotes_from_id is not None and source is None:
        return conflict(
            "PROMOTION_PATH",
            f"{release} has not been deployed successfully to {environment.promotes_from.name}, "
            f"which comes before {environment.name}.",
        )
    return None


# --- rules 6 and 7: one at a time, in order; freeze windows ---------------------------------------

LONGEST_FREEZE = dt.timedelta(days=62)  # an occurrence of a recurring freeze that began this long ago is over


def _freeze_windows(environment_ids, application_ids, until, ending_after):
    return FreezeWindow.objects.filter(
        Q(environment_id__in=environment_ids) | Q(application_id__in=application_ids, environment__isnull=True),
        starts_at__lt=until, ends_at__gt=ending_after,
    ).order_by("starts_at", "id").values(*model_fields(FreezeWindow))


# Every deployment request and every queue shown asks it: compiled once (core.compiled).
_FREEZE_WINDOWS = CompiledRead(_freeze_windows, (int,), (int,), dt.datetime, dt.datetime)


def _freeze_windows_of(environments, since: dt.datetime, until: dt.datetime) -> list[FreezeWindow]:
    """The freeze windows (one-off or recurring) that may touch [since, until) for these environments:
    their own and their applications'. One query."""
    environments = list(environments)
    if not environments:
        return []
    return _freeze_windows_read(environments, since, until).instances(FreezeWindow)


def _freeze_windows_read(environments: list[Environment], since: dt.datetime, until: dt.datetime) -> Pending:
    return _FREEZE_WINDOWS.later(sorted({e.pk for e in environments}), sorted({e.application_id for e in environments}),
                                 until, since - LONGEST_FREEZE)


def freeze_windows_at(environment: Environment, now: dt.datetime) -> Pending:
    """The read of the freeze windows that may hold `environment` at `now` (for active_freeze), to be
    run with others (core.compiled.together)."""
    return _freeze_windows_read([environment], now, now + dt.timedelta(microseconds=1))


def _applies_to(window: FreezeWindow, environment: Environment) -> bool:
    return window.environment_id == environment.pk or (
        window.environment_id is None and window.application_id == environment.application_id
    )


def active_freezes(environments, now: dt.datetime | None = None) -> dict[int, FreezeOccurrence]:
    """Per environment, the freeze that holds it now (the one that ends last), if any."""
    now = now or timezone.now()
    environments = list(environments)
    return freezes_holding(_freeze_windows_of(environments, now, now + dt.timedelta(microseconds=1)),
                           environments, now)


def freezes_holding(windows, environments, now: dt.datetime) -> dict[int, FreezeOccurrence]:
    """active_freezes from windows read already (those of freeze_windows_now, or more)."""
    active: dict[int, FreezeOccurrence] = {}
    for environment in environments:
        for window in windows:
            if _applies_to(window, environment) and (occurrence := window.active_at(now)) is not None:
                current = active.get(environment.pk)
                if current is None or occurrence.ends_at > current.ends_at:
                    active[environment.pk] = occurrence
    return active


def _application_freeze_windows(application, until, ending_after):
    return FreezeWindow.objects.filter(
        Q(environment__application__name=application) | Q(application__name=application, environment__isnull=True),
        starts_at__lt=until, ends_at__gt=ending_after,
    ).order_by("starts_at", "id").values(*model_fields(FreezeWindow))


_APPLICATION_FREEZE_WINDOWS = CompiledRead(_application_freeze_windows, str, dt.datetime, dt.datetime)


def freeze_windows_now(application: str, now: dt.datetime) -> Pending:
    """The read of the freeze windows that may hold the named application's environments at `now`
    (for freezes_holding), to be run with others (core.compiled.together)."""
    return _APPLICATION_FREEZE_WINDOWS.later(application, now + dt.timedelta(microseconds=1), now - LONGEST_FREEZE)


def active_freeze(environment: Environment, now: dt.datetime | None = None, windows: Pending | None = None
                  ) -> FreezeOccurrence | None:
    """The freeze that holds `environment` now, if any (`windows`: freeze_windows_at's read at `now`,
    when run already)."""
    now = now or timezone.now()
    windows = freeze_windows_at(environment, now) if windows is None else windows
    return freezes_holding(windows.instances(FreezeWindow), [environment], now).get(environment.pk)


def upcoming_freezes(environments, since: dt.datetime, until: dt.datetime) -> list[tuple]:
    """Every freeze period touching [since, until) for these environments, in time order:
    (environment, FreezeOccurrence) pairs."""
    environments = list(environments)
    windows = _freeze_windows_of(environments, since, until)
    found = [(environment, occurrence) for window in windows for occurrence in window.occurrences(since, until)
             for environment in environments if _applies_to(window, environment)]
    return sorted(found, key=lambda pair: (pair[1].starts_at, pair[0].pk))


FREEZE_WINDOW = "FREEZE_WINDOW"


def only_an_emergency_may_go(decision: Decision) -> bool:
    """Whether a refused request would be allowed as an emergency: a freeze is what refused it (rule 7)."""
    return decision.refusal is not None and decision.refusal.code == FREEZE_WINDOW


def freeze_sentence(environment: Environment, freeze: FreezeOccurrence) -> str:
    return (f"{environment} is frozen until {freeze.ends_at:%Y-%m-%d %H:%M} UTC ({freeze.reason}); "
            f"only an emergency deployment, requested with a stated reason by a releaser of {environment.name} "
            "(who holds its deploy right), can go now.")


def waiting_for_freeze(freeze: FreezeOccurrence) -> str:
    return f"frozen until {freeze.ends_at:%Y-%m-%d %H:%M} UTC ({freeze.reason})"


def check_no_freeze(environment: Environment, emergency: bool, now: dt.datetime | None = None,
                    windows: Pending | None = None) -> Refusal | None:
    if emergency:
        return None
    if (freeze := active_freeze(environment, now, windows)) is not None:
        return conflict(FREEZE_WINDOW, freeze_sentence(environment, freeze))
    return None


def _open_deployment(release_id, environment_id):
    return Deployment.objects.filter(
        release_id=release_id, environment_id=environment_id, state__in=Deployment.OPEN_STATES,
    ).order_by("-requested_at", "-id").values_list("id")[:1]


_OPEN_DEPLOYMENT = CompiledRead(_open_deployment, int, int)  # asked by every deployment request


def open_deployment_read(release: Release, environment: Environment) -> Pending:
    """check_not_already_open's read, to be run with others (core.compiled.together)."""
    return _OPEN_DEPLOYMENT.later(release.pk, environment.pk)


def check_not_already_open(release: Release, environment: Environment, read: Pending | None = None
                           ) -> Refusal | None:
    found = (open_deployment_read(release, environment) if read is None else read).tuples()
    if found:
        [(open_id,)] = found
        return Refusal("ALREADY_REQUESTED", f"{release} already has an open deployment to {environment.name} "
                       f"(#{open_id}).", 409, deployment_id=open_id)
    return None


def check_not_back_to_older(release: Release, environment: Environment) -> Refusal | None:
    """The portal promotes by itself only forward: a success of an older release (someone redeployed it to
    QA) does not take the next environment back from a newer one that runs there or is on its way there
    (running, queued, awaiting approval). A person may still ask."""
    newest = Deployment.objects.filter(
        Q(state__in=Deployment.OPEN_STATES) | Q(pk=Subquery(
            Deployment.objects.filter(environment=environment, state=Deployment.State.SUCCEEDED)
            .order_by("-finished_at", "-id").values("pk")[:1])),
        environment=environment, release_id__gt=release.pk,
    ).order_by("-release_id").values_list("release__version", "state").first()
    if newest is not None:
        where = "runs" if newest[1] in (Deployment.State.SUCCEEDED, Deployment.State.RUNNING) else "is taking"
        return conflict("NEWER_RELEASE_THERE", f"{environment} {where} {newest[0]}, registered after "
                        f"{release.version}: the portal does not take an environment back to an older release by "
                        "itself (a person may request it).")
    return None


def is_rollback(release_id: int, running_release_id: int | None) -> bool:
    """Whether deploying release `release_id` where `running_release_id` runs takes the environment back
    to an older release: one registered before the one it runs (what NEWER_RELEASE_THERE keeps the
    portal from doing by itself, and what pages and reports call a rollback)."""
    return running_release_id is not None and running_release_id > release_id


def check_not_expired(deployment: Deployment, now: dt.datetime | None = None) -> Refusal | None:
    """Rule 5: a request (and the approvals it gathered) is valid until it expires."""
    if deployment.expires_at is not None and deployment.expires_at <= (now or timezone.now()):
        return conflict("REQUEST_EXPIRED", f"Deployment request #{deployment.pk} has expired; request it again.")
    return None


# --- decisions ------------------------------------------------------------------------------------

# The separation-of-duties checks (rule 3), by the name a deployment records once it passed them.
REQUESTER_NOT_IMPLEMENTER = "requester_not_implementer"
APPROVER_NOT_IMPLEMENTER = "approver_not_implementer"
APPROVER_NOT_REQUESTER = "approver_not_requester"
APPROVER_DISTINCT = "approver_distinct"
REVIEWER_NOT_IMPLEMENTER = "reviewer_not_implementer"
REVIEWER_NOT_REQUESTER = "reviewer_not_requester"
SOD_CHECKS = {
    REQUESTER_NOT_IMPLEMENTER: "The requester did not implement the change.",
    APPROVER_NOT_IMPLEMENTER: "No one who approved or rejected it implemented the change.",
    APPROVER_NOT_REQUESTER: "No one who approved or rejected it requested the deployment.",
    APPROVER_DISTINCT: "Each approval or rejection came from a different person.",
    REVIEWER_NOT_IMPLEMENTER: "The reviewer did not implement the change.",
    REVIEWER_NOT_REQUESTER: "The reviewer did not request the emergency deployment.",
}
APPROVAL_CHECKS = (APPROVER_NOT_IMPLEMENTER, APPROVER_NOT_REQUESTER, APPROVER_DISTINCT)
REVIEW_CHECKS = (REVIEWER_NOT_IMPLEMENTER, REVIEWER_NOT_REQUESTER)


def required_sod_checks(*, restricted: bool, emergency: bool, reviewed: bool) -> set[str]:
    """The checks a production deployment must have passed to count as controlled (the reports ask this)."""
    if not restricted:
        return set()
    required = {REQUESTER_NOT_IMPLEMENTER} if emergency else {REQUESTER_NOT_IMPLEMENTER, *APPROVAL_CHECKS}
    if reviewed:
        required |= set(REVIEW_CHECKS)
    return required


def _as_decision(refusal: Refusal | None, next_step: str = Next.APPLY, checks: tuple[str, ...] = ()) -> Decision:
    return no(refusal) if refusal is not None else Decision(checks=checks, next=next_step)


def stated(reason: str) -> str:
    """A reason as given, stripped, or "" when it shows nothing (no letter, digit, punctuation or symbol
    that shows: only whitespace, invisible formatting, control, combining or private-use characters, or
    blank-looking ones): an emergency needs a reason a person can read (rule 7)."""
    shown = any(unicodedata.category(c)[0] in "LNPS" and c not in BLANK_LOOKING for c in reason)
    return reason.strip() if shown else ""


# Letters and symbols that show nothing: the braille blank and the Hangul fillers.
BLANK_LOOKING = frozenset("\u2800\u3164\uffa0\u115f\u1160")


def decide_request(
    *, actor: Actor, release: Release, environment: Environment, emergency_reason: str = "",
    automatic: bool = False,
) -> Decision:
    """May `actor` ask for `release` to go to `environment`? (rules 1-5, 7, 9). A busy environment is
    no reason to refuse: the deployment waits its turn (rule 6). A freeze refuses a request, except the
    portal's own `automatic` one, which nobody is there to ask again: it joins the queue and waits at
    its front until the freeze ends (rules 6 and 7: it never runs in the freeze). And an automatic
    promotion never takes an environment back to a release older than the one it runs (NEWER_RELEASE_THERE)."""
    emergency = bool(stated(emergency_reason))
    if r := check_token_scope(actor, environment.application) or check_ci_not_restricted(actor, environment):
        return no(r)
    if environment.application_id != release.application_id:
        return no(conflict("WRONG_APPLICATION", f"{environment} does not belong to {release.application}."))
    if r := check_build_gate(release.build):
        return no(r)
    grants = environment_grants(actor.user, environment) if actor.is_person else set()
    if r := check_may_request(actor, environment, grants):
        return no(r)
    if emergency and (not actor.is_person or DEPLOY not in grants):
        return no(forbidden(
            "EMERGENCY_NOT_RELEASER", f"Only a releaser of {environment} may request an emergency deployment."
        ))
    checks: tuple[str, ...] = ()
    if environment.restricted or environment.requires_code_review:  # the rules that ask who implemented it
        implementers = implementers_of(release)
        if environment.restricted:
            if r := check_implementers_recorded(release, environment, implementers):
                return no(r)
            if r := check_not_implementer(actor.user, implementers, "SOD_IMPLEMENTER_REQUESTER",
                                          "request production of"):
                return no(r)
            checks = (REQUESTER_NOT_IMPLEMENTER,)
        if r := check_code_review(release, environment, implementers):
            return no(r)
    # What the last three checks read, in one round trip.
    now = timezone.now()
    reads = source_read, open_read, windows_read = (
        promotion_source_read(release, environment), open_deployment_read(release, environment),
        None if automatic else freeze_windows_at(environment, now))
    together(*reads)
    source = promotion_source(release, environment, source_read)
    if r := check_promotion_path(release, environment, source):
        return no(r)
    if r := check_not_already_open(release, environment, open_read):
        return no(r)
    if automatic and environment.promotes_from_id and (r := check_not_back_to_older(release, environment)):
        return no(r)
    if r := check_no_freeze(environment, emergency or automatic, now, windows_read):
        return no(r)
    freeze = active_freeze(environment, now, windows_read) if emergency else None
    queue_now = emergency or environment.required_approvals == 0
    return Decision(checks=checks, next=Next.QUEUE if queue_now else Next.AWAIT_APPROVAL, promoted_from=source,
                    skips=f"a freeze: {waiting_for_freeze(freeze)}" if freeze else "")


def _check_open_for_decision(deployment: Deployment) -> Refusal | None:
    if deployment.state != Deployment.State.AWAITING_APPROVAL:
        return conflict(
            "NOT_AWAITING_APPROVAL",
            f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()}, not awaiting approval.",
        )
    return None


def approvals_given(deployment: Deployment) -> int:
    return sum(1 for a in deployment.approvals.all() if a.decision == "approve")


def decide_approval(*, actor: Actor, deployment: Deployment, approve: bool, grants: set[str] | None = None,
                    identities: set[str] | None = None) -> Decision:
    """May `actor` approve (or reject) `deployment`? (rules 3-5). The approval that reaches the
    environment's threshold queues the deployment, busy environment or not (rule 6).

    A listing of many decisions passes what it read once for the person: their `grants` on the
    deployment's environment (environment_grants) and their `identities` (person_identities)."""
    environment = deployment.environment
    if actor.is_ci:
        return no(forbidden("CI_TOKEN_RESTRICTED", "A CI token can never approve or reject deployments."))
    if r := _check_open_for_decision(deployment):
        return no(r)
    if r := check_not_expired(deployment):
        return no(r, next=Next.EXPIRE)
    if not actor.is_person:
        return no(forbidden("NOT_A_PERSON", "Only a person can approve or reject a deployment."))
    if grants is None:
        grants = environment_grants(actor.user, environment)
    if r := check_may_approve(actor, environment, grants):
        return no(r)
    role = "approve" if approve else "reject"
    implementers = implementers_of(deployment.release)
    if r := check_not_implementer(actor.user, implementers, "SOD_IMPLEMENTER_APPROVER", role, identities):
        return no(r)
    if deployment.requested_by_id == actor.user.pk:
        return no(forbidden("SOD_REQUESTER_APPROVER", f"You requested this deployment, so you may not {role} it."))
    if any(a.approver_id == actor.user.pk for a in deployment.approvals.all()):
        return no(forbidden(
            "SOD_DISTINCT_APPROVERS", "You have already decided on this deployment; each approval must come "
            "from a different person."
        ))
    if not approve:
        next_step = Next.END
    elif approvals_given(deployment) + 1 >= deployment.required_approvals:
        next_step = Next.QUEUE
    else:
        next_step = Next.AWAIT_APPROVAL
    return Decision(checks=APPROVAL_CHECKS, next=next_step)


def decide_start(deployment: Deployment, *, now: dt.datetime | None = None) -> Decision:
    """Rule 6: the front of an environment's queue starts when the environment is free, after the
    rules that depend on time are asked again: a freeze holds it (unless it is an emergency); an
    expired request, rights revoked meanwhile, or a release no longer on the promotion path refuse it."""
    now = now or timezone.now()
    environment = deployment.environment
    if r := check_not_expired(deployment, now):
        return no(r)
    requester = deployment.requested_by
    if requester is not None:
        grants = environment_grants(requester, environment)
        if not requester.is_active or (environment.restricted and DEPLOY not in grants):
            return no(forbidden(
                "NOT_RELEASER", f"{requester.get_username()} no longer holds the right to deploy to {environment}, "
                "so the deployment they requested cannot start.",
            ))
    if deployment.required_approvals and not deployment.emergency:  # an emergency skips the approval wait
        approvers = [a.approver for a in deployment.approvals.all() if a.decision == "approve"]
        valid = [a for a in approvers if APPROVE in environment_grants(a, environment)]
        if len(valid) < deployment.required_approvals:
            lost = sorted(a.get_username() for a in approvers if a not in valid)
            return no(forbidden(
                "NOT_RELEASER", f"The approval of {', '.join(lost) or 'an approver'} no longer counts: they no "
                f"longer hold the right to approve for {environment}.",
            ))
    reads = source_read, windows_read = (promotion_source_read(deployment.release, environment),
                                         None if deployment.emergency else freeze_windows_at(environment, now))
    together(*reads)
    if r := check_promotion_path(deployment.release, environment,
                                 promotion_source(deployment.release, environment, source_read)):
        return no(r)
    if not deployment.emergency and (freeze := active_freeze(environment, now, windows_read)) is not None:
        return Decision(next=Next.HOLD, waiting_for=waiting_for_freeze(freeze))
    return Decision(next=Next.START)


def token_revoked_refusal() -> Refusal:
    return forbidden("TOKEN_REVOKED",
                      "The API token that requested this deployment was revoked, so it will not start.")


def decide_finish(deployment: Deployment) -> Decision:
    """Only a running deployment gets a result."""
    if deployment.state != Deployment.State.RUNNING:
        return no(conflict(
            "NOT_RUNNING", f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()}, not running."
        ))
    return Decision(next=Next.END)


def decide_cancel(*, actor: Actor, deployment: Deployment) -> Decision:
    return _as_decision(_cancel_refusal(actor=actor, deployment=deployment), Next.END)


def _cancel_refusal(*, actor: Actor, deployment: Deployment) -> Refusal | None:
    environment = deployment.environment
    if r := check_token_scope(actor, environment.application) or check_ci_not_restricted(actor, environment):
        return r
    if deployment.state not in Deployment.OPEN_STATES:
        return conflict(
            "NOT_CANCELLABLE",
            f"Deployment #{deployment.pk} is {deployment.get_state_display().lower()} and can no longer be cancelled.",
        )
    if deployment.cancel_requested_at is not None:
        return conflict(
            "CANCEL_REQUESTED",
            f"Cancelling deployment #{deployment.pk} was asked for at {deployment.cancel_requested_at:%H:%M:%S} UTC; "
            "its playbook is being stopped.",
        )
    if actor.is_ci or actor.is_system:
        return None
    if deployment.requested_by_id == actor.user.pk:
        return None
    grants = environment_grants(actor.user, environment)
    if environment.restricted and DEPLOY not in grants:
        return forbidden("NOT_RELEASER", f"Only the requester or a releaser of {environment} may cancel this.")
    return check_may_request(actor, environment, grants)


def review_overdue(deployment_requested_at: dt.datetime, *, reviewed_at: dt.datetime | None = None,
                   now: dt.datetime | None = None) -> bool:
    """Rule 7: an emergency deployment is reviewed within PORTAL_REVIEW_DUE_DAYS days (default 5)."""
    due = deployment_requested_at + dt.timedelta(days=settings.PORTAL_REVIEW_DUE_DAYS)
    return (reviewed_at or now or timezone.now()) > due


def decide_review(*, actor: Actor, deployment: Deployment, grants: set[str] | None = None,
                  identities: set[str] | None = None) -> Decision:
    """Rule 7: an emergency deployment is reviewed afterwards by a different eligible person. A listing
    of many decisions passes what it read once for the person (see decide_approval)."""
    return _as_decision(_review_refusal(actor=actor, deployment=deployment, grants=grants, identities=identities),
                        Next.APPLY, REVIEW_CHECKS)


def possible_reviewers(release: Release, environment: Environment, requester_id: int | None) -> list[str]:
    """Who could review an emergency deployment of `release` to `environment` asked by `requester_id`
    (rule 7): the active holders of the approve permission there whom the review's own check would let
    review; their user names. Four queries, whatever the number of holders."""
    by_group, direct = grants_on(environment)
    holders = list(get_user_model().objects.filter(
        Q(groups__in=by_group.filter(permission__codename=APPROVE).values("group_id"))
        | Q(pk__in=direct.filter(permission__codename=APPROVE).values("user_id")), is_active=True,
    ).distinct().order_by("username"))
    implementers, identities = implementers_of(release), identities_of_users(user.pk for user in holders)
    return [user.get_username() for user in holders if _reviewer_refusal(
        Actor(user=user), release, environment, requester_id, grants={APPROVE}, identities=identities[user.pk],
        implementers=implementers) is None]


def _review_refusal(*, actor: Actor, deployment: Deployment, grants: set[str] | None = None,
                    identities: set[str] | None = None) -> Refusal | None:
    if not actor.is_person:
        return forbidden("NOT_A_PERSON", "Only a person can review an emergency deployment.")
    if not deployment.emergency:
        return conflict("NOT_EMERGENCY", f"Deployment #{deployment.pk} is not an emergency deployment.")
    if deployment.reviewed_at is not None:
        return conflict("ALREADY_REVIEWED", f"Deployment #{deployment.pk} has already been reviewed.")
    if deployment.state == Deployment.State.AWAITING_APPROVAL:
        return conflict("NOT_STARTED", "An emergency deployment is reviewed after it has been queued.")
    return _reviewer_refusal(actor, deployment.release, deployment.environment, deployment.requested_by_id,
                             grants, identities)


def _reviewer_refusal(actor: Actor, release: Release, environment: Environment, requester_id: int | None,
                      grants: set[str] | None = None, identities: set[str] | None = None,
                      implementers: Implementers | None = None) -> Refusal | None:
    """Rule 7's person: a releaser of the environment who neither implemented the release nor asked for
    its emergency deployment (asked of a deployment, and of who could review one not asked yet; the
    release's `implementers` and the person's `identities` when read already)."""
    if grants is None:
        grants = environment_grants(actor.user, environment)
    if r := check_may_approve(actor, environment, grants, doing="reviewing an emergency deployment"):
        return r
    if implementers is None:
        implementers = implementers_of(release)
    if r := check_not_implementer(actor.user, implementers, "SOD_IMPLEMENTER_REVIEWER", "review", identities):
        return r
    if requester_id == actor.user.pk:
        return forbidden("SOD_REQUESTER_REVIEWER", "You requested this emergency deployment; someone else must "
                          "review it.")
    return None


def accounts_made_by(actor: Actor) -> frozenset[int]:
    """The accounts a person made through the portal (their `user.create` events): one query."""
    if not actor.is_person:
        return frozenset()
    return frozenset(int(pk) for pk in AuditEvent.objects.filter(
        action="user.create", actor_id=actor.user.pk).values_list("object_id", flat=True))


def _account_maker_refusal(actor: Actor, user, made: frozenset[int] | None) -> Refusal | None:
    """Rule 4 against a second account: whoever made an account does not also give it rights (a flag, a
    permission, a group, a grant); another administrator does, so that no one person makes an account
    of their own and empowers it. `made`: accounts_made_by(actor), when the caller read it already."""
    if not actor.is_person or user is None or user.pk is None or user.pk == actor.user.pk:
        return None
    if user.pk not in (made if made is not None else accounts_made_by(actor)):
        return None
    return forbidden("SOD_ACCOUNT_MAKER", f"You made the account {user.get_username()}; another administrator "
                                          "must give it rights (a flag, a permission, a group or a grant).")


def _group_maker_refusal(actor: Actor, group: Group | None, made: frozenset[int] | None) -> Refusal | None:
    """A group's rights are its members' rights: giving more to a group holding an account one made is
    giving them to that account (another administrator does)."""
    if not actor.is_person or group is None:
        return None
    made = accounts_made_by(actor) if made is None else made
    member = group.user_set.filter(pk__in=made).first() if made else None
    if member is None:
        return None
    return forbidden("SOD_ACCOUNT_MAKER", f"{group.name} holds the account {member.get_username()}, which you "
                                          "made; another administrator must give the group rights.")


def decide_grant(*, actor: Actor, environment: Environment, user=None, group: Group | None = None,
                 grant: bool = True, made: frozenset[int] | None = None, belongs: bool | None = None) -> Decision:
    """Rule 4: only an administrator of environments grants, and never to themselves, their group or an
    account they made (revoking from an account one made is allowed). `made` (accounts_made_by) and
    `belongs` (whether the person is in `group`), when the caller read them already for many questions."""
    return _as_decision(_grant_refusal(actor=actor, user=user, group=group, grant=grant, made=made,
                                       belongs=belongs))


def _grant_refusal(*, actor: Actor, user=None, group: Group | None = None, grant: bool = True,
                   made: frozenset[int] | None = None, belongs: bool | None = None) -> Refusal | None:
    if not actor.is_system:
        if not actor.is_person or not actor.user.has_perm("environments.change_environment"):
            return forbidden("NOT_PERMITTED", "You may not change who can deploy or approve.")
        if user is not None and user.pk == actor.user.pk:
            return forbidden("SELF_GRANT", "Nobody can grant deploy or approve rights to themselves.")
        if group is not None and (belongs if belongs is not None else
                                  actor.user.groups.filter(pk=group.pk).exists()):
            return forbidden(
                "SELF_GRANT", f"You belong to {group.name}; nobody can grant rights to a group they belong to."
            )
        if grant and (refusal := _account_maker_refusal(actor, user, made) or _group_maker_refusal(actor, group, made)):
            return refusal
    return None


def decide_membership(*, actor: Actor, group: Group, user, add: bool = True,
                      made: frozenset[int] | None = None) -> Decision:
    """Rule 4 for groups: joining a group that holds deploy/approve grants is receiving those grants."""
    return _as_decision(_membership_refusal(actor=actor, group=group, user=user, add=add, made=made))


def _membership_refusal(*, actor: Actor, group: Group, user, add: bool, made: frozenset[int] | None = None
                        ) -> Refusal | None:
    if actor.is_system:
        return None
    if not actor.is_person or not actor.user.has_perm("auth.change_user"):
        return forbidden("NOT_PERMITTED", "You may not change group membership.")
    if add and user.pk == actor.user.pk:  # whatever the group holds now, or is given later
        return forbidden("SELF_GRANT", "Nobody can add themselves to a group; another administrator must do it.")
    if add:
        return _account_maker_refusal(actor, user, made) or _membership_beyond_own_rights(actor, group)
    return None


def _membership_beyond_own_rights(actor: Actor, group: Group) -> Refusal | None:
    """Joining a group is receiving its rights: whoever is not a superuser adds nobody to a group holding
    a permission they do not hold, or a grant on an environment unless they may grant themselves."""
    if actor.user.is_superuser:
        return None
    labels = [f"{app}.{codename}" for app, codename in group.permissions.values_list(
        "content_type__app_label", "codename")]
    if refusal := _beyond_own_rights(actor, labels):
        return refusal
    if GroupObjectPermission.objects.filter(group=group, permission__codename__in=GRANTABLE).exists() and \
            not actor.user.has_perm("environments.change_environment"):
        return forbidden("NOT_PERMITTED", f"{group.name} holds rights to deploy or approve; only someone who may "
                                          "grant them adds members to it.")
    return None


def decide_group_permissions(*, actor: Actor, group: Group, added: list[str],
                             made: frozenset[int] | None = None, belongs: bool | None = None) -> Decision:
    """Rule 4 for a group's model permissions: giving a group one belongs to more rights (such as the
    right to grant deploy and approve) is giving them to oneself. `made` (accounts_made_by) and `belongs`
    (whether the person is a member), when the caller read them already for many questions."""
    if actor.is_system:
        return Decision()
    if not actor.is_person or not actor.user.has_perm("auth.change_group"):
        return no(forbidden("NOT_PERMITTED", "You may not change a group's permissions."))
    if belongs is None:
        belongs = actor.user.groups.filter(pk=group.pk).exists()
    if added and belongs:
        return no(forbidden(
            "SELF_GRANT", f"You belong to {group.name}; nobody can give a group they belong to more rights "
            f"({', '.join(sorted(added))}); another administrator must do it.",
        ))
    if added and (refusal := _group_maker_refusal(actor, group, made)):
        return no(refusal)
    if refusal := _beyond_own_rights(actor, added):
        return no(refusal)
    return Decision()


def _beyond_own_rights(actor: Actor, given: list[str]) -> Refusal | None:
    """Whoever is not a superuser gives no right they do not hold themselves (a superuser flag, a model
    permission "app.codename"): an account or group administrator would otherwise raise anyone above
    themselves, a second account of their own included."""
    if not actor.is_person or actor.user.is_superuser:
        return None
    if "is_superuser" in given:
        return forbidden("NOT_PERMITTED", "Only a superuser may make a superuser.")
    if any("." in right and not actor.user.has_perm(right) for right in given):
        return forbidden("NOT_PERMITTED", "Only a superuser gives a right they do not hold themselves.")
    return None


def decide_account_change(*, actor: Actor, user, raised: list[str], made: frozenset[int] | None = None) -> Decision:
    """Rule 4 for accounts: nobody raises their own rights (superuser, staff, model permissions such as
    the right to grant deploy and approve), nor those of an account they made; another administrator
    does it for them, on record."""
    if raised and actor.is_person and actor.user.pk == user.pk:
        return no(forbidden(
            "SELF_GRANT", f"Nobody can raise their own rights ({', '.join(sorted(raised))}); another administrator "
            "must do it.",
        ))
    if raised and (refusal := _account_maker_refusal(actor, user, made) or _beyond_own_rights(actor, raised)):
        return no(refusal)
    if actor.is_person and user.is_superuser and not actor.user.is_superuser:
        # whoever sets a superuser's password or e-mail can become them
        return no(forbidden("NOT_PERMITTED", f"Only a superuser may change the account of {user.get_username()}, "
                                             "a superuser."))
    return Decision()


# --- the controls themselves: four eyes on a weaker control ---------------------------------------

# Fields of an environment whose change alters what runs or how strictly: any change to them on a
# restricted environment waits for a second administrator.
EXECUTABLE_SETTINGS = ("playbook", "playbook_repo", "playbook_ref", "inventory")


def _paths_of(application_id: int) -> dict[int, tuple[str, int | None, bool]]:
    """An application's environments as {pk: (name, promoted from, restricted)}: its promotion paths."""
    return {pk: (name, source, restricted) for pk, name, source, restricted in Environment.objects.filter(
        application_id=application_id).values_list("pk", "name", "promotes_from_id", "restricted")}


def _feeds_restricted(environment: Environment) -> bool:
    """Whether a restricted environment is promoted from this one, directly or further down its path."""
    below: dict[int | None, list[tuple[int, bool]]] = {}
    for pk, (_name, source, restricted) in _paths_of(environment.application_id).items():
        below.setdefault(source, []).append((pk, restricted))
    todo, seen = [environment.pk], set()
    while todo:
        for pk, restricted in below.get(todo.pop(), []):
            if restricted:
                return True
            if pk not in seen:
                seen.add(pk)
                todo.append(pk)
    return False


def promotion_path(application_id: int, source_id: int | None) -> list[str]:
    """The environments a release passes before it may come from `source_id`: its name, then its own
    source's, up to where the path starts ("(a cycle)" if it comes back). One query."""
    rows = _paths_of(application_id)
    path: list[str] = []
    while source_id is not None and source_id in rows:
        if len(path) > len(rows):
            return [*path, "(a cycle)"]
        name, source_id, _restricted = rows[source_id]
        path.append(name)
    return path


def _another_path(before: Environment, after: Environment) -> dict[str, list]:
    """Another promotion path: the source, and the whole path it leads to (by name), which the proposal
    is approved against (STALE_PROPOSAL if an environment on the new path changed its own meanwhile)."""
    return {"promotes_from": [before.promotes_from_id, after.promotes_from_id],
            "path": [promotion_path(before.application_id, before.promotes_from_id),
                     promotion_path(before.application_id, after.promotes_from_id)]}


def weakened_controls(before: Environment | None, after: Environment) -> dict[str, list]:
    """The changes in `after` that make a restricted environment less strict: {field: [from, to]}.
    Stricter changes are not listed; of a non-restricted environment, only another promotion path, and
    only where a restricted environment is promoted from it (Staging may not start taking releases that
    skipped QA on one administrator's say)."""
    if before is None:
        return {}
    if not before.restricted:
        if after.promotes_from_id != before.promotes_from_id and _feeds_restricted(before):
            return _another_path(before, after)
        return {}
    weaker = {}
    if not after.restricted:
        weaker["restricted"] = [True, False]
    if after.required_approvals < before.required_approvals:
        weaker["required_approvals"] = [before.required_approvals, after.required_approvals]
    if before.requires_code_review and not after.requires_code_review:
        weaker["requires_code_review"] = [True, False]
    if after.auto_deploy and not before.auto_deploy:
        weaker["auto_deploy"] = [False, True]
    if after.promotes_from_id != before.promotes_from_id:
        weaker.update(_another_path(before, after))
    if after.name != before.name:  # CI and people ask for it by name: another could take the name
        weaker["name"] = [before.name, after.name]
    for name in EXECUTABLE_SETTINGS:
        if getattr(after, name) != getattr(before, name):
            weaker[name] = [getattr(before, name), getattr(after, name)]
    return weaker


FREEZE_FIELDS = ("starts_at", "ends_at", "reason", "recurrence", "duration", "timezone", "environment_id",
                 "application_id")


def freeze_fields(window: FreezeWindow) -> dict:
    """A freeze window's settings as JSON-safe values (times in ISO 8601, durations in seconds)."""
    values = {}
    for name in FREEZE_FIELDS:
        value = getattr(window, name)
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, dt.timedelta):
            value = int(value.total_seconds())
        values[name] = value
    return values


def freeze_weakened(before: FreezeWindow, after: FreezeWindow | None = None, *,
                    now: dt.datetime | None = None) -> dict[str, list]:
    """Removing a freeze while it holds (after=None), or changing it so that it ends sooner now,
    weakens the control: {field: [from, to]} of what changes, or {} (stricter, or not running)."""
    now = now or timezone.now()
    running = before.active_at(now)
    if running is None:
        return {}
    if after is None:
        return {"removed": [True, True]}
    still = after.active_at(now)
    if still is not None and still.ends_at >= running.ends_at and _holds_all_of(after, before):
        return {}
    old, new = freeze_fields(before), freeze_fields(after)
    return {name: [old[name], new[name]] for name in FREEZE_FIELDS if old[name] != new[name]}


def _holds_all_of(after: FreezeWindow, before: FreezeWindow) -> bool:
    """Whether `after` freezes every environment `before` freezes (moving a freeze elsewhere lifts it)."""
    if after.environment_id is not None:
        return after.environment_id == before.environment_id
    if before.environment_id is None:
        return after.application_id == before.application_id
    return Environment.objects.filter(pk=before.environment_id, application_id=after.application_id).exists()


def check_may_administer(actor: Actor) -> Refusal | None:
    if not actor.is_person or not actor.user.has_perm("environments.change_environment"):
        return forbidden("NOT_PERMITTED", "You may not change the settings of environments.")
    return None


def decide_control_change(*, actor: Actor, change: ControlChange, current: dict, approve: bool = True) -> Decision:
    """A weaker control takes effect only when a different administrator approves it (or rejects it).
    `current` is the environment's (or freeze window's) value now, per field of the change: a proposal
    whose fields changed since is not applied, but it can still be rejected (nothing changes then)."""
    if r := check_may_administer(actor):
        return no(r)
    if change.state != ControlChange.State.PROPOSED:
        return no(conflict("NOT_PROPOSED", f"{change} is already {change.get_state_display().lower()}."))
    if change.proposed_by_id == actor.user.pk:
        return no(forbidden(
            "SOD_PROPOSER_APPROVER", "You proposed this change to a control, so a different administrator must "
            "decide on it."
        ))
    # each field must still be what it was when proposed; the path, still the one the proposal leads to
    stale = [name for name, (old, new) in change.changes.items()
             if name in current and current[name] != (new if name == "path" else old)]
    if stale and approve:
        return no(conflict(
            "STALE_PROPOSAL", f"{', '.join(sorted(stale))} changed since {change} was proposed; propose it again."
        ))
    return Decision(next=Next.END)


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


def decide_user_delete(*, actor: Actor, user) -> Decision:
    """A user who is part of the evidence is never deleted (the evidence would lose them, or the
    database refuses): they are deactivated instead."""
    return _as_decision(_user_delete_refusal(actor=actor, user=user))


def _user_delete_refusal(*, actor: Actor, user) -> Refusal | None:
    if not actor.is_system and not (actor.is_person and actor.user.has_perm("auth.delete_user")):
        return forbidden("NOT_PERMITTED", "You may not delete users.")
    if evidence := evidence_of(user):
        return conflict(
            "USER_IS_EVIDENCE",
            f"{user.get_username()} {' and '.join(evidence)}, so they are part of the evidence and cannot be "
            "deleted; deactivate the account instead (untick Active).",
        )
    return None
