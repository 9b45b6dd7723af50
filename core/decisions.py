"""The one shape in which the rules answer, and the exceptions that carry a "no" to the edges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """A rule said no: a stable code, one sentence a person understands, and the HTTP status the API
    answers with (403: who you are; 409: the state of things; 422: what was sent)."""

    code: str
    detail: str
    status: int = 409
    deployment_id: int | None = None  # the deployment the refusal is about, where it is another one

    def as_dict(self) -> dict:
        answer = {"code": self.code, "detail": self.detail}
        if self.deployment_id is not None:
            answer["deployment_id"] = self.deployment_id
        return answer


def forbidden(code: str, detail: str) -> Refusal:
    return Refusal(code, detail, 403)


def conflict(code: str, detail: str) -> Refusal:
    return Refusal(code, detail, 409)


class Next:
    """What happens after a decision."""

    QUEUE = "queue"  # joins the environment's queue (starts at once when the environment is free)
    AWAIT_APPROVAL = "await_approval"  # waits for more approvals
    APPLY = "apply"  # the change is made
    END = "end"  # the decision ends it (a rejection)
    EXPIRE = "expire"  # refused because the request expired: it ends
    START = "start"  # the front of the queue may start now
    HOLD = "hold"  # stays in the queue (a freeze): asked again later


@dataclass(frozen=True)
class Decision:
    """Every answer of the policy: a refusal or nothing, the separation-of-duties checks that were made
    and passed, and what happens next."""

    refusal: Refusal | None = None
    checks: tuple[str, ...] = ()
    next: str = Next.APPLY
    waiting_for: str = ""  # why it holds, in a sentence
    promoted_from: Any = None  # the deployment that opened the promotion path (requests)
    skips: str = ""  # what an emergency request goes past that would have held it (a freeze), in a sentence

    @property
    def allowed(self) -> bool:
        return self.refusal is None


def no(refusal: Refusal, *, next: str = "") -> Decision:  # noqa: A002 - the field's name
    return Decision(refusal=refusal, next=next)


ALLOWED = Decision()


class PolicyRefusal(Exception):
    """Raised by a service when the policy refuses; the refusal is already in the audit chain."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.detail)
        self.refusal = refusal


class NotFound(Exception):
    """A selector or service found no such row; the edges answer 404 with this sentence."""
