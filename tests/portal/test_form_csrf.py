"""The pages that save through several services (edge.admin.OutcomeAdmin) still ask for the CSRF
token on every submission: they run without Django's transaction around the form, not without its
protection."""

import pytest
from django.test import Client
from django.urls import reverse


@pytest.mark.parametrize("page", ["auth_user", "auth_group", "environments_environment"])
def test_a_change_form_without_its_csrf_token_is_refused(world, make_user, page):
    root = make_user("root", superuser=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(root)
    target = {"auth_user": world.dave, "auth_group": world.releasers, "environments_environment": world.qa}[page]

    response = client.post(reverse(f"admin:{page}_change", args=[target.pk]), {"name": "renamed"})

    assert response.status_code == 403
    target.refresh_from_db()
    assert getattr(target, "name", None) != "renamed"
