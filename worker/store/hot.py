"""The statements every command runs, and a batch's savepoints, at less than half of SQLAlchemy's
cost per statement.

SQLAlchemy compiles each statement once, as ever: its SQL, the order of its parameters, its types'
processing. The statement then runs straight on the driver's connection under the transaction.
On PostgreSQL, SQLAlchemy's execution (its context, cursor and result, through a greenlet) costs
about 90 µs of CPU a statement and asyncpg's own work about 50; on SQLite, SQLAlchemy's cursor
takes three or four trips to aiosqlite's thread, and a statement here takes none (it runs on the
event loop's thread, inside the transaction that BEGIN IMMEDIATE opened on aiosqlite's). A statement
with Python-side defaults runs through SQLAlchemy; an IN list is expanded as SQLAlchemy expands
it, padded to a length that is a power of two (each length is a statement to prepare). Where
each positional argument comes from is worked out once per statement (and per length of its IN
lists), not for every execution as SQLAlchemy's `construct_params` does: 2.5 µs to bind a claim
of one email, not 13. Errors are SQLAlchemy's either way, so `translate_error` treats both paths
alike.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Executable
from sqlalchemy.util import await_

__all__ = [
    "Savepoints",
    "Statement",
    "execute_many",
    "first",
    "on_driver",
    "replaced",
    "rowcount",
    "rows",
    "scalar",
]

# A statement built once, with bound parameters.
Statement = Executable

_ROWCOUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")
_T = TypeVar("_T")


def _driver(conn: AsyncConnection) -> Any:
    """SQLAlchemy's adapter of the asyncpg or aiosqlite connection under `conn`, or None: outside
    a transaction, or when SQLAlchemy's internals are not the ones this module knows."""
    if not conn.in_transaction():
        # Outside SQLAlchemy's transaction, asyncpg's would be one SQLAlchemy never commits.
        return None
    fairy = getattr(conn.sync_connection, "_dbapi_connection", None)
    adapter = getattr(fairy, "dbapi_connection", None)
    if not hasattr(adapter, "_execute_mutex"):
        return None
    if conn.dialect.name == "postgresql":
        # asyncpg's transaction begins with the first statement (_on_driver).
        needs = ("_connection", "_transaction", "_start_transaction")
        return adapter if all(hasattr(adapter, a) for a in needs) else None
    if conn.dialect.name == "sqlite":
        # SQLAlchemy's `begin` event has begun the transaction (db.py).
        return adapter if hasattr(getattr(adapter, "_connection", None), "_execute") else None
    return None


async def _on_driver(
    conn: AsyncConnection,
    adapter: Any,
    sql: str,
    on_asyncpg: Callable[[Any], Awaitable[_T]],
    on_sqlite: Callable[[Any], _T],
) -> _T:
    """`on_asyncpg(asyncpg's connection)`, or on SQLite `on_sqlite(sqlite3's connection)`, under
    SQLAlchemy's transaction; errors raised as SQLAlchemy's."""
    try:
        async with adapter._execute_mutex:
            try:
                if conn.dialect.name == "sqlite":
                    driver = adapter._connection
                    if conn.info.get(SQLITE_INLINE):
                        # On the event loop's thread: a trip to aiosqlite's thread and back costs
                        # 70-90 µs of CPU, more than a statement of the store's. None waits
                        # here: BEGIN IMMEDIATE, on aiosqlite's thread, has taken the file's
                        # write lock, and in WAL mode nothing else does until COMMIT (on that
                        # thread too, with its wait for the disk). The statements are the hot
                        # ones, a row or a batch of rows each.
                        return on_sqlite(driver._conn)
                    result: _T = await driver._execute(lambda: on_sqlite(driver._conn))
                    return result
                if adapter._transaction is None:
                    await adapter._start_transaction()
                return await on_asyncpg(adapter._connection)
            except Exception as error:
                adapter._handle_exception(error)  # raises it as the adapter's DBAPI error
                raise
    except Exception as error:
        raise await _as_sqlalchemy(conn, sql, error) from error


# How long SQLite waits for another process's write lock (PRAGMA busy_timeout), in ms.
BUSY_TIMEOUT_MS = 10_000
# The key, in a SQLite connection's `info`, saying its hot statements run on the event loop's
# thread: set when it is in WAL mode (worker.store.db). Otherwise a statement could have to wait
# for a lock (a rollback journal's, to spill its cache) and block the loop.
SQLITE_INLINE = "smtp_worker.sqlite_inline"


def begin_immediate(connection: Any) -> None:
    """`BEGIN IMMEDIATE` on SQLite, in one trip to aiosqlite's thread (SQLAlchemy's cursor takes
    three), where it waits up to BUSY_TIMEOUT_MS for another process's transaction; from
    SQLAlchemy's `begin` event, inside its greenlet."""
    adapter = getattr(connection.connection, "dbapi_connection", None)
    driver: Any = getattr(adapter, "_connection", None)
    if not hasattr(driver, "_execute") or not hasattr(driver, "_conn"):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        return

    def run() -> None:
        driver._conn.execute("BEGIN IMMEDIATE").close()

    dialect = connection.dialect
    try:
        await_(driver._execute(run))
    except dialect.loaded_dbapi.Error as error:
        if dialect.is_disconnect(error, adapter, None):
            # SQLAlchemy's own BEGIN, which invalidates the connection and raises as it does.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            raise
        raise sa_exc.DBAPIError.instance(
            "BEGIN IMMEDIATE", None, error, dialect.loaded_dbapi.Error, hide_parameters=True
        ) from error
    except ValueError:
        # aiosqlite's word for a closed connection: SQLAlchemy's BEGIN turns it into theirs.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        raise


def replaced(row: Any, **values: Any) -> Any:
    """`row` with these columns' values replaced, read as ever (see _row_class)."""
    if hasattr(row, "_replace"):
        return row._replace(**values)
    fields = {**row._asdict(), **values}
    return _row_class(tuple(fields))(**fields)


def _row_class(fields: tuple[str, ...]) -> type[Any]:
    """Rows read on the driver: tuples read by position and by attribute, and as SQLAlchemy's rows
    through `_mapping` and `_asdict()`."""
    base = namedtuple("Row", fields)  # type: ignore[misc]
    return type("Row", (base,), {"__slots__": (), "_mapping": property(base._asdict)})


# Where a positional argument comes from, resolved once per statement: the parameter named
# `key` (element `index` of it, an IN list's, and `part` of that element when it is a tuple),
# or, when `key` is None, a value the statement fixes (a literal compiled as a bound parameter:
# `status == "pending"`); and its processor.
_Arg = tuple[str | None, int | None, int | None, Any, Callable[[Any], Any] | None]


class _Given:
    """Stands for a parameter's value (an IN list's element, with its index, and part of a
    tuple) while a plan learns where each argument of an expanded statement comes from."""

    __slots__ = ("index", "key", "part")

    def __init__(self, key: str, index: int | None = None, part: int | None = None) -> None:
        self.key, self.index, self.part = key, index, part


@dataclass(slots=True)
class _Plan:
    sql: str
    compiled: SQLCompiler
    keys: tuple[str, ...]
    # None when the statement has IN lists: then per length of its lists, `expanded`.
    args: tuple[_Arg, ...] | None
    # None: the statement returns no rows.
    results: tuple[Callable[[Any], Any] | None, ...] | None
    row: Callable[[Any], Any] | None
    # An IN list's parameters are expanded for each execution, as SQLAlchemy does: the names of
    # the lists, and per the lengths of the lists (padded), the statement and its arguments.
    lists: tuple[str, ...] = ()
    expanded: dict[tuple[int, ...], tuple[str, tuple[_Arg, ...]]] = field(default_factory=dict)

    @property
    def expanding(self) -> bool:
        return bool(self.lists)

    @classmethod
    def of(cls, conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> _Plan | None:
        """The plan, or None when SQLAlchemy must finish the statement at execution (Python-side
        defaults, literal or computed parameters, one missing) or its rows are not
        namedtuple-shaped."""
        dialect = conn.dialect
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if (
            not isinstance(compiled, SQLCompiler)
            or compiled.literal_execute_params
            or compiled.insert_prefetch
            or compiled.update_prefetch
            or getattr(compiled, "_collected_params", None)
            or compiled.escaped_bind_names
            or any(bind.callable for bind in compiled.bind_names)
        ):
            return None
        lists = tuple(param.key for param in compiled.post_compile_params)
        if any(name not in keys for name in lists):
            return None  # an IN list of fixed values
        args = None
        if not lists:
            args = _args(compiled, compiled.positiontup or (), keys, compiled._bind_processors)
            if args is None:
                return None
        columns = compiled._result_columns
        results, row = None, None
        if columns:
            try:
                row = _row_class(tuple(column[0] for column in columns))._make
            except ValueError:
                return None
            results = tuple(column[3]._cached_result_processor(dialect, None) for column in columns)
        return cls(compiled.string, compiled, keys, args, results, row, lists)

    def bind(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL and its positional arguments for `params`."""
        if self.args is None:
            params = {**params, **{name: _padded(params[name]) for name in self.lists}}
            sql, args = self._expanded(tuple(len(params[name]) for name in self.lists))
        else:
            sql, args = self.sql, self.args
        values = [
            fixed
            if key is None
            else params[key]
            if i is None
            else params[key][i]
            if part is None
            else params[key][i][part]
            for key, i, part, fixed, _ in args
        ]
        return sql, [
            v if arg[4] is None else arg[4](v) for v, arg in zip(values, args, strict=True)
        ]

    def _expanded(self, lengths: tuple[int, ...]) -> tuple[str, tuple[_Arg, ...]]:
        """The statement with its IN lists of these lengths, and its arguments, as SQLAlchemy
        expands it: learnt once, from an expansion of stand-ins for the values."""
        found = self.expanded.get(lengths)
        if found is None:
            lengths_of = dict(zip(self.lists, lengths, strict=True))
            given: dict[str, Any] = {key: _Given(key) for key in self.keys}
            for param in self.compiled.post_compile_params:
                key, parts = param.key, len(getattr(param.type, "types", ()))
                given[key] = [
                    tuple(_Given(key, i, part) for part in range(parts))
                    if parts
                    else _Given(key, i)
                    for i in range(lengths_of[key])
                ]
            state = self.compiled.construct_expanded_state(given)
            processors = {**self.compiled._bind_processors, **state.processors}
            args: list[_Arg] = []
            for name in state.positiontup or ():
                value = state.parameters[name]
                processor = processors.get(name)
                if processor is not None and not callable(processor):
                    raise TypeError("a tuple's processors, per element, are not planned")
                if isinstance(value, _Given):
                    args.append((value.key, value.index, value.part, None, processor))
                else:
                    args.append((None, None, None, value, processor))
            found = self.expanded[lengths] = (state.statement, tuple(args))
        return found


def _args(
    compiled: SQLCompiler,
    names: Sequence[str],
    keys: tuple[str, ...],
    processors: Mapping[str, Any],
) -> tuple[_Arg, ...] | None:
    """Where each of the positional arguments `names` comes from, given parameters named `keys`
    (as SQLAlchemy's `construct_params` takes them); None when one has no value."""
    binds = {
        compiled.escaped_bind_names.get(name, name): (bind, name)
        for bind, name in compiled.bind_names.items()
    }
    args: list[_Arg] = []
    for position in names:
        bind, name = binds[position]
        processor = processors.get(position)
        if processor is not None and not callable(processor):
            return None  # a tuple's processors, per element
        if bind.key in keys:
            args.append((bind.key, None, None, None, processor))
        elif name in keys:
            args.append((name, None, None, None, processor))
        elif bind.required:
            return None  # SQLAlchemy raises that it is missing
        else:
            args.append((None, None, None, bind.value, processor))
    return tuple(args)


def _padded(values: Iterable[Any]) -> list[Any]:
    """An IN list's values, the last one repeated up to a power of two: a connection prepares a
    statement once for each length of its lists, so lists of 1 to 64 make 7 statements, not 64.
    Matching a row twice in an IN list matches it once."""
    padded = list(values)
    size = 1 << max(len(padded) - 1, 0).bit_length()
    return padded + padded[-1:] * (size - len(padded))


# Per dialect, statement and the parameter names it is given (an INSERT compiles to the columns
# given). The statements are the store's, built once at import, and every engine of a dialect is
# created alike (Store), so their plans are shared.
_plans: dict[tuple[str, int, tuple[str, ...]], tuple[Statement, _Plan | None]] = {}


def _plan(conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> _Plan | None:
    key = (conn.dialect.name, id(statement), keys)
    if key not in _plans:
        # The statement is kept with its plan, so that its id stays its own.
        _plans[key] = (statement, _Plan.of(conn, statement, keys))
    return _plans[key][1]


def on_driver(conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> bool:
    """Whether `statement`, given parameters named `keys`, runs straight on the driver."""
    return _driver(conn) is not None and _plan(conn, statement, keys) is not None


async def _run(
    conn: AsyncConnection, statement: Statement, params: Mapping[str, Any]
) -> tuple[list[Any], int]:
    """The rows and the row count; _Fallback when the statement is SQLAlchemy's to run."""
    adapter = _driver(conn)
    plan = None if adapter is None else _plan(conn, statement, tuple(params))
    if plan is None:
        raise _Fallback
    sql, args = plan.bind(params)
    wants_rows = plan.results is not None

    async def on_asyncpg(connection: Any) -> tuple[Any, int]:
        # Both use asyncpg's cache of prepared statements.
        if wants_rows:
            found = await connection.fetch(sql, *args)
            return found, len(found)
        match = _ROWCOUNT.match(await connection.execute(sql, *args) or "")
        return None, int(match.group(1)) if match else -1

    def on_sqlite(connection: Any) -> tuple[Any, int]:
        cursor = connection.execute(sql, args)
        try:
            if wants_rows:
                found = cursor.fetchall()
                return found, len(found)
            return None, cursor.rowcount
        finally:
            cursor.close()

    records, count = await _on_driver(conn, adapter, sql, on_asyncpg, on_sqlite)
    if records is None:
        return [], count
    results, row = plan.results, plan.row
    assert results is not None and row is not None
    if any(results):
        return [
            row([value if p is None else p(value) for p, value in zip(results, r, strict=True)])
            for r in records
        ], count
    return [row(r) for r in records], count


class _Fallback(Exception):
    """The statement runs through SQLAlchemy."""


async def _as_sqlalchemy(conn: AsyncConnection, sql: str, error: Exception) -> Exception:
    """The error SQLAlchemy would have raised; a lost connection is invalidated, as it would."""
    if isinstance(error, sa_exc.SQLAlchemyError):
        return error
    dialect = conn.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    if not isinstance(error, dbapi_error):
        return error
    adapter = _driver(conn)
    lost = dialect.is_disconnect(error, adapter, None)
    if lost:
        # As SQLAlchemy does: this connection is dropped, and the pool's older ones are tested.
        def invalidate(sync: Any) -> None:
            wrapper = sync._dbapi_connection
            if wrapper is not None and not sync.invalidated:
                sync.engine.pool._invalidate(wrapper, error)
                sync.invalidate(error)

        await conn.run_sync(invalidate)
    return sa_exc.DBAPIError.instance(
        sql,
        None,
        error,
        dbapi_error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=dialect,
    )


async def rows(
    conn: AsyncConnection, statement: Statement, params: Mapping[str, Any]
) -> Sequence[Row[Any]]:
    """Every row `statement` returns, with `params` (from the driver, rows that read as
    SQLAlchemy's: by position, by attribute, `_mapping`, `_asdict()`)."""
    try:
        return (await _run(conn, statement, params))[0]
    except _Fallback:
        return (await conn.execute(statement, dict(params))).all()


async def first(
    conn: AsyncConnection, statement: Statement, params: Mapping[str, Any]
) -> Row[Any] | None:
    """The first row `statement` returns, or None."""
    found = await rows(conn, statement, params)
    return found[0] if found else None


async def scalar(conn: AsyncConnection, statement: Statement, params: Mapping[str, Any]) -> Any:
    """The first column of the first row, or None."""
    row = await first(conn, statement, params)
    return None if row is None else row[0]


async def rowcount(conn: AsyncConnection, statement: Statement, params: Mapping[str, Any]) -> int:
    """Runs `statement` with `params`; the number of rows it matched."""
    try:
        return (await _run(conn, statement, params))[1]
    except _Fallback:
        return (await conn.execute(statement, dict(params))).rowcount


async def execute_many(
    conn: AsyncConnection, statement: Statement, params: Sequence[Mapping[str, Any]]
) -> None:
    """Runs `statement` once for each of `params` (all with the same names), in one trip."""
    if not params:
        return
    adapter = _driver(conn)
    plan = None if adapter is None else _plan(conn, statement, tuple(params[0]))
    if plan is None or plan.expanding or plan.results is not None:
        await conn.execute(statement, [dict(p) for p in params])
        return
    sql = plan.sql
    many = [plan.bind(p)[1] for p in params]
    await _on_driver(
        conn,
        adapter,
        sql,
        lambda connection: connection.executemany(sql, many),
        lambda connection: connection.executemany(sql, many).close(),
    )


class Savepoints:
    """The savepoints of a batch of commands in one transaction, under one name: each command
    runs after one and, refused, is rolled back to it. On PostgreSQL, the RELEASE of a command's
    savepoint and the next command's SAVEPOINT are one round trip; after a rollback, the savepoint
    is where the next command starts, so it costs none."""

    _NAME = "command"

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._state = "none"  # "none", "open" (a command ran in it), "clean" (rolled back to)

    async def begin(self) -> None:
        """A savepoint for the next command."""
        if self._state == "clean":
            self._state = "open"
            return
        if self._state == "none":
            await self._simple(f"SAVEPOINT {self._NAME}")
        else:
            await self._simple(f"RELEASE SAVEPOINT {self._NAME}", f"SAVEPOINT {self._NAME}")
        self._state = "open"

    async def rollback(self) -> None:
        """Everything the command since `begin` wrote is undone."""
        await self._simple(f"ROLLBACK TO SAVEPOINT {self._NAME}")
        self._state = "clean"

    async def _simple(self, *statements: str) -> None:
        adapter = _driver(self._conn)
        if adapter is None:
            for statement in statements:
                await self._conn.exec_driver_sql(statement)
            return
        sql = "; ".join(statements)

        def on_sqlite(connection: Any) -> None:
            for statement in statements:
                connection.execute(statement).close()

        # On asyncpg, one simple query.
        await _on_driver(
            self._conn, adapter, sql, lambda connection: connection.execute(sql), on_sqlite
        )
