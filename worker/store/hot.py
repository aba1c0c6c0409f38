"""The statements every command runs, and a batch's savepoints, at less than half of SQLAlchemy's
cost per statement.

SQLAlchemy compiles each statement once, as ever: its SQL, the order of its parameters, its types'
processing. The statement then runs straight on the driver's connection under the transaction.
On PostgreSQL, SQLAlchemy's execution (its context, cursor and result, through a greenlet) costs
about 90 µs of CPU a statement and asyncpg's own work about 50; on SQLite, SQLAlchemy's cursor
takes three or four trips to aiosqlite's thread, and a statement here takes one. A statement
with Python-side defaults runs through SQLAlchemy; an IN list is expanded as SQLAlchemy expands
it, padded to a length that is a power of two (each length is a statement to prepare). Errors
are SQLAlchemy's either way, so `translate_error` treats both paths alike.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    """`on_asyncpg(asyncpg's connection)`, or on SQLite `on_sqlite(sqlite3's connection)` in one
    trip to aiosqlite's thread, under SQLAlchemy's transaction; errors raised as SQLAlchemy's."""
    try:
        async with adapter._execute_mutex:
            try:
                if conn.dialect.name == "sqlite":
                    driver = adapter._connection
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


def begin_immediate(connection: Any) -> None:
    """`BEGIN IMMEDIATE` on SQLite, in one trip to aiosqlite's thread (SQLAlchemy's cursor takes
    three); from SQLAlchemy's `begin` event, inside its greenlet."""
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


def _row_class(fields: tuple[str, ...]) -> type[Any]:
    """Rows read on the driver: tuples read by position and by attribute, and as SQLAlchemy's rows
    through `_mapping` and `_asdict()`."""
    base = namedtuple("Row", fields)  # type: ignore[misc]
    return type("Row", (base,), {"__slots__": (), "_mapping": property(base._asdict)})


@dataclass(frozen=True, slots=True)
class _Plan:
    sql: str
    compiled: SQLCompiler
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]
    # None: the statement returns no rows.
    results: tuple[Callable[[Any], Any] | None, ...] | None
    row: Callable[[Any], Any] | None
    # An IN list's parameters are expanded for each execution, as SQLAlchemy does: the names of
    # the lists.
    lists: tuple[str, ...] = ()

    @property
    def expanding(self) -> bool:
        return bool(self.lists)

    @classmethod
    def of(cls, conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> _Plan | None:
        """The plan, or None when SQLAlchemy must finish the statement at execution (Python-side
        defaults, literal parameters) or its rows are not namedtuple-shaped."""
        dialect = conn.dialect
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if not isinstance(compiled, SQLCompiler) or (
            compiled.literal_execute_params or compiled.insert_prefetch or compiled.update_prefetch
        ):
            return None
        lists = tuple(param.key for param in compiled.post_compile_params)
        expanding = bool(lists)
        processors = compiled._bind_processors
        binds: list[tuple[str, Callable[[Any], Any] | None]] = []
        for name in () if expanding else compiled.positiontup or ():
            processor = processors.get(name)
            if processor is not None and not callable(processor):
                return None  # a tuple's processors, per element
            binds.append((name, processor))
        columns = compiled._result_columns
        if not columns:
            return cls(compiled.string, compiled, tuple(binds), None, None, lists)
        try:
            row = _row_class(tuple(column[0] for column in columns))._make
        except ValueError:
            return None
        results = tuple(column[3]._cached_result_processor(dialect, None) for column in columns)
        return cls(compiled.string, compiled, tuple(binds), results, row, lists)

    def bind(self, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL and its positional arguments for `params`."""
        if self.lists:
            params = {**params, **{name: _padded(params[name]) for name in self.lists}}
            state = self.compiled.construct_expanded_state(params)
            # The expanded lists' processors, and those of the other parameters, as SQLAlchemy
            # merges them.
            values = state.parameters
            processors: dict[str, Any] = {**self.compiled._bind_processors, **state.processors}
            args = []
            for name in state.positiontup or ():
                processor = processors.get(name)
                args.append(values[name] if processor is None else processor(values[name]))
            return state.statement, args
        values = self.compiled.construct_params(params)
        return self.sql, [values[n] if p is None else p(values[n]) for n, p in self.binds]


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
