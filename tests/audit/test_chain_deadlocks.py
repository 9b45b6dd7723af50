"""An append holds the chain's lock until its transaction commits, so a transaction holding it must
never wait for a row that another one holds while it waits for the chain. On PostgreSQL each test
holds a row as the other service would (locked, then the chain asked for), lets a service run into
it, and only then lets the holder ask for the chain: both must end well."""

import threading

import pytest
from auditlog.context import set_actor
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection, connections, transaction

from access.services import group_delete, group_rename
from audit import chain
from audit.models import AuditEvent
from tests.conftest import SYSTEM, person
from tests.releases.test_registration_concurrency import waiting_on_a_lock

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite runs one writer at a time"),
]


def holding_while(hold, service) -> dict:
    """hold() in a transaction; service() in another thread once hold() returned; once that one waits
    for a lock, the holder appends (asks for the chain) and commits. Each outcome: "ok" or the error."""
    held, go = threading.Event(), threading.Event()
    outcomes: dict = {}

    def holder():
        try:
            with transaction.atomic():
                hold()
                held.set()
                go.wait(30)
                chain.append(actor=SYSTEM, action="test.holder")
            outcomes["holder"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the outcome the test looks at
            outcomes["holder"] = exc
        finally:
            held.set()
            connections.close_all()

    def run_service():
        try:
            service()
            outcomes["service"] = "ok"
        except Exception as exc:  # noqa: BLE001
            outcomes["service"] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=holder), threading.Thread(target=run_service)]
    threads[0].start()
    assert held.wait(30)
    threads[1].start()
    try:
        waiting_on_a_lock(1)
    finally:
        go.set()
        for t in threads:
            t.join(60)
    return outcomes


def test_renaming_a_group_while_the_renamers_account_is_being_saved(transactional_audit_db, world):
    """The rename's field history points at the person renaming: their account is locked before the
    chain's lock, so the rename waits for the account's save instead of deadlocking with it."""
    group = Group.objects.create(name="team")
    admin = world.alice

    def rename():
        with set_actor(admin):  # as the admin's pages set it
            group_rename(actor=person(admin), group=group, name="team-2")

    outcomes = holding_while(lambda: get_user_model().objects.select_for_update().get(pk=admin.pk), rename)

    assert outcomes == {"holder": "ok", "service": "ok"}, outcomes
    assert Group.objects.get(pk=group.pk).name == "team-2"
    assert chain.verify().ok


def test_deleting_a_group_while_a_member_is_being_removed(transactional_audit_db, world):
    """The group's memberships are deleted before its event asks for the chain, so the delete waits
    for the removal instead of deadlocking with it."""
    group = Group.objects.create(name="leavers")
    world.bob.groups.add(group)
    membership = get_user_model().groups.through.objects.filter(user=world.bob, group=group)

    outcomes = holding_while(lambda: membership.delete(), lambda: group_delete(actor=person(world.alice), group=group))

    assert outcomes == {"holder": "ok", "service": "ok"}, outcomes
    assert not Group.objects.filter(pk=group.pk).exists()
    assert AuditEvent.objects.filter(action="group.delete", object_id=str(group.pk)).exists()
    assert chain.verify().ok
