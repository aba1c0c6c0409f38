"""Brings the store's schema up to date with Alembic, on the worker's own engine."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from worker.store.db import Store

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant: workers starting together on PostgreSQL take turns to migrate.
_ADVISORY_LOCK = 7_342_001


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(store: Store) -> None:
    async with store.transaction() as conn:
        await conn.run_sync(_upgrade)
