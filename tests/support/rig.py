"""The fault-injection rig: one scenario's world, and the figures scenarios record.

A `Rig` is a fresh PostgreSQL database, its own prefix, a real SMTP server, an owner with email
settings, a channel and an SMTP user, and `smtp-worker run` processes (real processes, so that
they can be killed) whose connections can go through a `Proxy`. Workers log JSON lines to a file
each; the rig reads them, and at the end of the test hands them to the session's secret scan.

Every scenario records its figures with `figure(...)`: printed at once (`pytest -s`), and kept in
FIGURES for a "fault-injection figures" section of the terminal summary, so CI logs show them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika.abc
from sqlalchemy import make_url, text

from tests.support.broker import delete_prefix
from tests.support.commandline import environment, settings_variables
from tests.support.databases import create_database, drop_database
from tests.support.environment import make_settings
from tests.support.load import Load
from tests.support.logs import PROCESS_LINES
from tests.support.polling import wait_until
from tests.support.processes import WorkerProcess
from tests.support.proxy import Proxy
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import new_owner, set_up_tenant, unique_domain
from worker.config import Settings
from worker.store import Store, migrate

FIGURES: list[str] = []


def figure(scenario: str, **values: Any) -> None:
    """Prints one line of a scenario's figures, and keeps it for the terminal summary."""
    line = f"{scenario}: " + ", ".join(f"{key}={value}" for key, value in values.items())
    print(line, flush=True)
    FIGURES.append(line)


@dataclass(frozen=True)
class Aftermath:
    """What a load of commands left once they were all answered (`Rig.aftermath`)."""

    commands: int
    received: Counter[str]  # as `Rig.emails_by_sid`
    dead: list[aio_pika.abc.AbstractIncomingMessage]
    replies: int

    def figure(self, scenario: str, **values: Any) -> None:
        """`figure` of the scenario: its commands, `values`, then replies, emails, dead letters."""
        figure(
            scenario,
            commands=self.commands,
            **values,
            replies=self.replies,
            emails=sum(self.received.values()),
            dead=len(self.dead),
        )


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
        """The environment of the rig's workers; `overrides` are settings, e.g. prefetch="64"."""
        variables = settings_variables(self.settings) | {"database_url": self.database_url}
        return environment(**variables | {"log_level": "INFO", "log_format": "json"} | overrides)

    async def start_worker(self, **overrides: str) -> WorkerProcess:
        """A new `smtp-worker run`; `overrides` are settings, e.g. amqp_url=..., prefetch="64"."""
        log_path = self.tmp_path / f"worker-{len(self.workers) + 1}.log"
        worker = WorkerProcess(self.worker_environment(**overrides), log_path, self.tmp_path)
        self.workers.append(worker)
        return await worker.start()

    async def new_owner(self) -> dict[str, str]:
        """A new owner, written to the store as `smtp-worker owner create` does."""
        return await new_owner(self.store, "faults")

    async def setup_tenant(self, smtp_port: int | None = None) -> None:
        """An owner, email settings for a domain relayed to `smtp_port`, channel `ops`, a user."""
        options = {"host": "127.0.0.1", "port": smtp_port or self.smtp.port, "timeout": 5}
        (self.auth,) = await set_up_tenant(
            self.load.call,
            await self.new_owner(),
            unique_domain(),
            options,
            channels={"ops": ["oncall@example.com"]},
        )

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

    async def ticket_load(
        self, count: int, tag: str
    ) -> tuple[list[tuple[str, Any, Any, str]], list[str]]:
        """The tenant set up (`setup_tenant`), then `count` ticket.new commands (`tickets`) and
        their message_ids."""
        await self.setup_tenant()
        commands = self.tickets(count, tag)
        return commands, [message_id for *_, message_id in commands]

    def store_through_proxy(self) -> tuple[Proxy, str]:
        """A proxy to the store, and the database URL that goes through it."""
        url = make_url(self.database_url)
        proxy = self.proxy(url.port or 5432)
        return proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)

    async def query(self, sql: str, **params: Any) -> list[Any]:
        """Reads (or breaks) the store directly, as an operator would."""
        async with self.store.transaction() as conn:
            result = await conn.execute(text(sql), params)
            return list(result) if result.returns_rows else []

    def emails_by_sid(self) -> Counter[str]:
        """How many times the SMTP server received each ticket's email."""
        return Counter(str(m.message["X-Ticket-SID"]) for m in self.smtp.messages)

    async def aftermath(self, message_ids: list[str]) -> Aftermath:
        """The emails received, the dead letters taken from P.dead, and the replies to
        `message_ids`."""
        received = self.emails_by_sid()
        dead = await self.load.dead()
        replies = sum(len(self.load.replies[i]) for i in message_ids)
        return Aftermath(len(message_ids), received, dead, replies)

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
            await worker.stop()
            PROCESS_LINES.extend(worker.text_lines())
        await world.load.close()
        for proxy in world.proxies:
            proxy.close()
        await smtp.__aexit__()
        await store.close()
        await delete_prefix(amqp_url, world.settings)
        await drop_database(postgres_admin_url, database_url)
