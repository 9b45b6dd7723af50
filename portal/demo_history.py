"""Some weeks of history for the demo, so the board, the metrics and the reports have something to show.

The services stamp everything they write with `django.utils.timezone.now()`: the requests, approvals,
results, the models' automatic times and the audit events. To make a past that looks lived, each step
runs inside `moved_time(moment)`, a context manager that makes that call answer `moment`, and goes
through the same services as everything else, so the audit chain records it and verifies. The audit
events keep their order of writing (their sequence numbers) with the moved times in them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from unittest import mock


@contextlib.contextmanager
def moved_time(moment: dt.datetime):
    """Within the block, `timezone.now()` answers `moment` (an aware datetime). For the demo and the
    tests only: nothing that serves requests moves the clock."""
    if moment.tzinfo is None:
        raise ValueError("moved_time needs an aware datetime")
    with mock.patch("django.utils.timezone.now", lambda: moment):
        yield moment
