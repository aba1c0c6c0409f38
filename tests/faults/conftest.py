"""The fault-injection rig: worker processes, proxies, a load client, and the figures.

Each scenario builds a `Rig`: a fresh PostgreSQL database, its own prefix, a real SMTP server,
an owner with email settings, a channel and an SMTP user, and `smtp-worker run` processes
(real processes, so that they can be killed) whose connections can go through a `Proxy`.
Workers log JSON lines to a file each; the rig reads them, and at the end of the test hands
them to the session's secret scan.

Scenarios that stop or kill a broker do it to private nodes (tests/support/cluster.py): a
three-node cluster started once per session (`rabbit_cluster`, `cluster_rig`), or one node of
a test's own (`private_rig`). No test stops, restarts or reconfigures the shared broker.

Every scenario records its figures with `figure(...)`: printed at once (`pytest -s`), and
repeated in a "fault-injection figures" section of the terminal summary, so CI logs show them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from sqlalchemy import text

from tests.conftest import (
    LOG_LINES,
    SECRET_KEY,
    SECRETS,
    create_database,
    delete_topology,
    drop_database,
    make_settings,
    remember_secrets,
    unique_domain,
)
from tests.support.cluster import PrivateNodes, private_nodes
from tests.support.proxy import Proxy
from tests.support.smtp_servers import SmtpServer
from worker.broker import Names
from worker.config import Settings
from worker.connection import connect_first
from worker.security import Keyring
from worker.store import Store, migrate, owners

FIGURES: list[str] = []
CLI = Path(sys.executable).with_name("smtp-worker")
# Bounds of every wait below: generous, since the machine may be busy with other test runs.
START_TIMEOUT = 60.0


def figure(scenario: str, **values: Any) -> None:
    """Prints one line of a scenario's figures, and keeps it for the terminal summary."""
    line = f"{scenario}: " + ", ".join(f"{key}={value}" for key, value in values.items())
    print(line, flush=True)
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


async def wait_until(predicate: Any, timeout: float, step: float = 0.1) -> bool:
    """Polls `predicate()` until it is true or `timeout` seconds pass; says which."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# --- worker processes -------------------------------------------------------------------------


class WorkerProcess:
    """One `smtp-worker run`, logging JSON lines to a file."""

    def __init__(self, environment: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.environment = environment
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [str(CLI), "run"], env=self.environment, cwd=self.cwd, stdout=log, stderr=log
            )
        self.process = process
        started = await wait_until(
            lambda: self.count("worker.started") >= 1 or process.poll() is not None,
            START_TIMEOUT,
        )
        assert started and process.poll() is None, f"worker did not start:\n{self.tail()}"
        return self

    def lines(self) -> list[dict[str, Any]]:
        parsed = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                parsed.append(json.loads(raw))
            except ValueError:
                parsed.append({"event": "non-json", "line": raw})
        return parsed

    def lines_of(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def count(self, event: str, **fields: Any) -> int:
        return len(self.lines_of(event, **fields))

    def outcomes(self, event: str = "command.processed") -> Counter[str]:
        return Counter(line.get("outcome") for line in self.lines() if line.get("event") == event)

    def processings(self, message_ids: Iterable[str]) -> Counter[str]:
        """How many times the worker processed each of `message_ids` (any outcome)."""
        wanted = set(message_ids)
        return Counter(
            line["message_id"]
            for line in self.lines()
            if line.get("event") == "command.processed" and line.get("message_id") in wanted
        )

    def tail(self, count: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-count:])

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acks, connections dropped by the kernel."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; returns the exit code (None if still running after `timeout`) and seconds."""
        process = self.process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: process.poll() is not None, timeout, step=0.05)
        return process.poll(), time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# --- the load client ----------------------------------------------------------------------------


class Load:
    """An upstream service: publishes commands with confirms and keeps every reply it gets.

    Its reply queue is a named quorum queue, so it survives a broker restart (or, on a cluster,
    the loss of a node) with the replies in it, and its consumer acks each reply: nothing is
    lost on the client's side. Its connection moves to another node as the worker's does.
    """

    def __init__(self, settings: Settings, amqp_url: str | None = None) -> None:
        self.settings = settings
        self.amqp_url = amqp_url or settings.amqp_url
        self.names = Names(settings.prefix)
        # Not `P.…`: the worker refuses to reply to its own queues.
        self.reply_queue_name = f"{settings.prefix}-faults-replies"
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractRobustChannel | None = None

    async def connect(self) -> Load:
        self.connection = await connect_first(self.amqp_url, timeout=START_TIMEOUT)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=500)
        queue = await self.channel.declare_queue(
            self.reply_queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.consume(self._on_reply)
        return self

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        remember_secrets(body)
        self.replies.setdefault(message.correlation_id or "", []).append(body)
        await message.ack()

    async def publish(
        self, type_: str, auth: Any, data: Any, message_id: str, timeout: float = 30
    ) -> None:
        assert self.channel is not None
        body = {"type": type_, "auth": auth, "data": data}
        remember_secrets(body)
        exchange = await self.channel.get_exchange(self.names.commands, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                reply_to=self.reply_queue_name,
            ),
            routing_key=type_,
            timeout=timeout,
        )

    async def publish_many(
        self, commands: Iterable[tuple[str, Any, Any, str]], concurrency: int = 50
    ) -> None:
        """Publishes (type, auth, data, message_id) commands, `concurrency` confirms at a time."""
        pending = list(commands)
        for start in range(0, len(pending), concurrency):
            batch = pending[start : start + concurrency]
            await asyncio.gather(*(self.publish(*command) for command in batch))

    async def publish_steadily(
        self, commands: Iterable[tuple[str, Any, Any, str]], per_second: float, timeout: float
    ) -> int:
        """Publishes commands at about `per_second`, each until the broker confirmed it, as a
        service does while its node goes away: a publish that fails is sent again, with the
        same message_id, once the connection is back. Returns how many publishes failed."""
        failed = 0
        deadline = time.monotonic() + timeout

        async def one(command: tuple[str, Any, Any, str]) -> None:
            nonlocal failed
            while True:
                try:
                    await self.publish(*command, timeout=5)
                    return
                except Exception:
                    failed += 1
                    assert time.monotonic() < deadline, f"{command[3]} never confirmed"
                    await asyncio.sleep(0.5)

        publishes = []
        for command in commands:
            publishes.append(asyncio.create_task(one(command)))
            await asyncio.sleep(1 / per_second)
        await asyncio.gather(*publishes)
        return failed

    async def call(self, type_: str, auth: Any, data: Any, timeout: float = 30) -> dict[str, Any]:
        """One command that must succeed; returns the reply's `data`."""
        message_id = uuid.uuid4().hex
        await self.publish(type_, auth, data, message_id)
        assert await wait_until(lambda: message_id in self.replies, timeout, step=0.02), type_
        reply = self.replies[message_id][0]
        assert reply["status"] == "success", reply
        result: dict[str, Any] = reply["data"]
        return result

    def answered(self, message_ids: Iterable[str]) -> int:
        return sum(1 for message_id in message_ids if message_id in self.replies)

    async def wait_answered(self, message_ids: list[str], count: int, timeout: float) -> bool:
        return await wait_until(lambda: self.answered(message_ids) >= count, timeout)

    async def dead(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Takes every message now in P.dead."""
        assert self.channel is not None
        queue = await self.channel.get_queue(self.names.dead, ensure=False)
        taken = []
        for _ in range(100_000):
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                break
            taken.append(message)
        return taken

    async def dead_letters(
        self, count: int, timeout: float
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Takes what is in P.dead, waiting up to `timeout` for at least `count` messages."""
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout
        while True:
            taken += await self.dead()
            if len(taken) >= count or time.monotonic() > deadline:
                return taken
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self.connection is None:
            return
        channel = await self.connection.channel()
        with contextlib.suppress(Exception):  # the broker went away with the queue
            await channel.queue_delete(self.reply_queue_name)
        await self.connection.close()


# --- the rig ----------------------------------------------------------------------------------


@dataclass
class Rig:
    """One scenario's world; see the module docstring."""

    amqp_url: str
    database_url: str
    settings: Settings
    tmp_path: Path
    smtp: SmtpServer
    store: Store
    load: Load = field(init=False)
    auth: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    proxies: list[Proxy] = field(default_factory=list)

    def use_retry_delays(self, *delays: float) -> None:
        """RETRY_DELAYS of the workers started from now on."""
        self.settings = self.settings.model_copy(update={"retry_delays": delays})

    def replies_of(self, message_ids: list[str]) -> dict[str, str]:
        """The SID each message_id got; asserts every reply of one message_id is one success."""
        sids = {}
        for message_id in message_ids:
            replies = self.load.replies[message_id]
            assert {r["status"] for r in replies} == {"success"}, replies
            assert len({r["data"]["sid"] for r in replies}) == 1, replies
            sids[message_id] = replies[0]["data"]["sid"]
        return sids

    def proxy(self, target_port: int) -> Proxy:
        proxy = Proxy(target_port).start()
        self.proxies.append(proxy)
        return proxy

    def worker_environment(self, **overrides: str) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_WORKER_")}
        environment |= {
            "SMTP_WORKER_AMQP_URL": self.settings.amqp_url,
            "SMTP_WORKER_DATABASE_URL": self.database_url,
            "SMTP_WORKER_SECRET_KEY": SECRET_KEY,
            "SMTP_WORKER_PREFIX": self.settings.prefix,
            "SMTP_WORKER_RETRY_DELAYS": ",".join(str(d) for d in self.settings.retry_delays),
            "SMTP_WORKER_LOG_LEVEL": "INFO",
            "SMTP_WORKER_LOG_FORMAT": "json",
            "SMTP_WORKER_RELAY_ALLOW": "127.0.0.0/8",
            "SMTP_WORKER_HTTP": "",
        }
        return environment | {f"SMTP_WORKER_{k.upper()}": v for k, v in overrides.items()}

    async def start_worker(self, **overrides: str) -> WorkerProcess:
        """A new `smtp-worker run`; `overrides` are settings, e.g. amqp_url=..., prefetch="64"."""
        log_path = self.tmp_path / f"worker-{len(self.workers) + 1}.log"
        worker = WorkerProcess(self.worker_environment(**overrides), log_path, self.tmp_path)
        self.workers.append(worker)
        return await worker.start()

    async def new_owner(self) -> dict[str, str]:
        """A new owner, written to the store as `smtp-worker owner create` does."""
        async with self.store.transaction() as conn:
            owner_id, token = await owners.create(
                conn, Keyring(SECRET_KEY), "faults", datetime.now(UTC)
            )
        SECRETS.add(token)
        return {"owner_id": owner_id, "token": token}

    async def setup_tenant(self, smtp_port: int | None = None) -> None:
        """An owner, email settings for a domain relayed to `smtp_port`, channel `ops`, a user."""
        owner = await self.new_owner()
        domain = unique_domain()
        options = {"host": "127.0.0.1", "port": smtp_port or self.smtp.port, "timeout": 5}
        await self.load.call(
            "settings.email.create",
            owner,
            {"domain": domain, "provider": "smtp", "from": f"Alerts <alerts@{domain}>"}
            | {"options": options},
        )
        recipients = ["oncall@example.com"]
        await self.load.call(
            "settings.channel.put",
            owner,
            {"name": "ops", "domain": domain, "recipients": recipients},
        )
        user = await self.load.call(
            "settings.smtp_user.add", owner, {"total_limit": 1_000_000, "hourly_limit": 1_000_000}
        )
        self.auth = {"login": user["smtp_user_name"], "password": user["smtp_password"]}

    def tickets(self, count: int, tag: str) -> list[tuple[str, Any, Any, str]]:
        """`count` ticket.new commands, each with its message_id `tag-0000`, `tag-0001`, ..."""
        return [
            (
                "ticket.new",
                self.auth,
                {"channel": "ops", "ticket": {"title": f"{tag} {i}", "body": "load"}},
                f"{tag}-{i:04d}",
            )
            for i in range(count)
        ]

    async def query(self, sql: str, **params: Any) -> list[Any]:
        """Reads (or breaks) the store directly, as an operator would."""
        async with self.store.transaction() as conn:
            result = await conn.execute(text(sql), params)
            return list(result) if result.returns_rows else []

    def emails_by_sid(self) -> Counter[str]:
        """How many times the SMTP server received each ticket's email."""
        return Counter(str(m.message["X-Ticket-SID"]) for m in self.smtp.messages)

    async def wait_emails(self, sids: set[str], timeout: float) -> bool:
        return await wait_until(lambda: sids <= set(self.emails_by_sid()), timeout, step=0.2)


@contextlib.asynccontextmanager
async def build_rig(
    amqp_url: str, postgres_admin_url: str, tmp_path: Path, load_url: str | None = None
) -> AsyncIterator[Rig]:
    """A scenario's world on the broker at `amqp_url` (one URL, or a cluster's nodes separated
    by commas); the load client connects to `load_url` when given."""
    database_url = await create_database(postgres_admin_url)
    store = Store(database_url)
    # A 5 s first delay also paces the look-again of an email another worker holds (its lease).
    settings = make_settings(amqp_url, database_url, retry_delays=(5.0,))
    smtp = await SmtpServer().__aenter__()
    world = Rig(amqp_url, database_url, settings, tmp_path, smtp, store)
    world.load = Load(settings, load_url)
    try:
        await migrate(store)
        await world.load.connect()
        yield world
    finally:
        for worker in world.workers:
            await asyncio.to_thread(worker.stop)
            LOG_LINES.extend(worker.log_path.read_text(errors="replace").splitlines())
        await world.load.close()
        for proxy in world.proxies:
            proxy.close()
        await smtp.__aexit__()
        await store.close()
        await delete_topology(amqp_url, world.settings)
        await drop_database(postgres_admin_url, database_url)


@pytest.fixture
async def rig(amqp_url: str, postgres_admin_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with build_rig(amqp_url, postgres_admin_url, tmp_path) as world:
        yield world


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNodes]:
    """Three private RabbitMQ nodes in one cluster, for the whole session (~30 s to start)."""
    with private_nodes(tmp_path_factory.mktemp("rabbit-cluster"), 3) as nodes:
        yield nodes


@pytest.fixture
async def cluster_rig(
    rabbit_cluster: PrivateNodes, postgres_admin_url: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    """A rig on the private cluster: workers list the nodes first to last, the load client last
    to first (so it starts on another node than a worker started first)."""
    await asyncio.to_thread(rabbit_cluster.ensure_running)
    urls = rabbit_cluster.urls
    async with build_rig(
        ",".join(urls), postgres_admin_url, tmp_path, load_url=",".join(reversed(urls))
    ) as world:
        yield world


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[PrivateNodes]:
    """One private RabbitMQ node of the test's own (~10 s to start)."""
    with private_nodes(tmp_path / "rabbit", 1) as nodes:
        yield nodes
