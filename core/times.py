"""How the portal writes a moment: UTC, ISO 8601, microseconds, "Z" (the audit chain hashes this form)."""

from __future__ import annotations

import datetime as dt


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso_or_none(moment: dt.datetime | None) -> str | None:
    return iso(moment) if moment else None


# The days a person or a CI server can mean (forms, commands and the API refuse others, so that a
# period's arithmetic never leaves what the database and Python can hold).
FIRST_DAY, LAST_DAY = dt.date(2000, 1, 1), dt.date(2099, 12, 31)
