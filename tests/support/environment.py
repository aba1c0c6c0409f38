"""A test's environment: its settings (a prefix of its own), workers in this process, the client,
and the store to read directly; built and torn down by `running_env`."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from tests.support.broker import delete_prefix
from tests.support.client import Client
from tests.support.logs import SECRET_KEY
from tests.support.tenants import new_owner
from worker.app import Worker
from worker.config import Settings
from worker.store import Store

ALL_QUEUES = ("tickets", "hits", "settings", "deliveries")


def make_settings(amqp_url: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "secret_key": SECRET_KEY,
        "prefix": f"t{uuid.uuid4().hex[:10]}",
        "retry_delays": (0.2, 0.4),
        "shutdown_grace": 10,
        # The tests' relays listen on this machine, which the relay address policy denies.
        "relay_allow": "127.0.0.0/8",
        "http": "",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Env:
    """One test's world: a worker (or several), a client, and a way to make owners."""

    amqp_url: str
    database_url: str
    settings: Settings
    client: Client = field(default=None)  # type: ignore[assignment] # None until connected
    workers: list[Worker] = field(default_factory=list)
    _store: Store | None = None

    @property
    def store(self) -> Store:
        """One engine for the test's own reads and writes (owners, queries)."""
        if self._store is None:
            self._store = Store(self.database_url)
        return self._store

    async def start_worker(self, **overrides: Any) -> Worker:
        queues = overrides.pop("queues", ALL_QUEUES)
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        worker = Worker(settings, queues)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def connect(self) -> Client:
        """The client, connected to the test's prefix."""
        self.client = await Client.connect(self.settings)
        return self.client

    async def new_owner(self, name: str = "acme") -> dict[str, str]:
        """A new owner, written to the store as `smtp-worker owner create` does."""
        return await new_owner(self.store, name)

    async def query(self, sql: str, **params: Any) -> list[Any]:
        """Reads the store directly, as an operator would."""
        async with self.store.transaction() as conn:
            return list(await conn.execute(text(sql), params))

    async def close(self) -> None:
        """Closes the client, stops the workers, closes the store, deletes the topology."""
        if self.client is not None:
            await self.client.close()
        for worker in self.workers:
            await worker.stop()
        if self._store is not None:
            await self._store.close()
        await delete_prefix(self.amqp_url, self.settings)


@contextlib.asynccontextmanager
async def running_env(
    amqp_url: str,
    database_url: str,
    *,
    workers: int = 1,
    queues: Sequence[str] = ALL_QUEUES,
    connect: bool = True,
    settings: Settings | None = None,
) -> AsyncIterator[Env]:
    """An Env on its own prefix (or `settings`'), with `workers` workers consuming `queues`,
    and its client connected unless `connect` is false; all of it gone afterwards."""
    env = Env(amqp_url, database_url, settings or make_settings(amqp_url, database_url))
    try:
        for _ in range(workers):
            await env.start_worker(queues=tuple(queues))
        if connect:
            await env.connect()
        yield env
    finally:
        await env.close()
