import datetime as dt
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils.dateparse import parse_date, parse_datetime

from audit.actors import Actor
from core.times import FIRST_DAY, LAST_DAY
from evidence.reports import REPORTS, Export, Period


def parse_moment(text: str, *, end: bool) -> dt.datetime:
    """A date (whole day; --until includes it) or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        day = parse_date(text)
        moment = None if day else parse_datetime(text)
    except ValueError:
        day = moment = None
    if moment is None and day is None:
        raise CommandError(f"{text!r} is neither a date (YYYY-MM-DD) nor an ISO 8601 time.")
    if not FIRST_DAY <= (day or moment.date()) <= LAST_DAY:
        raise CommandError(f"{text!r}: choose a day between {FIRST_DAY} and {LAST_DAY}.")
    if day is not None:
        moment = dt.datetime.combine(day + dt.timedelta(days=1 if end else 0), dt.time())
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


class Command(BaseCommand):
    help = (
        "Write a SOX report as CSV with its manifest (JSON: parameters, row count, SHA-256, chain head). "
        "changes: every deployment attempt to a restricted environment; exceptions: emergencies, refusals, "
        "grants, incomplete separation of duties; access: who can deploy or approve; audit: the chain itself."
    )

    def add_arguments(self, parser):
        parser.add_argument("report", choices=list(REPORTS))
        parser.add_argument("--since", required=True, help="First day (YYYY-MM-DD) or time, inclusive.")
        parser.add_argument("--until", required=True, help="Last day (YYYY-MM-DD, inclusive) or time (exclusive).")
        parser.add_argument("--application")
        parser.add_argument("-o", "--output", help="CSV file; the manifest goes next to it (.manifest.json). "
                                                   "Without it: CSV on stdout, manifest on stderr.")

    def handle(self, *args, report, since, until, application=None, output=None, **options):
        period = Period(parse_moment(since, end=False), parse_moment(until, end=True), application)
        if period.until <= period.since:
            raise CommandError("--until must come after --since.")
        export = Export(report, period, Actor.command())
        if output is None:
            for chunk in export.chunks():
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            self.stderr.write(export.manifest_json(), ending="")
            return
        csv_path = Path(output)
        manifest_path = csv_path.with_name(csv_path.stem + ".manifest.json")
        shown = 0
        with csv_path.open("wb") as f:
            for chunk in export.chunks():
                f.write(chunk)
                if export.row_count - shown >= 100_000:
                    shown = export.row_count
                    self.stderr.write(f"  {shown:,} rows...")
        manifest_path.write_text(export.manifest_json())
        self.stdout.write(f"{export.row_count} rows -> {csv_path} (sha256 {export.manifest['sha256']}), "
                          f"manifest -> {manifest_path}")
