"""Pieces the apps' routers share: bearer-token auth, input types that cannot reach a 500, and
the error body {"code", "detail"}."""

from __future__ import annotations

from typing import Annotated

from django.http import HttpRequest
from ninja import Schema
from ninja.security import HttpBearer
from pydantic import AfterValidator, StringConstraints

from audit.actors import Actor
from environments.policy import readable_applications
from portal.services import token_actor


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def Text(max_length: int, min_length: int = 0):  # noqa: N802 - reads as a type
    return Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=min_length, max_length=max_length),
        AfterValidator(_no_nul),
    ]


Name = Text(100, 1)


class Error(Schema):
    code: str
    detail: str


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Actor | None:
        return token_actor(token, remote_addr=request.META.get("REMOTE_ADDR", ""))


def actor_of(request: HttpRequest) -> Actor:
    return request.auth


def readable(request: HttpRequest) -> frozenset[int] | None:
    """The application ids the caller may read (None: all); see policy.readable_applications."""
    return readable_applications(actor_of(request))


REFUSALS = {401: Error, 403: Error, 404: Error, 409: Error, 422: Error}
