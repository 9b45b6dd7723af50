from audit import chain
from audit.actors import Actor
from audit.models import AuditEvent
from core.decisions import PolicyRefusal, Refusal


def audit_refusal(*, actor: Actor, action: str, refusal, obj=None, data: dict | None = None) -> AuditEvent:
    """Record a refused attempt: the rule's code and sentence, in the caller's transaction."""
    return chain.append(
        actor=actor,
        action=action + ".refused",
        obj=obj,
        code=refusal.code,
        data={**(data or {}), "detail": refusal.detail},
    )


def refused(*, actor: Actor, action: str, refusal: Refusal, obj=None, data: dict | None = None) -> PolicyRefusal:
    """The one ending of a refused service: the refusal is written in the caller's transaction, and the
    exception returned is raised once that transaction has committed (so the refusal stays on record):

        with transaction.atomic():
            ...
            error = refused(actor=actor, action="deployment.cancel", refusal=decision.refusal, obj=deployment)
        raise error
    """
    audit_refusal(actor=actor, action=action, refusal=refusal, obj=obj, data=data)
    return PolicyRefusal(refusal)
