"""The statements every command runs, and a batch's savepoints, at less than half of SQLAlchemy's
cost per statement on PostgreSQL.

SQLAlchemy compiles each statement once, as ever: its SQL, the order of its parameters, its types'
processing. On PostgreSQL the statement then runs straight on the asyncpg connection under the
transaction: SQLAlchemy's execution (its context, cursor and result, through a greenlet) costs
about 90 µs of CPU a statement, and asyncpg's own work about 50. On SQLite, and for a statement
SQLAlchemy must finish at execution (expanding IN lists, Python-side defaults), it runs through
SQLAlchemy. Errors are SQLAlchemy's either way, so `translate_error` treats both paths alike.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Executable

__all__ = ["Savepoints", "Statement", "first", "on_driver", "rowcount", "rows", "scalar"]

# A statement built once, with bound parameters.
Statement = Executable

_ROWCOUNT = re.compile(r"(?:SELECT|UPDATE|DELETE|INSERT \d+) (\d+)")


def _driver(conn: AsyncConnection) -> Any:
    """SQLAlchemy's adapter of the asyncpg connection under `conn`, or None: on SQLite, or when
    SQLAlchemy's internals are not the ones this module knows."""
    if conn.dialect.name != "postgresql" or not conn.in_transaction():
        # Outside SQLAlchemy's transaction, asyncpg's would be one SQLAlchemy never commits.
        return None
    fairy = getattr(conn.sync_connection, "_dbapi_connection", None)
    adapter = getattr(fairy, "dbapi_connection", None)
    if all(hasattr(adapter, a) for a in ("_connection", "_transaction", "_start_transaction")):
        return adapter
    return None


def _row_class(fields: tuple[str, ...]) -> type[Any]:
    """Rows read on asyncpg: tuples read by position and by attribute, and as SQLAlchemy's rows
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

    @classmethod
    def of(cls, conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> _Plan | None:
        """The plan, or None when SQLAlchemy must finish the statement at execution (expanding IN
        lists, Python-side defaults) or its rows are not namedtuple-shaped."""
        dialect = conn.dialect
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if not isinstance(compiled, SQLCompiler) or (
            compiled.literal_execute_params
            or compiled.post_compile_params
            or compiled.insert_prefetch
            or compiled.update_prefetch
        ):
            return None
        processors = compiled._bind_processors
        binds: list[tuple[str, Callable[[Any], Any] | None]] = []
        for name in compiled.positiontup or ():
            processor = processors.get(name)
            if processor is not None and not callable(processor):
                return None  # a tuple's processors, per element
            binds.append((name, processor))
        columns = compiled._result_columns
        if not columns:
            return cls(compiled.string, compiled, tuple(binds), None, None)
        try:
            row = _row_class(tuple(column[0] for column in columns))._make
        except ValueError:
            return None
        results = tuple(column[3]._cached_result_processor(dialect, None) for column in columns)
        return cls(compiled.string, compiled, tuple(binds), results, row)


# Per statement and the parameter names it is given (an INSERT compiles to the columns given);
# the statements are the store's, built once at import, and every PostgreSQL engine of the process
# is created alike (Store), so their plans are shared.
_plans: dict[tuple[int, tuple[str, ...]], tuple[Statement, _Plan | None]] = {}


def _plan(conn: AsyncConnection, statement: Statement, keys: tuple[str, ...]) -> _Plan | None:
    key = (id(statement), keys)
    known = _plans.get(key)
    if known is None or known[0] is not statement:
        known = (statement, _Plan.of(conn, statement, keys))
        _plans[key] = known
    return known[1]


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
    values = plan.compiled.construct_params(params)
    args = [values[name] if p is None else p(values[name]) for name, p in plan.binds]
    records: list[Any] | None = None
    try:
        async with adapter._execute_mutex:
            if adapter._transaction is None:
                await adapter._start_transaction()
            try:
                # Both use asyncpg's cache of prepared statements.
                if plan.results is None:
                    status = await adapter._connection.execute(plan.sql, *args)
                else:
                    records = await adapter._connection.fetch(plan.sql, *args)
            except Exception as error:  # noqa: BLE001 - raised as SQLAlchemy would
                adapter._handle_exception(error)
    except Exception as error:
        raise await _as_sqlalchemy(conn, plan.sql, error) from error
    if records is None:
        match = _ROWCOUNT.match(status or "")
        return [], int(match.group(1)) if match else -1
    results, row = plan.results, plan.row
    assert results is not None and row is not None
    if any(results):
        return [
            row([value if p is None else p(value) for p, value in zip(results, r, strict=True)])
            for r in records
        ], len(records)
    return [row(r) for r in records], len(records)


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
    """Every row `statement` returns, with `params` (on asyncpg, rows that read as SQLAlchemy's:
    by position, by attribute, `_mapping`, `_asdict()`)."""
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
        try:
            async with adapter._execute_mutex:
                if adapter._transaction is None:
                    await adapter._start_transaction()
                try:
                    await adapter._connection.execute(sql)
                except Exception as error:  # noqa: BLE001 - raised as SQLAlchemy would
                    adapter._handle_exception(error)
        except Exception as error:
            raise await _as_sqlalchemy(self._conn, sql, error) from error
