"""Email settings: one relay configuration per domain, owned by one owner."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store.tables import email_settings

Lock = Literal["share", "update"] | None

_OWN = select(email_settings).where(
    email_settings.c.domain == bindparam("domain"),
    email_settings.c.owner_id == bindparam("owner_id"),
)


async def own(
    conn: AsyncConnection, owner_id: str, domain: str, lock: Lock = None
) -> Row[Any] | None:
    """The owner's settings of `domain`; `lock` takes its row lock (PostgreSQL; SQLite has one
    writer at a time anyway) until the transaction ends."""
    query = _OWN if lock is None else _OWN.with_for_update(read=lock == "share")
    return (await conn.execute(query, {"domain": domain, "owner_id": owner_id})).first()


async def domain_taken(conn: AsyncConnection, domain: str) -> bool:
    """Whether any owner has settings for `domain`."""
    query = select(email_settings.c.id).where(email_settings.c.domain == domain)
    return await conn.scalar(query) is not None


async def add(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(email_settings).values(**values))


async def change(conn: AsyncConnection, settings_id: str, values: dict[str, Any]) -> None:
    await conn.execute(
        update(email_settings).where(email_settings.c.id == settings_id).values(**values)
    )


async def remove(conn: AsyncConnection, settings_id: str) -> None:
    await conn.execute(delete(email_settings).where(email_settings.c.id == settings_id))
