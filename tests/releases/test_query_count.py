"""A change's journey costs a fixed number of queries, whatever its history."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from releases import selectors


def journey_queries(key):
    with CaptureQueriesContext(connection) as captured:
        change = selectors.change_detail(key)
    return len(captured), change


def test_change_detail_queries_do_not_grow_with_history(world):
    def history(key, size):
        for _ in range(size):
            world.build(branch=f"feature/{key}-work", status="failed")
            world.to_staging(world.release(issue_keys=[key], build=world.build(branch=f"feature/{key}-work")))

    history("BIZPLAT-100", 1)
    small, change = journey_queries("BIZPLAT-100")
    assert (len(change["builds"]), len(change["releases"])) == (2, 1)

    history("BIZPLAT-200", 8)
    large, change = journey_queries("BIZPLAT-200")
    assert (len(change["builds"]), len(change["releases"])) == (16, 8)
    assert {e["environment"] for e in change["environments_reached"]} == {"QA", "Staging"}
    assert large == small <= 15  # with where it is now: environments, what runs there, their queues
