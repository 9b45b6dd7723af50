from audit import chain
from audit.actors import Actor
from audit.models import AuditEvent


def audit_refusal(*, actor: Actor, action: str, refusal, obj=None, data: dict | None = None) -> AuditEvent:
    """Record a refused attempt: the rule's code and sentence, in the caller's transaction."""
    return chain.append(
        actor=actor,
        action=action + ".refused",
        obj=obj,
        code=refusal.code,
        data={**(data or {}), "detail": refusal.detail},
    )
