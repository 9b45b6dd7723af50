"""The portal under test serves the test database, loaded with the demo.

This test also makes pytest-django set the test database up when the browser tests run alone
(`-m browser`): it sets up only the databases that the collected tests ask for with `db`."""

from releases.models import Application


def test_the_portal_serves_the_demo_from_the_test_database(portal, db):
    assert Application.objects.filter(name="MAC").exists()
