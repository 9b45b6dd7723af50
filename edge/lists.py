"""What the admin's lists of tables that grow without end (deployments, audit events) share, so that
each answers in a few milliseconds at millions of rows with a fixed number of queries: a count that
reads at most PORTAL_EXACT_COUNT_LIMIT rows, filter choices read from an index, a date hierarchy read
from the calendar, and a search that takes an issue key as an issue key."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import operator
from dataclasses import dataclass

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ORDER_VAR, ChangeList
from django.core.paginator import EmptyPage, Paginator
from django.db import connections, models, router
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.text import smart_split, unescape_string_literal

from releases.models import Implementer, Release, ReleaseIssue, as_issue_key

# The planner's own estimate of a table's rows: the density seen by the last ANALYZE (autovacuum runs
# it) times the table's current size, as PostgreSQL's estimate_rel_size computes it. NULL before the
# first ANALYZE.
_ESTIMATE_SQL = (
    "SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL"
    " ELSE c.reltuples / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::float) END"
    " FROM pg_class c WHERE c.oid = to_regclass(%s)"
)


class LargeTablePaginator(Paginator):
    """The count of a list that may hold millions of rows, in one query that reads at most
    PORTAL_EXACT_COUNT_LIMIT + 1 of them (COUNT(*) reads every row it counts: most of a page's time at
    a million deployments).

    Up to the limit the count is exact. Beyond it, on PostgreSQL, the unfiltered list takes the
    planner's estimate of the table's rows and says "about 1,000,000"; a filtered or searched list
    (whose size no statistic knows) says "more than 10,000" and pages up to the limit. Other databases
    (SQLite in development and tests) count exactly. `count_label` is what the page shows instead of
    the plain number ("" when the count is exact)."""

    count_label = ""
    beyond = ""  # what the pages do not reach, when the count stopped at its limit
    estimated = False  # the count is the planner's estimate ("about N")

    def __init__(self, object_list, per_page, orphans=0, allow_empty_first_page=True, rows=None):
        super().__init__(object_list, per_page, orphans, allow_empty_first_page)
        self.rows = rows  # the list's rows before its filters and search (see page), or None

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if not isinstance(queryset, models.QuerySet) or connections[queryset.db].vendor != "postgresql":
            return super().count
        limit = settings.PORTAL_EXACT_COUNT_LIMIT
        query = queryset.query
        unfiltered = not (query.where or query.distinct or query.combinator or query.is_sliced)
        inner, params = queryset.order_by().values("pk")[: limit + 1].query.sql_with_params()
        connection = connections[queryset.db]
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*), ({_ESTIMATE_SQL}) FROM ({inner}) AS capped",
                           [connection.ops.quote_name(queryset.model._meta.db_table), *params])
            counted, estimate = cursor.fetchone()
        if counted <= limit:
            return counted
        if unfiltered and estimate and estimate > limit:
            about = _significant(int(estimate))
            self.count_label, self.estimated = f"about {about:,}", True
            # an estimate may miss the rows' number either way: the last page shows the list's last rows (page)
            self.beyond = "an estimate: the last page shows the list's last rows; a filter or the dates reach every row"
            return about
        self.count_label = f"more than {limit:,}"
        self.beyond = f"the pages reach the first {limit:,}: a narrower search, a filter or the dates reach the rest"
        return limit

    def page(self, number):
        """A page past the last one counted shows the last one (and one before the first, the first): the
        admin would otherwise drop the search and start again from the unfiltered list. Where the count
        is the planner's estimate, the last page shows the list's last rows, whatever their number.

        The page's rows are found by their keys first: the list's order and offset over the key and the
        sorted columns alone, then those rows with their joins and annotated columns. Read in one query,
        PostgreSQL joins every row a search finds (300,000 of a million deployments) or skips every row
        before a deep page with its joins, to keep a hundred. The rows are read by their keys alone from
        `rows` where the list has it (LargeTableAdmin: the admin's queryset with the list's joins), in
        the keys' order: with the list's own filters the search ran again over every row it finds
        (190 ms of the 300,000-approval person's page)."""
        try:
            number = self.validate_number(number)
        except EmptyPage:
            number = max(self.num_pages, 1) if int(number) > 1 else 1
        self.shown = number
        if not isinstance(self.object_list, models.QuerySet):
            return super().page(number)
        bottom = (number - 1) * self.per_page
        top = self.count if bottom + self.per_page + self.orphans >= self.count else bottom + self.per_page
        # Pages numbered by an estimate: the last one (and one beyond the rows) shows the list's last rows,
        # read backwards through the order's index, where it showed the rows the estimate's number ended
        # on, or none.
        keys = [] if self.estimated and number == self.num_pages else list(
            self.object_list.values_list("pk", flat=True)[bottom:top])
        if self.estimated and not keys:
            keys = list(self.object_list.reverse().values_list("pk", flat=True)[: self.per_page])[::-1]
        if self.rows is None:
            return self._get_page(self.object_list.filter(pk__in=keys), number, self)
        rows, related = self.rows, self.object_list.query.select_related
        if related is True:
            rows = rows.select_related()
        elif lookups := list(_lookups(related or {})):  # (select_related() without any follows every key)
            rows = rows.select_related(*lookups)
        found = {row.pk: row for row in rows.filter(pk__in=keys).order_by()}
        return self._get_page([found[key] for key in keys if key in found], number, self)


def _lookups(tree: dict, prefix: str = ""):
    """select_related's lookups of a query's tree of them ({"release": {"application": {}}} ->
    release__application)."""
    for name, below in tree.items():
        if below:
            yield from _lookups(below, f"{prefix}{name}__")
        else:
            yield f"{prefix}{name}"


class LargeChangeList(ChangeList):
    """Django's change list, answering a date past the calendar in the date hierarchy as the bad lookup
    it is (Django computes the period after the one asked, and year 9999 has none), and breaking a
    sort's ties by the primary key in the sort's own direction (Django always takes the newest first):
    one index (column, id) then serves the column's sort both ways."""

    def get_ordering(self, request, queryset):
        ordering = super().get_ordering(request, queryset)
        if len(ordering) > 1 and ordering[-1] == "-pk" and isinstance(ordering[0], str) \
                and not ordering[0].startswith("-"):
            ordering[-1] = "pk"  # the tiebreak Django added (_get_deterministic_ordering), turned the same way
        return ordering

    def get_filters(self, request):
        try:
            return super().get_filters(request)
        except (ValueError, OverflowError) as exc:  # a typed URL: ?requested_at__year=9999
            raise IncorrectLookupParameters(exc) from exc  # the admin's answer to a bad lookup: ?e=1


class LargeTableAdmin:
    """For a ModelAdmin of a table that grows without end: LargeTablePaginator, which reads a page's
    rows by their keys from the admin's own queryset (`get_queryset`)."""

    paginator = LargeTablePaginator

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        return self.paginator(queryset, per_page, orphans, allow_empty_first_page, rows=self.get_queryset(request))

    def get_changelist(self, request, **kwargs):
        return LargeChangeList

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        # the page shown (see LargeTablePaginator.page), which the page links mark and count from
        changelist.page_num = getattr(changelist.paginator, "shown", changelist.page_num)
        return changelist


def _significant(n: int, digits: int = 3) -> int:
    """`n` rounded to a few significant digits: an estimate says no more than it knows."""
    scale = 10 ** max(len(str(n)) - digits, 0)
    return round(n / scale) * scale


class IndexedValuesFilter(admin.AllValuesFieldListFilter):
    """The admin's "all values" filter for an indexed, non-null column of a large table. Django reads
    the choices with SELECT DISTINCT over every row (hundreds of milliseconds at a million audit
    events); this walks the column's index from one value to the next (a recursive query, one index
    probe per distinct value, on PostgreSQL and SQLite alike)."""

    empty_label = "(empty)"  # how the choice of rows whose value is "" reads (Django would show no text)

    def __init__(self, field, request, params, model, model_admin, field_path):
        super().__init__(field, request, params, model, model_admin, field_path)
        if field_path != field.name or field.null:
            raise ValueError(f"{field_path}: an indexed, non-null column of the listed table")
        self.lookup_choices = indexed_values(model, field.name, request)

    def choices(self, changelist):
        for choice in super().choices(changelist):
            yield {**choice, "display": self.empty_label} if choice["display"] == "" else choice


def indexed_values(model, field_name: str, request=None) -> list:
    """The distinct values of an indexed, non-null column, in order, read by walking its index from one
    value to the next (one index probe per value, whatever the number of rows). Read once per
    `request` (a list's filter and its search may both ask)."""
    read = getattr(request, "_indexed_values", None)
    if read is None:
        read = {}
        if request is not None:
            request._indexed_values = read
    key = (model._meta.label, field_name)
    if key not in read:
        read[key] = _indexed_values(model, field_name)
    return list(read[key])


def _indexed_values(model, field_name: str) -> list:
    connection = connections[router.db_for_read(model)]
    table, column = (connection.ops.quote_name(n) for n in (model._meta.db_table,
                                                           model._meta.get_field(field_name).column))
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH RECURSIVE present(value) AS (SELECT MIN({column}) FROM {table}"
            f" UNION ALL SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > present.value)"
            f" FROM present WHERE present.value IS NOT NULL)"
            f" SELECT value FROM present WHERE value IS NOT NULL")
        return [value for (value,) in cursor.fetchall()]


class _Calendar:
    """A change list's queryset as admin_list.date_hierarchy reads it, except that dates() and
    datetimes() list the periods between the first and the last date (two index reads) that hold a
    row (one query: a probe of the list in each period, through the date's index)
    instead of SELECT DISTINCT over every row (a sort of a million rows).

    The first and last date are read once (the hierarchy asks for them to choose its level, and
    datetimes() needs the same). PostgreSQL reads a MIN or a MAX by walking the column's index until
    a row matches the list's filter: instant where many rows match, seconds at a million rows where a
    search matches a few. So on PostgreSQL a filtered list known to hold `few` rows (its exact count,
    at most PORTAL_EXACT_COUNT_LIMIT) takes its bounds over those rows as its filter finds them (a
    subquery with a limit, which the planner does not turn into that walk).

    A search that finds many rows (beyond PORTAL_EXACT_COUNT_LIMIT) costs each query that reads the
    list what finding them costs (more than half a second at a million rows for a person's 300,000
    approvals): its periods are not probed (`probe` False), its first and last dates are those of the
    whole table (`whole`: two reads of the date's index), and the hierarchy offers every period between
    them, some of which may hold none of the rows it found."""

    def __init__(self, queryset: models.QuerySet, few: int | None = None, probe: bool = True,
                 whole: models.QuerySet | None = None):
        self._queryset, self._few, self._probe, self._whole = queryset, few, probe, whole
        self._bounds: dict[str, dict] = {}

    def aggregate(self, *, first: models.Min, last: models.Max) -> dict:
        """The hierarchy's one aggregate: the first and the last of its field."""
        return dict(self.bounds(first.source_expressions[0].name))

    def bounds(self, field_name: str) -> dict:
        """{"first": ..., "last": ...} of the field over the list."""
        if field_name not in self._bounds:
            queryset = self._queryset
            connection = connections[queryset.db]
            if self._few == 0:
                found = {"first": None, "last": None}  # nothing listed: nothing to read
            elif self._whole is not None:
                found = self._whole.order_by().aggregate(first=models.Min(field_name), last=models.Max(field_name))
            elif self._few is None or connection.vendor != "postgresql":
                found = queryset.aggregate(first=models.Min(field_name), last=models.Max(field_name))
            else:
                # The limit is the cap, not the count: a small limit makes reading the table in any
                # order until that many rows turn up look cheap (a sequential scan).
                cap = settings.PORTAL_EXACT_COUNT_LIMIT + 1
                inner, params = queryset.order_by().values(field_name)[:cap].query.sql_with_params()
                column = connection.ops.quote_name(queryset.model._meta.get_field(field_name).column)
                with connection.cursor() as cursor:
                    cursor.execute(f"SELECT MIN({column}), MAX({column}) FROM ({inner}) AS few", params)
                    found = dict(zip(("first", "last"), cursor.fetchone(), strict=True))
            self._bounds[field_name] = found
        return self._bounds[field_name]

    def datetimes(self, field_name: str, kind: str) -> list[dt.date]:
        bounds = self.bounds(field_name)
        if bounds["first"] is None:
            return []
        first, last = (timezone.localtime(v).date() if isinstance(v, dt.datetime) else v for v in bounds.values())
        if kind == "year":
            periods = [dt.date(year, 1, 1) for year in range(first.year, last.year + 1)]
        elif kind == "month":
            months = range(first.year * 12 + first.month - 1, last.year * 12 + last.month)
            periods = [dt.date(m // 12, m % 12 + 1, 1) for m in months]
        else:
            periods = [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]
        if len(periods) < 3 or not self._probe:
            return periods  # the first and the last hold a row
        return [periods[0], *self._holding(field_name, kind, periods[1:-1]), periods[-1]]

    dates = datetimes

    def _holding(self, field_name: str, kind: str, periods: list[dt.date]) -> list[dt.date]:
        """The periods in which the list has a row: one query, a probe of the list for each period (the
        list's filter over the period's range of the date's index; a day holds a day's rows at most).
        The list is one subquery probed with each period's bounds, so that what its filter reads once
        (a search's set of ids) serves every probe. The ranges are those of the hierarchy's links
        (`__year`, `__month`, `__day`): local time."""
        field = self._queryset.model._meta.get_field(field_name)
        connection = connections[self._queryset.db]
        bounds = [(start, _next(start, kind)) for start in periods]
        if isinstance(field, models.DateTimeField):
            adapt = connection.ops.adapt_datetimefield_value
            bounds = [(adapt(_local_midnight(start)), adapt(_local_midnight(end))) for start, end in bounds]
        else:
            adapt = connection.ops.adapt_datefield_value
            bounds = [(adapt(start), adapt(end)) for start, end in bounds]
        listed, listed_params = self._queryset.order_by().values_list(field_name).query.sql_with_params()
        column = connection.ops.quote_name(field.column)
        rows = ", ".join(["(%s, %s, %s)"] * len(bounds))
        with connection.cursor() as cursor:
            cursor.execute(
                f"WITH periods(n, since, until) AS (VALUES {rows}) SELECT n FROM periods WHERE EXISTS"
                f" (SELECT 1 FROM ({listed}) AS listed WHERE listed.{column} >= periods.since"
                f" AND listed.{column} < periods.until) ORDER BY n",
                [value for n, (since, until) in enumerate(bounds) for value in (n, since, until)] + list(listed_params))
            return [periods[n] for (n,) in cursor.fetchall()]


def _next(start: dt.date, kind: str) -> dt.date:
    if kind == "year":
        return dt.date(start.year + 1, 1, 1)
    if kind == "month":
        return dt.date(start.year + start.month // 12, start.month % 12 + 1, 1)
    return start + dt.timedelta(days=1)


def _local_midnight(day: dt.date) -> dt.datetime:
    return timezone.make_aware(dt.datetime.combine(day, dt.time.min))


class CalendarChangeList:
    """A change list whose date hierarchy offers the years, months or days between its first and
    last row that hold one (for a search that finds many rows, every one between the table's first
    and last row), read without SELECT DISTINCT over every row. Everything else is the change list's
    own."""

    def __init__(self, changelist):
        self._changelist = changelist
        count, limit = getattr(changelist, "result_count", None), settings.PORTAL_EXACT_COUNT_LIMIT
        exact = not getattr(getattr(changelist, "paginator", None), "count_label", "")  # not "more than"
        filtered = bool(changelist.queryset.query.where)
        few = count if filtered and exact and count is not None and count <= limit else None
        searched_many = bool(getattr(changelist, "query", "").strip()) and few is None  # (a blank search is none)
        whole = _within_chosen_period(changelist) if searched_many else None
        self.queryset = _Calendar(changelist.queryset, few, probe=not searched_many, whole=whole)

    def __getattr__(self, name):
        return getattr(self._changelist, name)


def _within_chosen_period(changelist) -> models.QuerySet | None:
    """The admin's whole list (its root queryset: no filter, no search) within the year, month or day
    the date hierarchy has chosen, as the change list bounds that period (local time)."""
    whole, field_name = getattr(changelist, "root_queryset", None), getattr(changelist, "date_hierarchy", None)
    if whole is None or not field_name:
        return whole
    params = getattr(changelist, "params", {})
    chosen = [params.get(f"{field_name}__{part}") for part in ("year", "month", "day")]
    if chosen[0] is None:
        return whole
    kind = "day" if chosen[2] else "month" if chosen[1] else "year"
    start = dt.date(int(chosen[0]), int(chosen[1] or 1), int(chosen[2] or 1))  # the change list checked them
    since, until = start, _next(start, kind)
    if isinstance(whole.model._meta.get_field(field_name), models.DateTimeField):
        since, until = _local_midnight(since), _local_midnight(until)
    return whole.filter(**{f"{field_name}__gte": since, f"{field_name}__lt": until})


@dataclass(frozen=True)
class Found:
    """Rows of some table that a search word finds, and their column holding the key of the listed rows
    they stand for (`to`: the listed model's path that column matches, its pk or its release)."""

    rows: models.QuerySet
    column: str
    to: str = "pk"

    def keys(self) -> models.QuerySet:
        return self.rows.order_by().values(self.column)

    def here(self) -> models.Exists:
        """Whether a listed row is one of these, asked of that row (an index probe per row)."""
        return models.Exists(self.rows.filter(**{self.column: models.OuterRef(self.to)}))


class ReleaseSearch:
    """The admin search of a list whose rows belong to releases (the releases list itself, the
    deployments list), at millions of rows.

    A term that looks like an issue key (BIZPLAT-64951, in any case) finds exactly the rows of the
    releases carrying that key, through the key's index (BIZPLAT-5 is not BIZPLAT-50). Any other text
    is searched word by word as the admin does (each word somewhere, in any case), but the words are
    looked for in the releases' own small tables (`release_search`: version, issue keys, implementers)
    and the rows of the releases found are then read through their index, with the listed table's own
    columns (`own_search`) searched on the side: a LIKE '%…%' across a join of a million deployments
    with releases and keys read every row, and its DISTINCT sorted them (seconds per search).

    A word that finds more rows than PORTAL_EXACT_COUNT_LIMIT (a person who approved 300,000
    deployments) is asked of each row instead, while the list keeps its own order: the list is read
    through its order's index and each row is checked by an index probe of each way the word finds rows
    (`Found.here`), so that a page's hundred rows are found among the first few hundred. Gathered first,
    the rows such a word finds were hashed and joined with every row of the list, then sorted, to keep a
    hundred (half a second at a million deployments). A list sorted by one of its columns keeps the
    gathered form: there every row is read in any case.
    """

    release_path = "release"  # the path from the listed model to its release ("pk" for releases)
    release_search: tuple[str, ...] = ("version", "issue_keys")  # of RELEASE_TERMS
    own_search: tuple[str, ...] = ()  # columns of the listed model, searched as icontains
    numbered = False  # whether the list shows its rows' numbers (#71): a number then finds its row
    joining: frozenset[str] = frozenset()  # words of a row's title that find nothing ("MAC 1.3.1 to QA")

    def named(self) -> dict[str, set[str]]:
        """Paths of the listed model whose values a word may name exactly (any case), with those values
        lower-case, read from their own small tables: "MAC 1.3.1" is MAC's releases matching 1.3.1."""
        return {}

    def more_matches(self, word: str) -> list[Found]:
        """More ways a word finds rows of the listed model (e.g. a person's name)."""
        return []

    def get_search_results(self, request, queryset, search_term):
        if not search_term.strip():
            return queryset, False
        key = as_issue_key(search_term)
        if key is not None:
            carrying = ReleaseIssue.objects.filter(key=key).values("release_id")
            return queryset.filter(**{f"{self.release_path}__in": carrying}), False
        model = queryset.model
        named = self.named()
        words = search_words(search_term)
        in_its_order = not request.GET.get(ORDER_VAR)  # the list's own order, read through its index
        for word in [w for w in words if w.lower() not in self.joining] or words:
            path = next((path for path, values in named.items() if word.lower() in values), None)
            if path is not None:
                queryset = queryset.filter(**{f"{path}__iexact": word})
                continue
            of_releases = [dataclasses.replace(RELEASE_TERMS[name](word), to=self.release_path)
                           for name in self.release_search]
            found = of_releases + [Found(model._default_manager.filter(**{f"{column}__icontains": word}), "pk")
                                   for column in self.own_search]
            if self.numbered and (number := as_number(word)) is not None:  # #71 or 71
                found.append(Found(model._default_manager.filter(pk=number), "pk"))
            found += self.more_matches(word)
            limit = settings.PORTAL_EXACT_COUNT_LIMIT
            many = in_its_order and self._keys(model, of_releases, found, every=True)[: limit + 1].count() > limit
            if many:  # asked of each row (see above)
                queryset = queryset.filter(functools.reduce(operator.or_, (models.Q(f.here()) for f in found)))
            else:
                queryset = queryset.filter(pk__in=self._keys(model, of_releases, found))
        return queryset, False

    def _keys(self, model, of_releases: list[Found], found: list[Found], every: bool = False) -> models.QuerySet:
        """The keys of the listed rows a word finds (`found`, which starts with `of_releases`); `every`: as
        they are found, some twice, without a union's hash (to count the first few).

        Unions rather than ORs: each side is estimated on its own (a LIKE finds few rows), so the planner
        reads the rows of the releases found through their index instead of every row."""
        releases = _union([f.keys() for f in of_releases], every)
        return _union([model._default_manager.filter(**{f"{self.release_path}__in": releases}).order_by().values("pk"),
                       *(f.keys() for f in found[len(of_releases):])], every)


def _union(querysets: list[models.QuerySet], every: bool = False) -> models.QuerySet:
    first, *more = querysets
    return first.union(*more, all=every) if more else first


# What a word is looked for in, each the rows of the releases' tables it finds, by the release's id.
RELEASE_TERMS = {
    "version": lambda word: Found(Release.objects.filter(version__icontains=word), "pk"),
    "issue_keys": lambda word: Found(ReleaseIssue.objects.filter(key__icontains=word), "release_id"),
    "implementers": lambda word: Found(Implementer.objects.filter(identity__icontains=word), "release_id"),
}


def as_number(text: str) -> int | None:
    """A row's number as the pages write it (#71) or bare (71): ASCII digits that fit a 64-bit key."""
    number = text.removeprefix("#")
    return int(number) if number.isascii() and number.isdigit() and len(number) < 19 else None


def search_words(search_term: str) -> list[str]:
    """The words of a search as the admin splits them ("quoted phrases" stay one word)."""
    return [unescape_string_literal(w) if w[0] in "\"'" and w[0] == w[-1] and len(w) > 1 else w
            for w in smart_split(search_term) if w]
