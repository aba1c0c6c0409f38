"""Owners (tenants) are made by an operator, not by a command: `smtp-worker owner create`."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.security import Keyring
from worker.store import Store, migrate, owners


async def create_owner(store: Store, keyring: Keyring, name: str) -> tuple[str, str]:
    """A new owner in `store` (migrated first); returns its id and its token, shown only here."""
    await migrate(store)
    async with store.transaction() as conn:
        return await owners.create(conn, keyring, name, datetime.now(UTC))
