"""The store: one async engine, transactions, and the translation of database errors.

SQLite and PostgreSQL go through one code path. SQLite allows a single writer, so its transactions
are serialised in-process by a lock and across processes by `BEGIN IMMEDIATE` (which waits up to
`busy_timeout` instead of failing when a read transaction would upgrade to a write).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from worker.errors import CommitUnknown, ConcurrentWrite, StoreUnavailable
from worker.store import hot

# What the layers above the store see of SQLAlchemy: a connection in a transaction, and rows.
Connection = AsyncConnection
__all__ = ["Connection", "Row", "Store", "display_url", "ping", "translate_error"]

# PostgreSQL: serialization_failure, deadlock_detected.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# PostgreSQL classes of a server that cannot serve us for now: 08 connection exception,
# 53 insufficient resources ("too many clients already"), 57 operator intervention (shutting
# down, starting up). asyncpg reports them as plain DBAPIErrors, not OperationalErrors.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")


def translate_error(exc: BaseException) -> Exception | None:
    """Our error for a database error, or None when it is not one we know how to treat."""
    if isinstance(exc, IntegrityError):
        return ConcurrentWrite("a concurrent write came first")
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if sqlstate in _RETRYABLE_SQLSTATES:
            return ConcurrentWrite("serialization failure")
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES):
            return StoreUnavailable("the store is unavailable")
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            return StoreUnavailable("the store is unavailable")
    if isinstance(exc, PoolTimeout | OSError | TimeoutError):
        return StoreUnavailable("the store is unavailable")
    # asyncpg raises its own connection errors outside the DBAPI hierarchy when connecting.
    if type(exc).__module__.startswith("asyncpg") and "Connection" in type(exc).__name__:
        return StoreUnavailable("the store is unavailable")
    return None


def _sqlite_setup(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the driver, emit BEGIN (the pysqlite/aiosqlite recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        mode = cursor.fetchone()
        record.info[hot.SQLITE_INLINE] = bool(mode) and str(mode[0]).lower() == "wal"
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={hot.BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        hot.begin_immediate(connection)


# How long a transaction that is not urgent waits at most while urgent ones go first.
PATIENCE = 0.25
# Those waiting for the writer: when each asked, and its turn.
_Line = deque[tuple[float, asyncio.Future[None]]]


class _Writer:
    """SQLite's single writer in this process: one transaction at a time, in the order they
    asked, except that an urgent one goes before those that are not, until one of those has
    waited PATIENCE. The delivery consumer's claims and records are urgent: an email holds one
    of its relay's few turns until its claim commits, and a batch of commands takes far longer
    than a claim (left behind, the emails built up a backlog, which was parked while its relay
    sat idle)."""

    def __init__(self) -> None:
        self._held = False
        # (when it asked, its turn), for the urgent and for the others.
        self._waiting: tuple[_Line, _Line] = (deque(), deque())

    @contextlib.asynccontextmanager
    async def turn(self, *, urgent: bool) -> AsyncIterator[None]:
        if self._held:
            loop = asyncio.get_running_loop()
            granted = loop.create_future()
            line = self._waiting[0 if urgent else 1]
            entry = (loop.time(), granted)
            line.append(entry)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._next()  # granted as it was cancelled: passed on
                else:
                    with contextlib.suppress(ValueError):
                        line.remove(entry)
                raise
        self._held = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        urgent, others = self._waiting
        while others and others[0][1].done():
            others.popleft()
        impatient = bool(others) and asyncio.get_running_loop().time() - others[0][0] >= PATIENCE
        granted = (impatient and self._grant(others)) or self._grant(urgent) or self._grant(others)
        if not granted:
            self._held = False

    @staticmethod
    def _grant(line: _Line) -> bool:
        """Passes the turn, still held, to the first in `line` still waiting, if any."""
        while line:
            _, granted = line.popleft()
            if not granted.done():
                granted.set_result(None)
                return True
        return False


class Store:
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        self._writer: _Writer | None = None
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # One connection is all a single writer needs.
            self.engine = create_async_engine(
                url,
                hide_parameters=True,
                poolclass=AsyncAdaptedQueuePool,
                pool_size=1,
                max_overflow=0,
                # The hot statements run on the event loop's thread, the rest on aiosqlite's
                # (worker.store.hot), one at a time.
                connect_args={"check_same_thread": False},
            )
            _sqlite_setup(self.engine)
            self._writer = _Writer()
        else:
            self.engine = create_async_engine(
                url,
                hide_parameters=True,
                pool_size=10,
                max_overflow=20,
                # Hundreds of prefetched commands share these connections: waiting for one is
                # load, not an outage, so the wait is long before it counts as one.
                pool_timeout=30,
                pool_recycle=1800,
                # A store that goes silent without closing the connection must not hang a
                # command forever: past this, the statement fails and the command is retried.
                # Each statement is prepared once per connection: SQLAlchemy's 100 would be
                # too few for the store's statements, an IN list's in each of its lengths
                # included (powers of two on the hot path, worker.store.hot; any length on
                # SQLAlchemy's), and they would be prepared again and again.
                connect_args={"command_timeout": 30, "prepared_statement_cache_size": 500},
            )
            # The same pool, its connections in autocommit while they are taken (`statements`).
            self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.asynccontextmanager
    async def transaction(self, *, urgent: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction; database errors leave it as StoreUnavailable or ConcurrentWrite.

        CommitUnknown when the store becomes unavailable during COMMIT: it may have committed.
        On SQLite an `urgent` one goes before those waiting that are not (see _Writer).
        """
        writer = self._writer
        lock = contextlib.nullcontext() if writer is None else writer.turn(urgent=urgent)
        committing = False
        try:
            async with lock, self.engine.begin() as conn:
                yield conn
                committing = True
        except Exception as exc:
            ours = translate_error(exc)
            if ours is None:
                raise
            if committing and isinstance(ours, StoreUnavailable):
                ours = CommitUnknown("the store became unavailable during commit")
            raise ours from exc

    @contextlib.asynccontextmanager
    async def statements(self, *, urgent: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection for statements that need no transaction together, each atomic on its own:
        on PostgreSQL each commits as it runs, with no BEGIN and no COMMIT (a round trip each);
        on SQLite they are one transaction, `urgent` as `transaction` takes it (its single
        writer is taken for all of them anyway). Database errors as `transaction` raises them;
        on PostgreSQL an outage is CommitUnknown: the statement under way may have been done."""
        if self._writer is not None:
            async with self.transaction(urgent=urgent) as conn:
                yield conn
            return
        try:
            async with self._autocommit.begin() as conn:
                yield conn
        except Exception as exc:
            ours = translate_error(exc)
            if ours is None:
                raise
            if isinstance(ours, StoreUnavailable):
                # The statement under way may have been done, a write's COMMIT with it.
                ours = CommitUnknown("the store became unavailable during a statement")
            raise ours from exc

    @property
    def writers(self) -> int:
        """How many transactions are worth running at once: SQLite has one writer, so a second
        would only wait for the first one's lock."""
        return 1 if self._writer is not None else 2

    async def close(self) -> None:
        await self.engine.dispose()


async def ping(conn: AsyncConnection) -> None:
    """The cheapest round trip to the store."""
    await conn.execute(text("SELECT 1"))


def display_url(url: str) -> str:
    """The store's URL as it may be shown: without its password."""
    return make_url(url).render_as_string(hide_password=True)
