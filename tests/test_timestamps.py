"""core.timestamps: on PostgreSQL the portal reads times with psycopg's loader (its C one where the
extension is installed), and reads exactly the moments Django's own loader reads."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db import connection
from django.db.backends.postgresql.psycopg_any import BaseTzLoader, register_tzloader
from django.db.models import DateTimeField, Value

from core import timestamps
from releases.models import Application

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite's times are text Django parses itself"),
]

MOMENTS = ("0001-01-01 00:00:00+00", "1969-12-31 23:59:59.5+00", "1970-01-01 00:00:00+00",
           "2026-03-29 01:30:00.000001+00", "2026-10-25 00:59:59.999999+00", "2026-11-30 14:05:00+05:30",
           "2026-11-30 14:05:00-09:30", "9999-12-31 23:59:59.999999+00")
SELECT = "SELECT " + ", ".join(f"'{moment}'::timestamptz" for moment in MOMENTS)


def _loader():
    return connection.connection.adapters.get_loader(timestamps.TIMESTAMPTZ, 0)


@pytest.mark.django_db
def test_every_connection_reads_times_as_djangos_loader_does():
    with connection.cursor() as cursor:
        cursor.execute(SELECT)
        ours = cursor.fetchone()
    assert not issubclass(_loader(), BaseTzLoader) and _loader().timezone == connection.timezone

    with connection.connection.cursor() as cursor:  # Django's own loader, on this cursor only
        register_tzloader(connection.timezone, cursor)
        cursor.execute(SELECT)
        djangos = cursor.fetchone()
    assert ours == djangos
    assert [m.tzinfo for m in ours] == [dt.UTC] * len(MOMENTS)
    assert ours[0] == dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    assert ours[5] == dt.datetime(2026, 11, 30, 8, 35, tzinfo=dt.UTC)


@pytest.mark.django_db
def test_a_time_sent_through_the_orm_reads_back_the_same():
    moment = dt.datetime(2026, 11, 30, 14, 5, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-3)))
    app = Application.objects.create(name="TIM", issue_key_prefix="TIM")
    read = Application.objects.annotate(moment=Value(moment, DateTimeField())).values_list(
        "moment", flat=True).get(pk=app.pk)
    assert read == moment and read.tzinfo is dt.UTC and read.hour == 17


def test_a_session_in_another_time_zone_keeps_djangos_loader(transactional_audit_db):
    connection.ensure_connection()
    raw = connection.connection
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'Europe/Paris'")
        register_tzloader(connection.timezone, raw)
        timestamps.use_c_loader(connection=connection)
        assert issubclass(_loader(), BaseTzLoader)
    finally:
        connection.close()  # the next connection is configured afresh
    with connection.cursor() as cursor:
        cursor.execute("SELECT '2026-11-30 14:05:00+00'::timestamptz")
        assert cursor.fetchone()[0] == dt.datetime(2026, 11, 30, 14, 5, tzinfo=dt.UTC)
    assert not issubclass(_loader(), BaseTzLoader)
