"""How the portal writes a moment: UTC, ISO 8601, microseconds, "Z" (the audit chain hashes this form)."""

from __future__ import annotations

import datetime as dt


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def iso_or_none(moment: dt.datetime | None) -> str | None:
    return iso(moment) if moment else None
