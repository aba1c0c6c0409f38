"""Owners (tenants) are made by an operator, not by a command: `smtp-worker owner create`."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert

from worker.security import Keyring, new_id, new_token
from worker.store import Store, migrate
from worker.store.tables import owners


async def create_owner(store: Store, keyring: Keyring, name: str) -> tuple[str, str]:
    """A new owner in `store` (migrated first); returns its id and its token, shown only here."""
    owner_id, token = new_id(), new_token()
    await migrate(store)
    async with store.transaction() as conn:
        await conn.execute(
            insert(owners).values(
                id=owner_id,
                name=name,
                token_hash=keyring.hash(token),
                created_at=datetime.now(UTC),
            )
        )
    return owner_id, token
