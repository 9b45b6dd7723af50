"""django-auditlog wiring: which models keep field history, and how entries enter the chain.
Imported by AuditConfig.ready, once the apps are loaded.

auditlog writes its LogEntry rows from model signals; each new entry is copied into the hash
chain here (library wiring, not business logic). The business decisions themselves are written
to the chain explicitly by the services.
"""

from auditlog.models import LogEntry
from auditlog.registry import auditlog
from django.apps import apps
from django.db.models.signals import post_save

from audit import chain
from audit.actors import Actor

TRACKED = [
    ("releases.Application", {}),
    ("environments.Environment", {}),
    ("environments.FreezeWindow", {}),
    ("environments.NotificationChannel", {"mask_fields": ["credential"],
                                          "mask_callable": "audit.field_history.secret_state"}),
    ("auth.User", {"m2m_fields": {"groups"}, "exclude_fields": ["password", "last_login"]}),
    ("auth.Group", {"m2m_fields": {"permissions"}}),
    ("guardian.UserObjectPermission", {}),
    ("guardian.GroupObjectPermission", {}),
]


def secret_state(value: str) -> str:
    """How field history shows a secret: whether it is set, never a part of it (auditlog's own mask
    keeps the second half in clear). A change from one secret to another reads ("set", "set")."""
    return "not set" if value in ("", "None") else "set"


def _entry_to_chain(sender, instance, created, raw=False, **kwargs):
    if not created or raw:
        return
    actor = Actor.person(instance.actor, via="admin") if instance.actor_id else Actor.system()
    chain.append(
        actor=actor,
        action="field_history." + {0: "create", 1: "update", 2: "delete", 3: "access"}.get(instance.action, "other"),
        object_type=instance.content_type.app_label + "." + instance.content_type.model,
        object_id=str(instance.object_pk),
        object_repr=instance.object_repr,
        data={"logentry_id": instance.pk, "changes": instance.changes or {}},
    )


def wire() -> None:
    for label, options in TRACKED:
        model = apps.get_model(label)
        if not auditlog.contains(model):
            auditlog.register(model, **options)
    post_save.connect(_entry_to_chain, sender=LogEntry, dispatch_uid="audit.field_history")
