"""An append holds the chain's lock until its transaction commits, so a transaction holding it must
never wait for a row that another one holds while it waits for the chain. On PostgreSQL each test
holds a row as the other service would (locked, then the chain asked for), lets a service run into
it, and only then lets the holder ask for the chain: both must end well."""

import pytest
from auditlog.context import set_actor
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client
from django.urls import reverse

from access.services import group_delete, group_rename
from audit import chain
from audit.models import AuditEvent
from tests.concurrency import held_open_while_another_waits
from tests.conftest import SYSTEM, person

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite runs one writer at a time"),
]


def holding_while(hold, service) -> tuple:
    """hold() in a transaction; service() in another thread; once that one waits for a lock, the holder
    asks for the chain (an append) and commits. Both outcomes: a value, or the exception raised."""
    return held_open_while_another_waits(hold, service, then=lambda: chain.append(actor=SYSTEM, action="test.holder"))


def ended_well(outcomes: tuple) -> bool:
    return not any(isinstance(outcome, Exception) for outcome in outcomes)


def test_renaming_a_group_while_the_renamers_account_is_being_saved(transactional_audit_db, world):
    """The rename's field history points at the person renaming: their account is locked before the
    chain's lock, so the rename waits for the account's save instead of deadlocking with it."""
    group = Group.objects.create(name="team")
    admin = world.alice

    def rename():
        with set_actor(admin):  # as the admin's pages set it
            group_rename(actor=person(admin), group=group, name="team-2")

    outcomes = holding_while(lambda: get_user_model().objects.select_for_update().get(pk=admin.pk), rename)

    assert ended_well(outcomes), outcomes
    assert Group.objects.get(pk=group.pk).name == "team-2"
    assert chain.verify().ok


def test_deleting_a_group_while_a_member_is_being_removed(transactional_audit_db, world):
    """The group's memberships are deleted before its event asks for the chain, so the delete waits
    for the removal instead of deadlocking with it."""
    group = Group.objects.create(name="leavers")
    world.bob.groups.add(group)
    membership = get_user_model().groups.through.objects.filter(user=world.bob, group=group)

    outcomes = holding_while(lambda: membership.delete(), lambda: group_delete(actor=person(world.alice), group=group))

    assert ended_well(outcomes), outcomes
    assert not Group.objects.filter(pk=group.pk).exists()
    assert AuditEvent.objects.filter(action="group.delete", object_id=str(group.pk)).exists()
    assert chain.verify().ok


def test_an_account_form_adding_a_group_while_the_groups_permissions_change(transactional_audit_db, world,
                                                                              make_user):
    """The account's page saves the account, then each membership, each a transaction of its own: the
    membership waits for the group's change (which holds the group and asks for the chain), not the
    other way round under the account's chain lock."""
    root = make_user("root", superuser=True)
    group = Group.objects.create(name="auditors")
    client = Client()
    client.force_login(root)

    def submit():
        return client.post(reverse("admin:auth_user_change", args=[world.dave.pk]), {
            "username": "dave", "first_name": "Dave", "email": "dave@example.com", "is_active": "on",
            "is_staff": "on", "groups": [group.pk], "last_login_0": "", "last_login_1": "",
            "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00"}).status_code

    outcomes = holding_while(lambda: Group.objects.select_for_update().get(pk=group.pk), submit)

    assert ended_well(outcomes) and outcomes[1] == 302, outcomes
    assert get_user_model().objects.get(pk=world.dave.pk).groups.filter(pk=group.pk).exists()
    assert get_user_model().objects.get(pk=world.dave.pk).first_name == "Dave"
    assert chain.verify().ok
