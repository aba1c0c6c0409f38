"""Tickets and their hits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from worker.store import hot
from worker.store.tables import hits, tickets

# A ticket keeps its latest HITS_KEPT hits. Pruning on every new hit deletes at most the one that
# fell out, found through the primary key (sid, seq).
HITS_KEPT = 10_000

# The hot statements are built once, with bound parameters: SQLAlchemy then neither constructs
# nor keys them again for every command.
_OPEN_BY_DEDUP_KEY = select(tickets).where(
    tickets.c.owner_id == bindparam("owner"),
    tickets.c.channel == bindparam("channel"),
    tickets.c.dedup_key == bindparam("dedup_key"),
    tickets.c.status != "closed",
)
_NEW_TICKET = insert(tickets)
_DELIVERY_PENDING = (
    update(tickets)
    .where(tickets.c.sid == bindparam("ticket_sid"))
    .values(delivery_status="pending", delivery_attempts=0, delivery_last_error=None)
)
_COUNT_HIT = (
    update(tickets)
    .where(tickets.c.sid == bindparam("ticket_sid"))
    .values(
        hit_count=tickets.c.hit_count + 1,
        last_hit_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .returning(tickets.c.hit_count)
)
_NEW_HIT = insert(hits)
_PRUNE_HITS = delete(hits).where(
    hits.c.sid == bindparam("sid"), hits.c.seq <= bindparam("oldest_gone")
)
_DELIVERY = (
    update(tickets)
    .where(tickets.c.sid == bindparam("ticket_sid"))
    .values(
        {f"delivery_{key}": bindparam(f"new_{key}") for key in ("status", "attempts", "last_error")}
    )
)


async def own(conn: AsyncConnection, owner_id: str, sids: Iterable[str]) -> dict[str, Row[Any]]:
    """The owner's tickets among `sids`, by sid (the missing ones are not in it)."""
    query = select(tickets).where(tickets.c.owner_id == owner_id, tickets.c.sid.in_(list(sids)))
    return {row.sid: row for row in await conn.execute(query)}


async def get(conn: AsyncConnection, sid: str) -> Row[Any]:
    return (await conn.execute(select(tickets).where(tickets.c.sid == sid))).one()


async def open_by_dedup_key(
    conn: AsyncConnection, owner_id: str, channel: str, dedup_key: str
) -> Row[Any] | None:
    """The open ticket of the channel with this dedup key (the unique index allows one)."""
    params = {"owner": owner_id, "channel": channel, "dedup_key": dedup_key}
    return await hot.first(conn, _OPEN_BY_DEDUP_KEY, params)


async def add(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await hot.rowcount(conn, _NEW_TICKET, values)


async def close(conn: AsyncConnection, sids: list[str], comment: str | None, now: datetime) -> None:
    await conn.execute(
        update(tickets)
        .where(tickets.c.sid.in_(sids))
        .values(status="closed", closed_at=now, updated_at=now, comment=comment)
    )


async def set_status(conn: AsyncConnection, sids: list[str], status: str, now: datetime) -> None:
    """Acknowledges or unacknowledges the tickets among `sids` that are not closed."""
    await conn.execute(
        update(tickets)
        .where(and_(tickets.c.sid.in_(sids), tickets.c.status != "closed"))
        .values(status=status, updated_at=now)
    )


async def delivery_pending(conn: AsyncConnection, sid: str) -> None:
    """The ticket's `delivery` reset for a new email."""
    await hot.rowcount(conn, _DELIVERY_PENDING, {"ticket_sid": sid})


async def set_delivery(
    conn: AsyncConnection, states: Sequence[tuple[str, str, int, str | None]]
) -> None:
    """Each (sid, status, attempts, error)'s ticket `delivery`, mirroring its latest email's
    state, in one statement, in the order given."""
    params = [
        {"ticket_sid": sid, "new_status": status, "new_attempts": attempts, "new_last_error": error}
        for sid, status, attempts, error in states
    ]
    await hot.execute_many(conn, _DELIVERY, params)


# --- hits ---------------------------------------------------------------------------------------


async def add_hit(
    conn: AsyncConnection, sid: str, summary: str, body: str | None, now: datetime
) -> int:
    """Appends a hit to the ticket, counted on it; returns its seq. The oldest hit past
    HITS_KEPT goes."""
    seq = await hot.scalar(conn, _COUNT_HIT, {"ticket_sid": sid, "now": now})
    assert seq is not None
    await hot.rowcount(
        conn,
        _NEW_HIT,
        {"sid": sid, "seq": seq, "summary": summary, "body": body, "created_at": now},
    )
    if seq > HITS_KEPT:
        await hot.rowcount(conn, _PRUNE_HITS, {"sid": sid, "oldest_gone": seq - HITS_KEPT})
    return int(seq)


async def get_hit(conn: AsyncConnection, sid: str, seq: int) -> Row[Any]:
    return (await conn.execute(select(hits).where(hits.c.sid == sid, hits.c.seq == seq))).one()


class octet_length(FunctionElement[int]):  # noqa: N801 (named as the SQL function)
    """The length of a text in bytes of UTF-8: `octet_length`, which SQLite lacks before 3.43."""

    type = BigInteger()
    inherit_cache = True


@compiles(octet_length)
def _octet_length(element: octet_length, compiler: SQLCompiler, **kw: Any) -> str:
    return f"octet_length({compiler.process(element.clauses, **kw)})"


@compiles(octet_length, "sqlite")
def _octet_length_sqlite(element: octet_length, compiler: SQLCompiler, **kw: Any) -> str:
    return f"length(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


_AFTER = bindparam("after", type_=BigInteger)  # after_seq may pass what the seq column holds
_HIT_SIZES = (
    select(
        hits.c.seq,
        (octet_length(hits.c.summary) + func.coalesce(octet_length(hits.c.body), 0)).label("size"),
    )
    .where(hits.c.sid == bindparam("sid"), hits.c.seq > _AFTER)
    .order_by(hits.c.seq)
    .limit(bindparam("limit"))
)
_HITS_BETWEEN = (
    select(hits)
    .where(hits.c.sid == bindparam("sid"), hits.c.seq > _AFTER, hits.c.seq <= bindparam("last"))
    .order_by(hits.c.seq)
)


async def hit_sizes(conn: AsyncConnection, sid: str, after: int, limit: int) -> Sequence[Row[Any]]:
    """The seq and the UTF-8 bytes of summary and body (`size`) of the first `limit` hits after
    `after` (PostgreSQL knows a stored text's length without reading it)."""
    params = {"sid": sid, "after": after, "limit": limit}
    return (await conn.execute(_HIT_SIZES, params)).all()


async def hits_between(
    conn: AsyncConnection, sid: str, after: int, last: int
) -> Sequence[Row[Any]]:
    """The hits after `after`, up to `last` included, in order."""
    return (await conn.execute(_HITS_BETWEEN, {"sid": sid, "after": after, "last": last})).all()
