"""API tokens (created and shown once, checked, revoked) and people's accounts (fields, flags,
passwords, permissions). Every change is audited with who made it, for whom, from what to what."""

from __future__ import annotations

import functools
import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.db import connection, transaction
from django.utils import timezone

from access.models import ApiToken, hash_token
from audit import chain
from audit.actors import Actor
from audit.services import refused
from core.compiled import Pending
from environments import policy
from environments.services import deployment_refuse_token_requests
from releases.models import Application
from releases.services import vcs_alias_add

TOKEN_PREFIX = "rp_"


def token_create(
    *, actor: Actor, kind: str, name: str, user=None, applications: list[Application] | None = None
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the raw secret, which is never stored nor shown again."""
    if kind == ApiToken.Kind.PERSONAL and user is None:
        raise ValueError("A personal token acts as a user: name the user.")
    if kind == ApiToken.Kind.CI and not applications:
        raise ValueError("A CI token is scoped to at least one application.")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            kind=kind, name=name, user=user if kind == ApiToken.Kind.PERSONAL else None,
            key_prefix=raw[:10], key_hash=hash_token(raw), created_by_label=actor.label,
        )
        if applications:
            token.applications.set(applications)
        chain.append(actor=actor, action="token.create", obj=token, data={
            "kind": kind, "name": name, "user": user.get_username() if user else None,
            "applications": sorted(a.name for a in applications or []), "key_prefix": token.key_prefix,
        })
    return token, raw


def token_revoke(*, actor: Actor, token: ApiToken) -> ApiToken:
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().get(pk=token.pk)
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            chain.append(actor=actor, action="token.revoke", obj=token, data={"key_prefix": token.key_prefix})
    deployment_refuse_token_requests(actor=actor, token_id=token.pk)
    return token


# What the API asks of the person behind a personal token: who they are (label, audit event, their
# identities for separation of duties) and the flags the permission checks read. Any other field is
# loaded only if something asks for it (never the password hash).
TOKEN_USER_FIELDS = ("id", "username", "email", "is_active", "is_staff", "is_superuser")


@functools.cache
def _token_lookup() -> tuple[str, list[str]]:
    """The statement token_actor runs, and the user's fields it reads (in the model's field order).

    Every API request runs it, so it is written once rather than compiled by the ORM each time (the
    compilation cost three times the query itself) and prepared once per database session
    (core.compiled.fetch): the token, its user's columns (NULL for a CI token) and one row per
    application it is scoped to, by LEFT JOINs on the unique key hash.
    """
    user_model = get_user_model()
    fields = [f for f in user_model._meta.concrete_fields if f.attname in TOKEN_USER_FIELDS]
    scope = ApiToken.applications.through._meta
    sql = (
        f"SELECT t.id, t.kind, t.name, s.application_id, {', '.join(f'u.{f.column}' for f in fields)}"
        f" FROM {ApiToken._meta.db_table} t"
        f" LEFT JOIN {scope.db_table} s ON s.apitoken_id = t.id"
        f" LEFT JOIN {user_model._meta.db_table} u ON u.{user_model._meta.pk.column} = t.user_id"
        " WHERE t.key_hash = %s AND t.revoked_at IS NULL"
    )
    return sql, [f.attname for f in fields]


def token_actor(raw: str, *, remote_addr: str = "") -> Actor | None:
    """The actor a bearer token stands for, or None if it is unknown, revoked or its user inactive."""
    lookup = token_lookup(raw)
    return None if lookup is None else token_actor_of(lookup, remote_addr=remote_addr)


def token_lookup(raw: str) -> Pending | None:
    """The read that finds a bearer token (None for what cannot be one), to be run alone or with
    other reads in one round trip (core.compiled.together); token_actor_of answers from it."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    sql, _ = _token_lookup()
    return Pending.of_sql(sql, [hash_token(raw)])


def token_actor_of(lookup: Pending, *, remote_addr: str = "") -> Actor | None:
    rows = lookup.tuples()
    if not rows:
        return None
    _, user_fields = _token_lookup()
    token_id, kind, name, _, *user_values = rows[0]
    if kind == ApiToken.Kind.PERSONAL:
        user = get_user_model().from_db(connection.alias, user_fields, [
            bool(value) if field.startswith("is_") else value  # SQLite answers 0 or 1
            for field, value in zip(user_fields, user_values, strict=True)
        ])  # its other fields deferred
        if not user.is_active:
            return None
        return Actor(user=user, via="api", token_id=token_id, token_name=name, token_kind="personal",
                     remote_addr=remote_addr)
    return Actor(via="api", token_id=token_id, token_name=name, token_kind="ci",
                 token_applications=frozenset(r[3] for r in rows if r[3] is not None), remote_addr=remote_addr)


# --- people's accounts -----------------------------------------------------------------------------
# An administrator who can set someone's password, re-activate an account or make it staff or
# superuser can act as that person: each such change is an audit event naming both people, and the
# access report lists them. Group membership goes through environments.services.group_membership_change.

ACCOUNT_FLAGS = ("is_active", "is_staff", "is_superuser")


def _account_fields(user) -> list[str]:
    """The fields an administrator edits on the account form (never the password hash)."""
    return [f.attname for f in user._meta.concrete_fields if not f.primary_key and f.attname != "password"]


def _is_someone_else(actor: Actor, user) -> bool:
    return actor.user is None or actor.user.pk != user.pk


def user_save(*, actor: Actor, user):
    """Create an account, or save the changes an administrator made to one (user name, e-mail, names,
    active / staff / superuser flags, dates); the event holds each changed field from what to what."""
    with transaction.atomic():
        if user._state.adding:
            user.save()
            chain.append(actor=actor, action="user.create", obj=user, data={
                "user": user.get_username(), "usable_password": user.has_usable_password(),
                **{flag: getattr(user, flag) for flag in ACCOUNT_FLAGS},
            })
            return user
        before = get_user_model().objects.select_for_update().get(pk=user.pk)
        changed = {
            name: {"from": getattr(before, name), "to": getattr(user, name)}
            for name in _account_fields(user) if getattr(before, name) != getattr(user, name)
        }
        raised = [flag for flag in ("is_staff", "is_superuser") if getattr(user, flag) and not getattr(before, flag)]
        decision = policy.decide_account_change(actor=actor, user=before, raised=raised)
        if not decision.allowed:
            error = refused(actor=actor, action="user.change", refusal=decision.refusal, obj=before,
                            data={"user": before.get_username(), "attempted": changed})
        else:
            if changed:
                user.save(update_fields=list(changed))
                chain.append(actor=actor, action="user.change", obj=user, data={
                    "user": before.get_username(), "changed": changed,
                    "by_another_person": _is_someone_else(actor, user),
                })
                _keep_old_identities(actor, before, user)
            return user
    for flag in raised:  # the caller's object keeps what the database has
        setattr(user, flag, False)
    raise error


def _keep_old_identities(actor: Actor, before, user) -> None:
    """Whoever implemented a change under their old user name or e-mail still did: each old identity
    stays theirs as a VCS alias (unless it is someone's already: policy.decide_alias), so that a new
    e-mail does not take a person out of separation of duties (the alias's own event is in the chain)."""
    now = {user.get_username().strip().lower(), (user.email or "").strip().lower()}
    for old in (before.get_username(), before.email or ""):
        identity = old.strip().lower()
        if identity and identity not in now and policy.decide_alias(user=user, identity=identity).allowed:
            vcs_alias_add(actor=actor, user=user, identity=identity)


def user_set_password(*, actor: Actor, user, password: str | None):
    """Set someone's password (None: password sign-in switched off). Whoever sets another person's
    password can sign in as them: the event says who did it for whom, never the hash; and only a
    superuser sets a superuser's (policy.decide_account_change)."""
    with transaction.atomic():
        locked = get_user_model().objects.select_for_update().get(pk=user.pk)
        decision = policy.decide_account_change(actor=actor, user=locked, raised=[])
        if decision.allowed:
            had_usable = locked.has_usable_password()
            if password is None:
                locked.set_unusable_password()
            else:
                locked.set_password(password)
            locked.save(update_fields=["password"])
            chain.append(actor=actor, action="user.set_password", obj=locked, data={
                "user": locked.get_username(), "usable_password": {"from": had_usable, "to": password is not None},
                "by_another_person": _is_someone_else(actor, locked),
            })
            user.password = locked.password
            return locked
        error = refused(actor=actor, action="user.set_password", refusal=decision.refusal, obj=locked,
                        data={"user": locked.get_username()})
    raise error


def _permission_label(permission: Permission) -> str:
    return f"{permission.content_type.app_label}.{permission.codename}"


def user_permissions_change(*, actor: Actor, user, permissions) -> None:
    """Give a user exactly these model permissions; the event lists what was added and removed."""
    with transaction.atomic():
        get_user_model().objects.select_for_update().get(pk=user.pk)
        current = set(user.user_permissions.select_related("content_type"))
        wanted = set(Permission.objects.filter(pk__in=[p.pk for p in permissions]).select_related("content_type"))
        added, removed = wanted - current, current - wanted
        if not (added or removed):
            return
        decision = policy.decide_account_change(actor=actor, user=user,
                                                raised=sorted(map(_permission_label, added)))
        if not decision.allowed:
            error = refused(actor=actor, action="user.permissions", refusal=decision.refusal, obj=user,
                            data={"user": user.get_username(), "attempted": sorted(map(_permission_label, added))})
        else:
            _apply_permissions(actor, user, added, removed)
            return
    raise error


def group_permissions_change(*, actor: Actor, group: Group, permissions) -> None:
    """Give a group exactly these model permissions (policy.decide_group_permissions: nobody gives a
    group they belong to more rights); the event lists what was added and removed."""
    with transaction.atomic():
        group = Group.objects.select_for_update().get(pk=group.pk)
        current = set(group.permissions.select_related("content_type"))
        wanted = set(Permission.objects.filter(pk__in=[p.pk for p in permissions]).select_related("content_type"))
        added, removed = sorted(map(_permission_label, wanted - current)), sorted(
            map(_permission_label, current - wanted))
        if not (added or removed):
            return
        data = {"group": group.name, "added": added, "removed": removed}
        decision = policy.decide_group_permissions(actor=actor, group=group, added=added)
        if decision.allowed:
            group.permissions.add(*(wanted - current))
            group.permissions.remove(*(current - wanted))
            chain.append(actor=actor, action="group.permissions", obj=group, data=data)
            return
        error = refused(actor=actor, action="group.permissions", refusal=decision.refusal, obj=group, data=data)
    raise error


def group_rename(*, actor: Actor, group: Group, name: str) -> None:
    """Rename a group. Its grants' and memberships' audit events name it as it was called then: the
    rename links the two names (see evidence.reconcile)."""
    with transaction.atomic():
        locked = Group.objects.select_for_update().get(pk=group.pk)
        if locked.name == name:
            return
        chain.append(actor=actor, action="group.rename", obj=locked,
                     data={"group": name, "from": locked.name, "to": name})
        locked.name = group.name = name
        locked.save(update_fields=["name"])


def group_delete(*, actor: Actor, group: Group) -> None:
    """Delete a group; the event says who lost what with it (its members, its model permissions and its
    grants on environments), which the group's name alone would not tell an auditor."""
    with transaction.atomic():
        group = Group.objects.select_for_update().get(pk=group.pk)
        data = {
            "group": group.name,
            "members": sorted(group.user_set.values_list("username", flat=True)),
            "permissions": sorted(map(_permission_label, group.permissions.select_related("content_type"))),
            "environment_grants": policy.group_environment_grants(group),
        }
        about = chain.naming(group)
        group.delete()  # before the event: the rows it deletes are locked before the chain's lock
        chain.append(actor=actor, action="group.delete", **about, data=data)


def _apply_permissions(actor: Actor, user, added, removed) -> None:
    user.user_permissions.add(*added)
    user.user_permissions.remove(*removed)
    chain.append(actor=actor, action="user.permissions", obj=user, data={
        "user": user.get_username(), "added": sorted(map(_permission_label, added)),
        "removed": sorted(map(_permission_label, removed)), "by_another_person": _is_someone_else(actor, user),
    })


def user_delete(*, actor: Actor, user) -> None:
    """Delete a user who is not part of the evidence (policy.decide_user_delete); otherwise refuse."""
    data = {"username": user.get_username(), "email": user.email}
    with transaction.atomic():
        user = get_user_model().objects.select_for_update().get(pk=user.pk)  # no new evidence meanwhile
        decision = policy.decide_user_delete(actor=actor, user=user)
        if decision.allowed:
            about = chain.naming(user)
            user.delete()  # before the event: the rows it deletes are locked before the chain's lock
            chain.append(actor=actor, action="user.delete", **about, data=data)
            return
        error = refused(actor=actor, action="user.delete", refusal=decision.refusal, obj=user, data=data)
    raise error
