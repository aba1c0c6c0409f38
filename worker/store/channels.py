"""Channels: where an owner's tickets are sent (a domain with email settings, recipients)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store import hot
from worker.store.tables import channels, email_settings

_OWN = select(channels).where(
    channels.c.owner_id == bindparam("owner_id"), channels.c.name == bindparam("name")
)
# Built once, with bound parameters: read by every ticket.new and hit.new.
_WITH_SETTINGS = (
    select(channels, email_settings.c.id.label("settings_id"))
    .outerjoin(
        email_settings,
        and_(
            email_settings.c.domain == channels.c.domain,
            email_settings.c.owner_id == channels.c.owner_id,
        ),
    )
    .where(channels.c.owner_id == bindparam("owner_id"), channels.c.name == bindparam("name"))
)


async def own(conn: AsyncConnection, owner_id: str, name: str) -> Row[Any] | None:
    return await hot.first(conn, _OWN, {"owner_id": owner_id, "name": name})


async def with_settings(conn: AsyncConnection, owner_id: str, name: str) -> Row[Any] | None:
    """The channel, and as `settings_id` its domain's settings of the same owner (None if none)."""
    return await hot.first(conn, _WITH_SETTINGS, {"owner_id": owner_id, "name": name})


async def subject_prefix(conn: AsyncConnection, owner_id: str, name: str) -> str | None:
    query = select(channels.c.subject_prefix).where(
        channels.c.owner_id == owner_id, channels.c.name == name
    )
    return await conn.scalar(query)


async def names_on_domain(conn: AsyncConnection, owner_id: str, domain: str) -> list[str]:
    """The names of the owner's channels that send through `domain`, sorted."""
    query = select(channels.c.name).where(
        channels.c.owner_id == owner_id, channels.c.domain == domain
    )
    return sorted(await conn.scalars(query))


async def of_owner(conn: AsyncConnection, owner_id: str) -> Sequence[Row[Any]]:
    query = select(channels).where(channels.c.owner_id == owner_id).order_by(channels.c.name)
    return (await conn.execute(query)).all()


async def put(
    conn: AsyncConnection, owner_id: str, name: str, values: dict[str, Any], now: datetime
) -> datetime:
    """Creates the channel or updates it with `values`; returns its created_at."""
    created_at: datetime | None = await conn.scalar(
        select(channels.c.created_at).where(
            channels.c.owner_id == owner_id, channels.c.name == name
        )
    )
    if created_at is None:
        await conn.execute(
            insert(channels).values(owner_id=owner_id, name=name, created_at=now, **values)
        )
        return now
    await conn.execute(
        update(channels)
        .where(channels.c.owner_id == owner_id, channels.c.name == name)
        .values(**values)
    )
    return created_at


async def remove(conn: AsyncConnection, owner_id: str, name: str) -> None:
    await conn.execute(
        delete(channels).where(channels.c.owner_id == owner_id, channels.c.name == name)
    )
