"""PostgreSQL's times read by psycopg's C loader.

Django 5.2 reads every `timestamptz` through a loader of its own, derived from psycopg's pure-Python
one so that it can set the time zone it wants on the result (Django ticket #36960): where psycopg's C
extension is installed, each time is still parsed in Python, with a regular expression, at about
3 microseconds a value against 0.2 for the C loader. A release's API answer holds some forty times,
a page of the deployments list some four hundred, a report one per row and time column.

Django makes each connection's session time zone the one it wants (`_configure_timezone`, before
`connection_created`), so psycopg's loader, which takes the session's time zone, gives the same
aware datetime. `use_c_loader` registers it on each PostgreSQL connection Django opens, with the
`timezone` attribute Django's cursor() compares with the connection's (equal, so Django does not put
its own loader back on every cursor). Where the session's zone is not the one Django wants, or
USE_TZ is off (naive times), Django's loader stays.
"""

from __future__ import annotations

import functools

from django.conf import settings
from psycopg import adapters, pq
from psycopg.adapt import Loader

TIMESTAMPTZ = adapters.types["timestamptz"].oid
# psycopg's own registry maps its Python loader to the C one when the extension is installed.
_PSYCOPG_LOADER = adapters.get_loader(TIMESTAMPTZ, pq.Format.TEXT)


@functools.cache
def loader_for(timezone) -> type[Loader]:
    """A loader class that reads as psycopg's (C where installed) and tells Django its time zone."""

    class TimestamptzLoader(Loader):
        def __init__(self, oid, context=None):
            super().__init__(oid, context)
            self.load = _PSYCOPG_LOADER(oid, context).load  # the C method itself: no Python frame per value

        def load(self, data):  # the abstract method, replaced on each instance by the one above
            raise NotImplementedError

    TimestamptzLoader.timezone = timezone  # what Django's cursor() compares with the connection's
    return TimestamptzLoader


def use_c_loader(sender=None, connection=None, **kwargs) -> None:
    """For the `connection_created` signal: psycopg's loader for `timestamptz` on a PostgreSQL
    connection whose session time zone is the one Django wants (see the module's docstring)."""
    if connection.vendor != "postgresql" or not settings.USE_TZ or connection.timezone_name is None:
        return
    raw = connection.connection
    if not hasattr(raw, "adapters") or raw.info.parameter_status("TimeZone") != connection.timezone_name:
        return  # psycopg2 (no adapters map), or a session in another zone
    raw.adapters.register_loader(TIMESTAMPTZ, loader_for(connection.timezone))
