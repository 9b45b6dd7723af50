"""API tokens: created (shown once), checked, revoked. Creation and revocation are audited."""

from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from audit import chain
from audit.actors import Actor
from audit.services import audit_refusal
from environments import policy
from environments.policy import PolicyRefusal
from portal.models import ApiToken, hash_token
from releases.models import Application

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
    return token


def token_actor(raw: str, *, remote_addr: str = "") -> Actor | None:
    """The actor a bearer token stands for, or None if it is unknown, revoked or its user inactive."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .prefetch_related("applications")
        .filter(key_hash=hash_token(raw), revoked_at__isnull=True)
        .first()
    )
    if token is None:
        return None
    if token.kind == ApiToken.Kind.PERSONAL:
        if not token.user.is_active:
            return None
        return Actor(user=token.user, via="api", token_id=token.pk, token_name=token.name,
                     token_kind="personal", remote_addr=remote_addr)
    return Actor(via="api", token_id=token.pk, token_name=token.name, token_kind="ci",
                 token_applications=frozenset(a.pk for a in token.applications.all()), remote_addr=remote_addr)


def user_delete(*, actor: Actor, user) -> None:
    """Delete a user who is not part of the evidence (policy.decide_user_delete); otherwise refuse."""
    data = {"username": user.get_username(), "email": user.email}
    with transaction.atomic():
        user = get_user_model().objects.select_for_update().get(pk=user.pk)  # no new evidence meanwhile
        refusal = policy.decide_user_delete(actor=actor, user=user)
        if refusal is None:
            chain.append(actor=actor, action="user.delete", obj=user, data=data)
            user.delete()
            return
        audit_refusal(actor=actor, action="user.delete", refusal=refusal, obj=user, data=data)
    raise PolicyRefusal(refusal)
