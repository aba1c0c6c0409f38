"""Fixtures: real RabbitMQ, real PostgreSQL and SQLite, workers in-process, a broker client.

Services come from environment variables when given (`.ci/run` sets them):
    SMTP_WORKER_TEST_AMQP_URL       amqp://guest:guest@127.0.0.1:5672/
    SMTP_WORKER_TEST_POSTGRES_URL   postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
Otherwise testcontainers starts them when a Docker engine answers, and the tests that need them
are skipped when none does. Every test gets its own exchange prefix; every session its own
databases. Every secret the tests see is collected, and at the end of the run the captured logs
and every event received are searched for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from sqlalchemy import text

from tests.support.databases import create_database, drop_database
from worker import logs
from worker.app import Worker
from worker.broker import PARK_DELAYS, Names
from worker.config import Settings
from worker.connection import open_first
from worker.security import Keyring
from worker.store import Store, owners

PARKED = ("deliveries", "probes")  # the queues whose jobs wait in delay queues when parked
SECRET_KEY = "test-secret-key-" + secrets.token_hex(8)
SECRETS: set[str] = {SECRET_KEY}
LOG_LINES: list[str] = []
EVENT_BODIES: list[bytes] = []


# --- services ---------------------------------------------------------------------------------


def _docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("SMTP_WORKER_TEST_AMQP_URL")
    if url:
        yield url
        return
    if not _docker_answers():
        pytest.skip("no RabbitMQ: set SMTP_WORKER_TEST_AMQP_URL or run a Docker engine")
    from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415

    with RabbitMqContainer("rabbitmq:3.13") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("SMTP_WORKER_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not _docker_answers():
        pytest.skip("no PostgreSQL: set SMTP_WORKER_TEST_POSTGRES_URL or run a Docker engine")
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

    with PostgresContainer("postgres:16", driver="asyncpg") as container:
        yield container.get_connection_url()


@pytest.fixture(scope="session")
async def postgres_url(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url)
    yield url
    await drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('store') / 'smtp-worker.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The store a test runs on: each test that uses it runs once on each."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


# --- logs and secrets ---------------------------------------------------------------------------


class _CaptureLogger:
    def msg(self, message: str) -> None:
        LOG_LINES.append(message)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


@pytest.fixture(scope="session", autouse=True)
def captured_logs() -> Iterator[list[str]]:
    """The worker's real log pipeline (redaction included), rendered to a list."""
    logs.configure("DEBUG", "json")
    structlog.configure(logger_factory=lambda *_: _CaptureLogger(), cache_logger_on_first_use=False)
    yield LOG_LINES
    leaked = sorted(
        {s for s in SECRETS if any(s in line for line in LOG_LINES)}
        | {s for s in SECRETS if any(s.encode() in body for body in EVENT_BODIES)}
    )
    assert not leaked, f"{len(leaked)} secrets reached a log line or an event"


def remember_secrets(value: Any) -> None:
    """Collects every secret-looking value of a request or reply, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in {"token", "password", "smtp_password", "pass"} and isinstance(item, str):
                if item != "********":
                    SECRETS.add(item)
            else:
                remember_secrets(item)
    elif isinstance(value, list):
        for item in value:
            remember_secrets(item)


# --- the worker and its client ------------------------------------------------------------------


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
class Client:
    """What an upstream service sees: publish commands, read replies, events and P.dead."""

    settings: Settings
    connection: aio_pika.abc.AbstractRobustConnection
    channel: aio_pika.abc.AbstractChannel
    reply_queue: aio_pika.abc.AbstractQueue
    events_queue: aio_pika.abc.AbstractQueue
    replies: dict[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]] = field(
        default_factory=dict
    )
    events: list[dict[str, Any]] = field(default_factory=list)
    orphan_replies: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.settings.prefix)

    @classmethod
    async def connect(cls, settings: Settings) -> Client:
        connection = await aio_pika.connect_robust(settings.amqp_url)
        channel = await connection.channel()
        names = Names(settings.prefix)
        events_exchange = await channel.declare_exchange(
            names.events, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # Not a server-named `amq.gen-…` queue, nor a `P.…` one: the worker refuses to reply there.
        reply_queue = await channel.declare_queue(
            f"{settings.prefix}-replies-{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        events_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await events_queue.bind(events_exchange, "#")
        client = cls(settings, connection, channel, reply_queue, events_queue)
        await reply_queue.consume(client._on_reply, no_ack=True)
        await events_queue.consume(client._on_event, no_ack=True)
        return client

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)
        else:
            self.orphan_replies.append(message)

    async def _on_event(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        EVENT_BODIES.append(message.body)
        self.events.append(json.loads(message.body))

    async def publish(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply: bool = True,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[aio_pika.abc.AbstractIncomingMessage] | None:
        """Publishes raw bytes to P.commands; returns the future of the reply."""
        correlation_id = correlation_id or message_id or uuid.uuid4().hex
        future: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] | None = None
        if reply:
            future = asyncio.get_running_loop().create_future()
            self.replies[correlation_id] = future
        exchange = await self.channel.get_exchange(self.names.commands, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self.reply_queue.name if reply else None,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers=headers,
            ),
            routing_key=routing_key,
        )
        return future

    async def call_raw(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_id: str | None = None,
        timeout: float = 20,
    ) -> aio_pika.abc.AbstractIncomingMessage:
        future = await self.publish(body, routing_key, message_id=message_id)
        assert future is not None
        return await asyncio.wait_for(future, timeout)

    async def call(
        self,
        type_: str,
        auth: Any,
        data: Any = None,
        *,
        message_id: str | None = None,
        timeout: float = 20,
    ) -> dict[str, Any]:
        """Sends one command and returns its reply body."""
        body: dict[str, Any] = {"type": type_, "auth": auth}
        if data is not None:
            body["data"] = data
        remember_secrets(body)
        message = await self.call_raw(
            json.dumps(body).encode(), type_, message_id=message_id, timeout=timeout
        )
        reply: dict[str, Any] = json.loads(message.body)
        remember_secrets(reply)
        return reply

    async def ok(self, type_: str, auth: Any, data: Any = None, **kw: Any) -> dict[str, Any]:
        """Sends one command that must succeed, and returns the reply's `data`."""
        reply = await self.call(type_, auth, data, **kw)
        assert reply["status"] == "success", reply
        result: dict[str, Any] = reply["data"]
        return result

    async def dead_letters(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Takes every message now in P.dead."""
        queue = await self.channel.get_queue(self.names.dead, ensure=False)
        taken = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken

    async def wait_events(
        self, type_: str, count: int = 1, timeout: float = 10
    ) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [e for e in self.events if e["type"] == type_]
            if len(found) >= count or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.connection.close()


async def delete_topology(amqp_url: str, settings: Settings) -> None:
    """Removes every queue and exchange of a test's prefix."""
    names = Names(settings.prefix)
    connection = await open_first(amqp_url)
    try:
        queues = [names.queue(q) for q in ("tickets", "hits", "settings", "dead", "unrouted")]
        queues += [names.deliveries] + [names.delay(d) for d in settings.retry_delays]
        queues += [names.probes] + [names.delay(d, q) for d in PARK_DELAYS for q in PARKED]
        # A failed delete closes its channel, so each gets a channel of its own.
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):  # the queue never existed
                await channel.queue_delete(name)
        for name in (names.commands, names.events, names.dead, names.unrouted):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


@dataclass
class Env:
    """One test's world: a worker (or several), a client, and a way to make owners."""

    amqp_url: str
    database_url: str
    settings: Settings
    client: Client
    workers: list[Worker] = field(default_factory=list)
    _store: Store | None = None

    @property
    def store(self) -> Store:
        """One engine for the test's own reads and writes (owners, queries)."""
        if self._store is None:
            self._store = Store(self.database_url)
        return self._store

    async def start_worker(self, **overrides: Any) -> Worker:
        queues = overrides.pop("queues", ("tickets", "hits", "settings", "deliveries"))
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        worker = Worker(settings, queues)
        await worker.start()
        self.workers.append(worker)
        return worker

    async def new_owner(self, name: str = "acme") -> dict[str, str]:
        """A new owner, written to the store as `smtp-worker owner create` does."""
        async with self.store.transaction() as conn:
            owner_id, token = await owners.create(
                conn, Keyring(SECRET_KEY), name, datetime.now(UTC)
            )
        SECRETS.add(token)
        return {"owner_id": owner_id, "token": token}

    async def query(self, sql: str, **params: Any) -> list[Any]:
        """Reads the store directly, as an operator would."""
        async with self.store.transaction() as conn:
            return list(await conn.execute(text(sql), params))


@pytest.fixture
async def env(amqp_url: str, database_url: str) -> AsyncIterator[Env]:
    """A started worker on its own prefix, over the parametrized store."""
    settings = make_settings(amqp_url, database_url)
    world = Env(amqp_url, database_url, settings, client=None)  # type: ignore[arg-type]
    await world.start_worker()
    world.client = await Client.connect(settings)
    yield world
    await world.client.close()
    for worker in world.workers:
        await worker.stop()
    if world._store is not None:
        await world._store.close()
    await delete_topology(amqp_url, settings)


def unique_domain() -> str:
    return f"d{uuid.uuid4().hex[:12]}.example.com"


@pytest.fixture
def domain() -> str:
    return unique_domain()


ROOT = Path(__file__).resolve().parents[1]
