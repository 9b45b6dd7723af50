"""Everything that writes builds and releases. Each service is one transaction with its audit event."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils.dateparse import parse_datetime

from audit import chain
from audit.actors import Actor
from audit.models import AuditEvent
from audit.services import refused
from core import events
from core.compiled import CompiledRead, Pending, insert_new, model_fields, together
from environments import policy
from releases.models import Application, Build, BuildIssue, Implementer, Release, ReleaseIssue, VcsAlias
from releases.selectors import application_of, application_read


def _builds(application, number, *, lock: bool):
    # FOR NO KEY UPDATE: an update of a build never changes its key, and the foreign-key check of a
    # release cut from it (FOR KEY SHARE) need not wait for one.
    builds = Build.objects.select_for_update(of=("self",), no_key=True) if lock else Build.objects
    return builds.filter(application__name=application, number=number).order_by("-created_at").values(
        *model_fields(Build))[:1]


def _releases(application, version):
    return Release.objects.filter(application__name=application, version=version).order_by(
        "-registered_at", "-id").values(*model_fields(Release))[:1]


# Each registration locks its application and looks its build (and release) up, by name, in one
# round trip after the lock (core.compiled): compiled once.
_BUILD = {lock: CompiledRead(functools.partial(_builds, lock=lock), str, str) for lock in (False, True)}
_RELEASE = CompiledRead(_releases, str, str)


def _first(rows: list):
    return rows[0] if rows else None


@dataclass(frozen=True)
class TestCounts:
    __test__ = False  # a build's test counts, not a test class for pytest to collect

    passed: int = 0
    failed: int = 0
    skipped: int = 0


def build_register(
    *, actor: Actor | Callable[[], Actor], application: str, number: str, commit: str, branch: str, url: str = "",
    status: str, tests: TestCounts | None = TestCounts(), alongside: tuple[Pending, ...] = (),
) -> tuple[Build, bool]:
    """Register a CI build, or update one still in progress. Returns (build, created).

    A finished build never changes: the same report again is accepted, anything else refused. A report
    without test counts (`tests=None`) leaves a build's as they are (a new build's are 0). `actor` may
    be asked for once the first reads are in, with the reads `alongside` (the API's token lookup) in
    their round trip: before anything is written.
    """
    fields = {"commit": commit, "branch": branch, "url": url, "status": status}
    if tests is not None:
        fields.update(tests_passed=tests.passed, tests_failed=tests.failed, tests_skipped=tests.skipped)
    with transaction.atomic():
        # No lock on the application: registrations of its builds run side by side (CI registers one
        # for every commit of every branch). A new build is inserted unless the same number arrived
        # meanwhile; a build that is there (or arrived meanwhile) is read again, locked, so that two
        # updates of it run one after the other. Nothing is locked before the actor is known.
        app, existing = application_read(application), _BUILD[False].later(application, number)
        together(*alongside, app, existing)
        actor = actor() if callable(actor) else actor
        app = application_of(app, application)
        if refusal := policy.check_may_register(actor, app, "releases.add_build"):
            error = refused(actor=actor, action="build.register", refusal=refusal, obj=app, data={"number": number})
        else:
            if not existing.tuples():
                build = Build(application=app, number=number, **fields)
                keys = app.issue_keys_in(branch)  # the rows are append-only, and a build's branch never changes
                if insert_new(build, children=[BuildIssue(key=k) for k in keys]):
                    chain.append(actor=actor, action="build.register", obj=build,
                                 data={**fields, "number": number, "issue_keys": keys})
                    return build, True
            build = _BUILD[True].instances(Build, application, number)[0]
            # a commit hash in either case is the same commit
            changed = {k: v for k, v in fields.items()
                       if getattr(build, k) != v and not (k == "commit" and build.commit.lower() == v.lower())}
            if not changed:
                return build, False
            if refusal := policy.check_finished_build_unchanged(build, changed):
                error = refused(actor=actor, action="build.update", refusal=refusal, obj=build,
                                data={"attempted": changed})
            else:
                for k, v in changed.items():
                    setattr(build, k, v)
                build.save(update_fields=[*changed, "updated_at"])  # its status, URL or tests: never its branch
                chain.append(actor=actor, action="build.update", obj=build, data={"changed": changed})
                return build, False
    raise error


@dataclass(frozen=True)
class PullRequest:
    url: str
    author: str
    reviewers: tuple[str, ...] = ()
    approved_at: str | None = None  # ISO 8601


def _norm_identities(values) -> list[str]:
    return sorted({v.strip().lower() for v in values if v and v.strip()})


def _registration_digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def release_register(
    *, actor: Actor, application: str, version: str, build: str, artifact_url: str, artifact_sha256: str,
    issue_keys: list[str], implementers: list[str], pull_request: PullRequest | None = None,
) -> tuple[Release, bool]:
    """Register an immutable release cut from a successful build. Returns (release, created).

    The same registration again is accepted unchanged (CI retries); the same version with any other
    content is refused: a version names exactly one artifact.
    """
    identities = _norm_identities(implementers)
    keys = sorted({k.strip().upper() for k in issue_keys if k.strip()})
    payload = {
        "application": None, "version": version, "build": build, "artifact_url": artifact_url,
        "artifact_sha256": artifact_sha256.lower(), "issue_keys": keys, "implementers": identities,
        "pull_request": None if pull_request is None else {
            "url": pull_request.url, "author": pull_request.author.strip().lower(),
            "reviewers": _norm_identities(pull_request.reviewers), "approved_at": pull_request.approved_at,
        },
    }
    with transaction.atomic():
        # The application's row lock serializes registrations of its releases: a version that is not
        # there yet cannot be registered concurrently (a plain INSERT, no savepoint).
        reads = application_read(application, lock=True), _BUILD[False].later(application, build), _RELEASE.later(
            application, version), policy.identity_users_read(identities)
        together(*reads)  # the application's lock first, then its build, release and implementers' people
        app = application_of(reads[0], application)
        payload["application"] = app.name
        digest = _registration_digest(payload)
        the_build, existing = _first(reads[1].instances(Build)), _first(reads[2].instances(Release))
        differs = () if existing is None or existing.registration_digest == digest else _differs(existing, payload)
        refusal = policy.check_may_register(actor, app, "releases.add_release") or policy.check_release_registration(
            app, version, build, the_build, existing, digest, differs
        )
        if refusal is None and existing is not None:
            existing.application = app
            return existing, False  # the same registration again (a CI retry)
        if refusal is not None:
            error = refused(actor=actor, action="release.register", refusal=refusal, obj=app,
                            data={"version": version, "build": build})
        else:
            pr = payload["pull_request"] or {}
            release = Release.objects.create(
                application=app, version=version, build=the_build, artifact_url=artifact_url,
                artifact_sha256=payload["artifact_sha256"],
                pull_request_url=pr.get("url", ""), pull_request_author=pr.get("author", ""),
                pull_request_reviewers=pr.get("reviewers", []),
                pull_request_approved_at=parse_datetime(pr["approved_at"]) if pr.get("approved_at") else None,
                registration_digest=digest, registered_by=actor.label,
            )
            ReleaseIssue.objects.bulk_create(ReleaseIssue(release=release, key=k) for k in keys)
            users = policy.resolve_identity_users(identities, reads[3])
            Implementer.objects.bulk_create(
                Implementer(release=release, identity=i, user_id=users.get(i)) for i in identities
            )
            then = events.publish(events.RELEASE_REGISTERING, release=release)
            chain.append(actor=actor, action="release.register", obj=release, data=payload)
            for step in then:
                step()
            return release, True
    raise error


def _differs(existing: Release, payload: dict) -> tuple[str, ...]:
    """The fields in which a registration differs from the release's first one, as its audit event holds
    it (a conflict is rare: one read then); none when only the way it was written differs (the approval's
    time in another time zone)."""
    first = AuditEvent.objects.filter(action="release.register", object_type="releases.release",
                                      object_id=str(existing.pk)).values_list("data", flat=True).first() or {}

    def flat(data: dict) -> dict:
        pr = data.get("pull_request") or {}
        approved_at = parse_datetime(pr["approved_at"]) if pr.get("approved_at") else None
        return {**{k: v for k, v in data.items() if k != "pull_request"}, "pull_request": bool(pr),
                **{f"pull_request.{k}": v for k, v in pr.items()}, "pull_request.approved_at": approved_at}

    before, now = flat(first), flat(payload)
    # The event also holds who sent it (token, address): only what a registration says counts.
    return tuple(sorted(k for k in now.keys() if before.get(k) != now.get(k)))


APPLICATION_FIELDS = ("name", "issue_key_prefix", "issue_url_pattern", "description")


def application_save(*, actor: Actor, application: Application) -> Application:
    """Create or change an application; the chain records each changed field from and to."""
    with transaction.atomic():
        before = None if application._state.adding else Application.objects.select_for_update().get(pk=application.pk)
        application.full_clean()
        application.save()
        old = {} if before is None else {name: getattr(before, name) for name in APPLICATION_FIELDS}
        changed = {name: [old.get(name), getattr(application, name)] for name in APPLICATION_FIELDS
                   if before is None or old[name] != getattr(application, name)}
        chain.append(actor=actor, action="application.create" if before is None else "application.change",
                     obj=application, data={"changed": changed})
    return application


def vcs_alias_add(*, actor: Actor, user, identity: str) -> VcsAlias:
    """Link a VCS identity to a user, so separation of duties recognises them under it; never one that
    is someone's already (policy.decide_alias)."""
    identity = identity.strip().lower()
    with transaction.atomic():
        get_user_model().objects.select_for_update().get(pk=user.pk)
        decision = policy.decide_alias(user=user, identity=identity)
        if decision.allowed:
            alias = VcsAlias.objects.create(user=user, identity=identity)
            chain.append(actor=actor, action="vcs_alias.add", obj=alias,
                         data={"user": user.get_username(), "identity": alias.identity})
            return alias
        error = refused(actor=actor, action="vcs_alias.add", refusal=decision.refusal, obj=user,
                        data={"user": user.get_username(), "identity": identity})
    raise error
