"""Owners (tenants): made by an operator (`smtp-worker owner create`), read to authenticate."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.security import Keyring, new_id, new_token
from worker.store.tables import owners

_TOKEN_HASH = select(owners.c.token_hash).where(owners.c.id == bindparam("owner_id"))


async def create(
    conn: AsyncConnection, keyring: Keyring, name: str, now: datetime
) -> tuple[str, str]:
    """A new owner; returns its id and its token, which is stored only as a hash."""
    owner_id, token = new_id(), new_token()
    await conn.execute(
        insert(owners).values(
            id=owner_id, name=name, token_hash=keyring.hash(token), created_at=now
        )
    )
    return owner_id, token


async def token_hash(conn: AsyncConnection, owner_id: str) -> str | None:
    return await conn.scalar(_TOKEN_HASH, {"owner_id": owner_id})
