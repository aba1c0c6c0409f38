"""The store's translation of database errors: an outage is StoreUnavailable, waited out.

A command that meets StoreUnavailable backs off and tries again in-process; any error the store
does not recognise is a bug, requeued at once, and burns the message's delivery attempts.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from worker.errors import StoreUnavailable
from worker.store import Store


@pytest.fixture
async def refused_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A URL whose role may open no connection: PostgreSQL answers "too many connections"."""
    role = f"smtpw_limited_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0'))
    try:
        scheme, _, rest = postgres_admin_url.partition("://")
        yield f"{scheme}://{role}@{rest.rpartition('@')[2]}"
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP ROLE "{role}"'))
        await admin.dispose()


async def test_too_many_connections_is_a_store_outage(refused_url: str):
    store = Store(refused_url)
    try:
        with pytest.raises(StoreUnavailable):
            async with store.transaction() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await store.close()
