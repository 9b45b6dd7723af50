"""Pieces the apps' routers share: bearer-token auth, input types that cannot reach a 500, and
the error bodies {"code", "detail"}.

Every rule an input type applies is in the OpenAPI document too: each pattern below is both the JSON
Schema `pattern` a client reads and the expression the API matches (as a full match, which is what
JSON Schema means), and each description says what the API does with the value.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from django.http import HttpRequest
from ninja.errors import AuthenticationError
from ninja.security import HttpBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from access.services import token_actor_of, token_lookup
from audit.actors import Actor
from core.compiled import Pending
from environments.policy import readable_applications

# Python's str.strip() removes exactly these (str.isspace()); written out so that every regular
# expression engine (the JSON Schema one of a client, Python's, Rust's) reads the same class.
SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Characters that show nothing (Unicode's format characters of the Basic Multilingual Plane: zero-width
# spaces and joiners, direction marks, the soft hyphen, the byte order mark): not in an identity.
INVISIBLE = r"\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
NO_NUL = r"^[^\x00]*$"
NOT_BLANK = rf"^[{SPACE}]*[^\x00{SPACE}][^\x00]*$"
TEXT_RULES = "Leading and trailing whitespace is stripped; NUL characters are refused."

# Dates a person or a CI server can mean: RFC 3339 with a time zone, years 2000 to 2099.
DAY = r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
DAY_RULES = "A day, YYYY-MM-DD, in the years 2000 to 2099."
DATE_TIME = (r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
             r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")
DATE_TIME_RULES = "RFC 3339 date-time with a time zone (Z or +hh:mm), in the years 2000 to 2099."


def matching(pattern: str, message: str):
    """A validator that refuses a value the pattern does not fully match."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(message)
        return value

    return AfterValidator(check)


def _strip(value: str) -> str:
    return value.strip()


def Text(max_length: int, min_length: int = 0, description: str = ""):  # noqa: N802 - reads as a type
    """A string of at most `max_length` characters as sent, without NUL, stripped of surrounding
    whitespace; with `min_length=1`, not blank."""
    if min_length not in (0, 1):
        raise ValueError("A longer minimum would hold only before stripping: use a pattern.")
    pattern, message = (NOT_BLANK, "must not be blank or contain NUL characters") if min_length else (
        NO_NUL, "must not contain NUL characters")
    rules = f"{description} {TEXT_RULES}{' Must not be blank.' if min_length else ''}".strip()
    return Annotated[
        str, StringConstraints(min_length=min_length, max_length=max_length), matching(pattern, message),
        AfterValidator(_strip), Field(description=rules, json_schema_extra={"pattern": pattern}),
    ]


def fits_lowercased(max_length: int):
    """Identities are stored lower-case; lower-casing can grow a string ('İ' becomes two characters)."""

    def check(value: str) -> str:
        if len(value.lower()) > max_length:
            raise ValueError(f"must be at most {max_length} characters once lower-cased")
        return value

    return AfterValidator(check)


# An identity is matched against people by its letters: none invisible, and no ';' (the reports join
# lists with it).
IDENTITY = rf"^[{SPACE}]*[^\x00;{INVISIBLE}{SPACE}][^\x00;{INVISIBLE}]*$"


def Identity(description: str):  # noqa: N802 - reads as a type
    """A VCS identity (e-mail address, login or name), compared and stored lower-case."""
    rules = (f"{description} Compared and stored lower-case; at most 254 characters once lower-cased. "
             f"{TEXT_RULES} Must not be blank; no ';' and no invisible formatting characters (zero-width "
             "spaces and joiners, direction marks).")
    return Annotated[
        str, StringConstraints(min_length=1, max_length=254),
        matching(IDENTITY, "must not be blank, nor contain NUL, ';' or invisible formatting characters"),
        AfterValidator(_strip), fits_lowercased(254), Field(description=rules, json_schema_extra={"pattern": IDENTITY}),
    ]


def _parse_date_time(value: str) -> dt.datetime:
    # in UTC: PostgreSQL refuses an offset beyond 15:59, which RFC 3339 allows
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


DateTime = Annotated[
    str, matching(DATE_TIME, "must be an " + DATE_TIME_RULES[:-1]),
    AfterValidator(_parse_date_time),
    Field(description=DATE_TIME_RULES, json_schema_extra={"format": "date-time", "pattern": DATE_TIME}),
]

Day = Annotated[
    str, matching(DAY, "must be a day, YYYY-MM-DD, in the years 2000 to 2099"), AfterValidator(dt.date.fromisoformat),
    Field(description=DAY_RULES, json_schema_extra={"format": "date", "pattern": DAY}),
]

Name = Text(100, 1)


def example(value) -> Field:
    """An example for the OpenAPI document (and the examples schemathesis sends first)."""
    return Field(json_schema_extra={"example": value})


ApplicationName = Annotated[Name, example("MAC")]
ObjectId = Annotated[int, Field(ge=1, le=2**63 - 1, description="A positive 64-bit integer.")]


def sent(*examples: dict) -> ConfigDict:
    """The model configuration of what a client sends: only the fields described (a misspelt one,
    "issueKeys", is refused by name, not dropped: a registration cannot be corrected once made), with
    the documentation's examples."""
    return ConfigDict(extra="forbid", **({"json_schema_extra": {"examples": list(examples)}} if examples else {}))


class Error(BaseModel):
    code: str = Field(description="Stable code of the rule or failure, e.g. NOT_RELEASER, INVALID, NOT_FOUND.")
    detail: str = Field(description="One sentence a person understands.")
    deployment_id: int | None = Field(None, description="ALREADY_REQUESTED: the open deployment of that release "
                                      "there (a retried request finds it here).")


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the field in the request, e.g. pull_request.approved_at.")
    message: str


class Invalid(Error):
    """422: INVALID (each invalid field in `errors`), or a rule about the content (e.g. UNKNOWN_BUILD)."""

    errors: list[FieldError] = Field(default_factory=list, description="Each invalid field and why.")


class BearerToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Bearer | None:
        lookup = token_lookup(token.lstrip(" "))  # `Bearer  <token>`: more than one space after the scheme
        return None if lookup is None else Bearer(lookup, remote_addr=request.META.get("REMOTE_ADDR", ""))


class Bearer:
    """What a request's bearer token stands for, looked up when first asked (actor_of, readable), or
    together with a view's own reads in one round trip (`lookup`, see core.compiled.together).

    A token that turns out unknown, revoked or of an inactive user is answered 401 whatever the view
    did: actor_of raises, and portal.api.JsonAnswersMiddleware replaces any answer to such a request
    (so a view that read before asking who is reading cannot show what it read). Every write goes
    through a service that takes actor_of(request), which asks first."""

    def __init__(self, lookup: Pending, *, remote_addr: str):
        self.lookup, self._remote_addr = lookup, remote_addr
        self._actor: Actor | None = None
        self._asked = False

    def actor(self) -> Actor | None:
        if not self._asked:
            self._actor, self._asked = token_actor_of(self.lookup, remote_addr=self._remote_addr), True
        return self._actor


def actor_of(request: HttpRequest) -> Actor:
    actor = request.auth.actor()
    if actor is None:
        raise AuthenticationError
    return actor


def unknown_bearer(request: HttpRequest) -> bool:
    """Whether the request came with a bearer token that stands for nobody (see Bearer)."""
    bearer = getattr(request, "auth", None)
    return isinstance(bearer, Bearer) and bearer.actor() is None


def readable(request: HttpRequest) -> frozenset[int] | None:
    """The application ids the caller may read (None: all); see policy.readable_applications."""
    return readable_applications(actor_of(request))


# Every operation may answer these (a refusal, or a request the API cannot read).
REFUSALS = {400: Error, 401: Error, 403: Error, 404: Error, 409: Error, 413: Error, 415: Error, 422: Invalid,
            503: Error}
