"""Reads whose SQL the ORM compiles once per process.

The API runs a few reads of a fixed shape on every request: the same statement with other values.
The ORM builds and compiles the queryset again on each call, which costs several times what the
database spends running it. A CompiledRead builds its queryset once per database, with marker
values in the places of its arguments, keeps the compiled statement, and runs it with each call's
values in those places; the rows come back through the ORM's own converters, as `values()` dicts
or `values_list()` tuples. On PostgreSQL the statement is also prepared once per database session
(see fetch), so that the server does not parse and plan it again on every call either.

For querysets whose statement does not depend on the values: each argument is a scalar (int,
str, or an aware datetime compared with a DateTimeField) or a collection of them (one statement
per collection length, as the ORM writes `IN (...)`; an empty one reads nothing, as the ORM does),
used as it is (a value that the build function computes from an argument, or that a lookup
rewrites, is refused). The queryset selects with `values()` or `values_list()` (no extra()).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.core.exceptions import EmptyResultSet
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Field, Model, QuerySet
from django.db.transaction import TransactionManagementError
from django.utils import timezone
from psycopg import sql as psycopg_sql

_counter = itertools.count(1)


_EPOCH = dt.datetime(1901, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
_MARKED = "\x00compiledread"  # how every str marker begins (nothing a LIKE escapes)


def _marker(kind: type):
    """A value that cannot be confused with a real one and that the fields' lookups pass through
    unchanged (an int stays an int, a str a str, a datetime is adapted as the backend adapts any)."""
    n = next(_counter)
    if kind is int:
        return -(2**62) - n
    if kind is str:  # with the characters a LIKE lookup escapes, so that such a lookup is refused
        return f"{_MARKED}%{n}\\\x00"
    if kind is dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=n)
    raise TypeError(f"CompiledRead arguments are int, str or datetime (or collections of them), not {kind}.")


def _adapted(value, connection):
    """A value as a DateTimeField lookup hands it to the database (an aware datetime)."""
    if isinstance(value, dt.datetime):
        if timezone.is_naive(value):
            raise ValueError("CompiledRead takes aware datetimes.")
        return connection.ops.adapt_datetimefield_value(value)
    return value


@dataclass(frozen=True)
class _Statement:
    sql: str
    params: tuple
    slots: tuple[tuple[int, int, int | None], ...]  # (parameter position, argument, element or None)
    names: tuple[str, ...]  # the columns' names, as values() names them
    converters: dict  # column position -> (converter functions, expression), the ORM's own
    locks: bool = False  # SELECT ... FOR UPDATE: only inside a transaction, as the ORM insists

    @functools.cached_property
    def varying(self) -> tuple[int, ...]:
        """The positions of the parameters that hold the arguments (the others are constants)."""
        return tuple(sorted({position for position, _, _ in self.slots}))


class CompiledRead:
    """`build(*args)` returns the queryset; `kinds` says what each argument is: int, str,
    datetime.datetime, or a one-element tuple, e.g. `(int,)`, for a collection of them."""

    def __init__(self, build: Callable[..., QuerySet], *kinds):
        self._build = build
        self._kinds = kinds
        self._statements: dict[tuple, _Statement | None] = {}

    def _shape(self, args) -> tuple:
        if len(args) != len(self._kinds):
            raise TypeError(f"Expected {len(self._kinds)} arguments, got {len(args)}.")
        return tuple(len(a) if isinstance(k, tuple) else None for a, k in zip(args, self._kinds, strict=True))

    def _compile(self, using: str, shape: tuple) -> _Statement | None:
        markers = [[_marker(k[0]) for _ in range(n)] if isinstance(k, tuple) else _marker(k)
                   for k, n in zip(self._kinds, shape, strict=True)]
        queryset = self._build(*markers).using(using)
        query = queryset.query
        if query.extra_select or queryset._fields is None:
            raise ValueError("A CompiledRead selects with values() or values_list(), without extra().")
        compiler = query.get_compiler(using)
        try:
            sql, params = compiler.as_sql()
        except EmptyResultSet:
            return None
        where = {}
        for index, marker in enumerate(markers):
            for element, value in enumerate(marker) if isinstance(marker, list) else [(None, marker)]:
                where[_adapted(value, compiler.connection)] = (index, element)
        slots = tuple((position, *where[value]) for position, value in enumerate(params)
                      if isinstance(value, int | str | dt.datetime) and value in where)
        if {(i, e) for _, i, e in slots} != set(where.values()):
            raise ValueError("Each argument must appear as a parameter of the compiled statement.")
        taken = {position for position, _, _ in slots}
        if any(isinstance(value, str) and _MARKED in value for position, value in enumerate(params)
               if position not in taken):  # a lookup rewrote an argument (a LIKE escaped it): refused
            raise ValueError("An argument is rewritten by a lookup of the compiled statement.")
        columns = [column[0] for column in compiler.select[:compiler.col_count]]
        names = tuple(query.selected) if query.selected else (*query.values_select, *query.annotation_select)
        if len(names) != len(columns) or compiler.has_composite_fields(columns):
            raise ValueError("The compiled statement does not select the queryset's values.")
        return _Statement(sql, tuple(params), slots, names, compiler.get_converters(columns),
                          locks=bool(query.select_for_update))

    def _bound(self, args, using: str) -> tuple[_Statement | None, list]:
        """The statement for these arguments' shape (compiled on first use) and its parameters."""
        shape = self._shape(args)
        key = (using, shape)
        if key not in self._statements:
            self._statements[key] = self._compile(using, shape)
        statement = self._statements[key]
        if statement is None:
            return None, []
        connection = connections[using]
        if statement.locks and connection.features.has_select_for_update and connection.get_autocommit():
            # The ORM checks this when it compiles, which a compiled read does once: a lock taken in
            # autocommit would be let go at once.
            raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
        params = list(statement.params)
        values = [[_adapted(v, connection) for v in a] if isinstance(k, tuple) else _adapted(a, connection)
                  for a, k in zip(args, self._kinds, strict=True)]
        for position, index, element in statement.slots:
            params[position] = values[index] if element is None else values[index][element]
        return statement, params

    def later(self, *args, using: str = DEFAULT_DB_ALIAS) -> Pending:
        """This read with these arguments, to be run with others in one round trip (together())."""
        statement, params = self._bound(args, using)
        return Pending(statement, params, using)

    def tuples(self, *args, using: str = DEFAULT_DB_ALIAS) -> list[tuple]:
        """The rows as values_list() gives them."""
        return self.later(*args, using=using).tuples()

    def dicts(self, *args, using: str = DEFAULT_DB_ALIAS) -> list[dict]:
        """The rows as values() gives them."""
        return self.later(*args, using=using).dicts()

    def instances(self, model: type[Model], *args, using: str = DEFAULT_DB_ALIAS) -> list[Model]:
        """The rows as instances of `model`, for a queryset of it that selects values() of some of its
        fields by attname, in the model's field order (the others are deferred, as with only())."""
        return self.later(*args, using=using).instances(model)


class Pending:
    """A CompiledRead bound to its arguments. Its rows are read once, by the first of tuples(),
    dicts() or instances(), or by together() with other reads in one round trip."""

    def __init__(self, statement: _Statement | None, params: list, using: str):
        self.statement, self.params, self.using = statement, params, using
        self._rows: list[tuple] | None = None if statement is not None else []

    @classmethod
    def of_sql(cls, sql: str, params: list, *, using: str = DEFAULT_DB_ALIAS) -> Pending:
        """A statement written by hand (every parameter an argument), as a read to run with others;
        its rows as the driver gives them (tuples())."""
        slots = tuple((position, position, None) for position in range(len(params)))
        return cls(_Statement(sql, tuple(params), slots, (), {}), list(params), using)

    def run(self) -> tuple[_Statement | None, list[tuple]]:
        if self._rows is None:
            together(self)
        return self.statement, self._rows

    def _receive(self, rows: list[tuple]) -> None:
        converters = self.statement.converters
        if converters:
            connection = connections[self.using]
            rows = [_converted(row, converters, connection) for row in rows]
        self._rows = rows

    def tuples(self) -> list[tuple]:
        return self.run()[1]

    def dicts(self) -> list[dict]:
        statement, rows = self.run()
        return [dict(zip(statement.names, row, strict=True)) for row in rows]

    def instances(self, model: type[Model]) -> list[Model]:
        statement, rows = self.run()
        if not rows:
            return []
        fields = [f.attname for f in model._meta.concrete_fields]
        if [f for f in fields if f in statement.names] != list(statement.names):
            raise ValueError(f"The statement does not select fields of {model.__name__} in their order.")
        return [model.from_db(self.using, statement.names, row) for row in rows]


def together(*reads: Pending | None, maybe: tuple[Pending, ...] = ()) -> None:
    """Run reads that do not depend on each other's answers. On PostgreSQL they go in one round trip
    (one message of several EXECUTEs, whose results come back in order); elsewhere one after the
    other. Each read's rows are then available from it; a None among them is a read not needed.
    `maybe`: reads whose rows may not be asked for; they join a round trip the others make, and are
    otherwise left to run when first asked."""
    waiting = [r for r in reads if r is not None and r._rows is None]
    if not waiting:
        return
    usings = {r.using for r in (*waiting, *maybe)}
    if len(usings) != 1:
        raise ValueError("Reads run together on one database.")
    connection = connections[usings.pop()]
    batched = connection.vendor == "postgresql" and not connection.settings_dict.get("OPTIONS", {}).get(
        "server_side_binding")  # server-side binding sends each statement on its own
    if batched:
        waiting += [r for r in maybe if r._rows is None and r not in waiting]
    if len(waiting) == 1 or not batched:
        for read in waiting:
            read._receive(fetch(read.statement.sql, read.params, using=read.using, varying=read.statement.varying))
        return
    sql, params = [], []
    for read in waiting:
        statement_sql, statement_params = _executable(connection, read.statement.sql, read.params,
                                                      read.statement.varying)
        sql.append(statement_sql)
        params.extend(statement_params)
    with connection.cursor() as cursor:
        cursor.execute("; ".join(sql), params)
        for index, read in enumerate(waiting):
            if index and not cursor.nextset():
                raise RuntimeError("Reads run together returned fewer results than statements.")
            read._receive(cursor.fetchall())


# The statements prepared on each PostgreSQL session (the driver's connection object), by name.
_prepared_on: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fetch(sql: str, params: list, *, using: str = DEFAULT_DB_ALIAS, varying: tuple[int, ...] | None = None
          ) -> list[tuple]:
    """The rows of a statement with parameters that runs on every request. On PostgreSQL it is
    prepared once per session (EXECUTE of a named statement), so that the server parses it once
    rather than on every call: the portal binds parameters on the client, which never prepares (the
    audit chain sends two statements in one round trip, which server-side binding refuses). PREPARE
    is a setting of the session, outside any transaction (a rollback keeps it), sent on the driver's
    connection the first time a session runs the statement. `varying`: the positions of the
    parameters that change from call to call (default: all); the others are written into the
    prepared statement as constants, so that PostgreSQL can plan it once for every call (a
    parameter in the place of e.g. a list of states would make its plan for any value a poor one,
    and it would plan again on every call)."""
    connection = connections[using]
    sql, params = _executable(connection, sql, params, varying)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


# (statement, its constant parameters) -> (name, PREPARE text), per process
_prepared_text: dict[tuple, tuple[str, str]] = {}


def prepared(sql: str, params: list, *, using: str = DEFAULT_DB_ALIAS) -> tuple[str, list]:
    """A statement to run with these parameters as it runs fastest: on PostgreSQL the EXECUTE of it
    prepared on this session (as fetch does; every parameter an argument, so each must be typed
    where PostgreSQL cannot tell its type from its place), elsewhere the statement itself."""
    return _executable(connections[using], sql, params)


def _executable(connection, sql: str, params: list, varying: tuple[int, ...] | None = None) -> tuple[str, list]:
    """On PostgreSQL, the statement prepared on this session (PREPARE on first use) and its EXECUTE."""
    if connection.vendor != "postgresql" or not params:
        return sql, params
    varying = tuple(range(len(params))) if varying is None else varying
    constants = tuple((i, v) for i, v in enumerate(params) if i not in varying)
    connection.ensure_connection()
    session = connection.connection
    key = (sql, constants)
    if key not in _prepared_text:
        literals = {i: psycopg_sql.Literal(v).as_string(session) for i, v in constants}
        numbers = {position: f"${n}" for n, position in enumerate(varying, 1)}
        text = _numbered(sql, [numbers.get(i) or literals[i] for i in range(len(params))])
        _prepared_text[key] = ("compiled_read_" + hashlib.sha256(text.encode()).hexdigest()[:24], text)
    name, text = _prepared_text[key]
    names = _prepared_on.setdefault(session, set())
    if name not in names:
        connection.validate_no_broken_transaction()  # as Django's own cursor does
        with connection.wrap_database_errors, session.cursor() as cursor:
            cursor.execute(f"PREPARE {name} AS {text}")
        names.add(name)
    return f"EXECUTE {name}({', '.join(['%s'] * len(varying))})", [params[i] for i in varying]


def _numbered(sql: str, values: list[str]) -> str:
    """Django's SQL (%s placeholders, %% for a literal %) as PREPARE reads it, each placeholder
    replaced by its value ($1, $2, ... or a constant)."""
    parts = sql.split("%%")
    values = iter(values)
    # A constant holding "%s" is not matched again: each part is substituted once, left to right.
    return "%".join(re.sub(r"%s", lambda _: next(values), part) for part in parts)


def _converted(row: tuple, converters: dict, connection) -> tuple:
    row = list(row)
    for position, (functions, expression) in converters.items():
        value = row[position]
        for function in functions:
            value = function(value, expression, connection)
        row[position] = value
    return tuple(row)


def model_fields(model: type[Model]) -> list[str]:
    """The attnames of a model's fields, in its order: values(*model_fields(M)) reads whole rows for
    CompiledRead.instances()."""
    return [f.attname for f in model._meta.concrete_fields]


def insert_new(instance: Model, *, children: Sequence[Model] = (), using: str = DEFAULT_DB_ALIAS) -> bool:
    """INSERT an unsaved instance in one prepared statement, unless a row with the same values of a
    unique constraint is there (`ON CONFLICT DO NOTHING`, on PostgreSQL and SQLite alike). True when
    inserted, the instance then as if saved (its primary key set); False when the row was there (on
    PostgreSQL, once a transaction still inserting it has committed), the instance left unsaved.
    `children`: unsaved rows of one model whose foreign key points at the instance's model, inserted
    with it (on PostgreSQL in the same statement, a data-modifying WITH; elsewhere right after it),
    their foreign key set to it; they are not read back (their primary keys stay unset).

    A row the caller's own lock does not guard can be created this way without a savepoint and
    without serializing every writer on a parent row's lock. The models' save machinery is not run:
    only for models no signal listens to (auto_now fields are filled in as save() fills them)."""
    connection = connections[using]
    model = type(instance)
    params = _insert_params(instance, connection)
    child_model, link = (type(children[0]), _link(type(children[0]), model)) if children else (None, None)
    together_ = connection.vendor == "postgresql" and children
    for child in children if together_ else ():
        params += _insert_params(child, connection, without=link)
    sql = _insert_new_sql(model, using, (child_model, link, len(children)) if together_ else None)
    rows = fetch(sql, params, using=using)
    if not rows:
        return False
    instance.pk = rows[0][0]
    instance._state.adding, instance._state.db = False, using
    for child in children:
        setattr(child, link.name, instance)
    if children and not together_:
        child_model.objects.using(using).bulk_create(children)
    return True


def _link(child: type[Model], parent: type[Model]) -> Field:
    """The one foreign key of `child` to `parent`."""
    links = [f for f in child._meta.concrete_fields if f.is_relation and f.related_model is parent]
    if len(links) != 1:
        raise ValueError(f"{child.__name__} has not exactly one foreign key to {parent.__name__}.")
    return links[0]


def _insert_params(instance: Model, connection, without: Field | None = None) -> list:
    return [field.get_db_prep_save(field.pre_save(instance, True), connection)
            for field in inserted_fields(type(instance)) if field is not without]


@functools.cache
def inserted_fields(model: type[Model]) -> tuple:
    """The fields an INSERT of a `model` row writes: every concrete field but the primary key."""
    return tuple(f for f in model._meta.concrete_fields if not f.primary_key)


def insert_sql(model: type[Model], connection) -> str:
    """INSERT INTO the model's table (its inserted_fields) VALUES (%s, ...): one row, without a clause after."""
    quote, fields = connection.ops.quote_name, inserted_fields(model)
    return (f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))})")


@functools.cache
def _insert_new_sql(model: type[Model], using: str, children: tuple | None) -> str:
    connection = connections[using]
    quote = connection.ops.quote_name
    insert = insert_sql(model, connection)
    if children is None:
        return f"{insert} ON CONFLICT DO NOTHING RETURNING {quote(model._meta.pk.column)}"
    child, link, count = children
    values = [f for f in inserted_fields(child) if f is not link]
    row = f"({', '.join(f'CAST(%s AS {f.db_type(connection)})' for f in values)})"
    names = ", ".join(quote(f.column) for f in values)
    return (f"WITH parent AS ({insert} ON CONFLICT DO NOTHING RETURNING {quote(model._meta.pk.column)}), "
            f"children AS (INSERT INTO {quote(child._meta.db_table)} ({quote(link.column)}, {names}) "
            f"SELECT parent.{quote(model._meta.pk.column)}, {names} FROM parent, "
            f"(VALUES {', '.join([row] * count)}) AS v({names})) "
            f"SELECT {quote(model._meta.pk.column)} FROM parent")
