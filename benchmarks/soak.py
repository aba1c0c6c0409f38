"""Soak: mixed commands through several worker processes; nothing may be lost, memory stays flat.

    python -m benchmarks.soak [--commands 50000] [--in-flight 200] [--workers 2] [--seed 1]

Creates a fresh PostgreSQL database, runs an SMTP relay (aiosmtpd) in this process, starts
`smtp-worker run` WORKERS times (separate processes sharing one SMTP_WORKER_SECRET_KEY) and an
owner with `smtp-worker owner create`, then sends COMMANDS commands with IN_FLIGHT outstanding:
ticket.new, hit.new, ticket.ack / unack / close, ticket.get / get_many and settings reads. Each
command has a message_id and a reply queue, as an upstream service sends them.

Commands on one ticket are sent one after another (the next once the previous one is answered),
so the driver knows every ticket's status, and therefore how many emails must arrive: every
reply must be a success. Prints throughput, replies received, tickets and hits stored, emails
expected / stored / delivered (and duplicates), what sits in P.dead, and each worker's resident
memory (VmRSS, and its peak VmHWM) from the start of the load to its end. Exits 1 when anything
is lost, doubled, refused or dead-lettered, or when a worker's memory keeps growing.

Services: SMTP_WORKER_TEST_AMQP_URL and SMTP_WORKER_TEST_POSTGRES_URL (an admin URL; the soak's
database is created next to it and dropped at the end), as for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from benchmarks.parties import AMQP_URL, POSTGRES_URL, start_workers, worker_variables
from tests.support.broker import delete_topology, queue_counts, wait_consumed
from tests.support.commandline import create_owner
from tests.support.databases import create_database, drop_database
from tests.support.processes import WorkerProcess, stop_workers
from tests.support.smtp_servers import closed_port
from tests.support.tenants import set_up_tenant
from worker.broker import Names, json_message

CHANNELS = 4
USERS = 8
REPLY_TIMEOUT = 120.0
# Percent of the commands sent; an operation that needs an open ticket when none is free
# becomes a ticket.new.
MIX = {
    "ticket.new": 30,
    "hit.new": 25,
    "ticket.ack": 6,
    "ticket.unack": 4,
    "ticket.close": 5,
    "ticket.get": 10,
    "ticket.get_many": 5,
    "settings.email.get": 4,
    "settings.channel.get": 4,
    "settings.channel.list": 4,
    "settings.smtp_user.list": 3,
}
# Memory is read as the replies pass these fractions of the commands. Growth is judged over the
# second half: in the first, pools fill up and every pooled connection prepares its statements,
# which a leak cannot be told from; past it, a leak keeps growing and a warm cache does not.
CHECKPOINTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
WARM_UP = "50%"
# Allowed growth of resident memory from WARM_UP to the end: max(MiB, percent of WARM_UP's).
GROWTH_MIB, GROWTH_PERCENT = 8.0, 5.0


# --- the relay ------------------------------------------------------------------------------------


class CountingRelay:
    """An SMTP server that accepts everything and counts emails by Message-ID."""

    _MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)

    def __init__(self) -> None:
        self.received: Counter[bytes] = Counter()
        self._lock = threading.Lock()
        self.port = closed_port()  # free: the controller listens on it
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    # aiosmtpd's hook names are fixed.
    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        headers = content.split(b"\r\n\r\n", 1)[0]
        found = self._MESSAGE_ID.search(headers)
        with self._lock:
            self.received[found.group(1) if found else b"(none)"] += 1
        return "250 OK"

    @property
    def delivered(self) -> int:
        with self._lock:
            return sum(self.received.values())

    @property
    def unique(self) -> int:
        with self._lock:
            return len(self.received)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class Ticket:
    sid: str
    status: str = "unacknowledged"
    busy: bool = False


@dataclass
class Tally:
    sent: int = 0
    replies: int = 0
    missing: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    tickets_created: int = 0
    hits_created: int = 0
    emails_expected: int = 0


class Driver:
    """Publishes commands with at most `in_flight` outstanding, and matches their replies."""

    def __init__(
        self,
        channel: aio_pika.abc.AbstractChannel,
        exchange: aio_pika.abc.AbstractExchange,
        reply_queue: str,
        in_flight: int,
    ) -> None:
        self.channel, self.exchange, self.reply_queue = channel, exchange, reply_queue
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.slots = asyncio.Semaphore(in_flight)
        self.tally = Tally()

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(json.loads(message.body))

    async def call(self, type_: str, auth: Any, data: Any) -> dict[str, Any] | None:
        """Sends one command; its reply, or None when none came within REPLY_TIMEOUT."""
        message_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        body = json.dumps({"type": type_, "auth": auth, "data": data}).encode()
        started = time.perf_counter()
        await self.exchange.publish(
            json_message(body, message_id=message_id, reply_to=self.reply_queue),
            routing_key=type_,
        )
        self.tally.sent += 1
        try:
            reply = await asyncio.wait_for(future, REPLY_TIMEOUT)
        except TimeoutError:
            self.pending.pop(message_id, None)
            self.tally.missing += 1
            return None
        self.tally.replies += 1
        self.tally.latencies.append(time.perf_counter() - started)
        outcome = "success" if reply["status"] == "success" else reply["error"]["name"]
        self.tally.outcomes[f"{type_} {outcome}"] += 1
        return reply

    async def ok(self, type_: str, auth: Any, data: Any) -> dict[str, Any]:
        reply = await self.call(type_, auth, data)
        if reply is None or reply["status"] != "success":
            raise RuntimeError(f"{type_} failed during set-up: {reply}")
        result: dict[str, Any] = reply["data"]
        return result


class Mix:
    """Chooses each command, and keeps track of every ticket the run created."""

    def __init__(
        self, driver: Driver, owner: dict[str, str], users: list[dict[str, str]], domain: str
    ) -> None:
        self.driver, self.owner, self.users, self.domain = driver, owner, users, domain
        self.tickets: list[Ticket] = []
        self.open: list[Ticket] = []
        self.kinds = list(MIX)
        self.weights = list(MIX.values())

    def _free_open_ticket(self, rng: random.Random) -> Ticket | None:
        for _ in range(8):
            if not self.open:
                return None
            ticket = rng.choice(self.open)
            if not ticket.busy:
                return ticket
        return None

    async def one(self, rng: random.Random, i: int) -> None:
        kind = rng.choices(self.kinds, self.weights)[0]
        user = rng.choice(self.users)
        d, tally = self.driver, self.driver.tally
        if kind.startswith("settings."):
            data = {
                "settings.email.get": {"domain": self.domain},
                "settings.channel.get": {"name": f"c{rng.randrange(CHANNELS)}"},
            }.get(kind, {})
            await d.call(kind, self.owner, data)
            return
        if kind in ("ticket.get", "ticket.get_many") and self.tickets:
            sids = [t.sid for t in rng.sample(self.tickets, min(len(self.tickets), 10))]
            data = {"sid": sids[0]} if kind == "ticket.get" else {"sids": sids}
            await d.call(kind, user, data)
            return
        ticket = None if kind == "ticket.new" else self._free_open_ticket(rng)
        if ticket is None:
            reply = await d.call(
                "ticket.new",
                user,
                {
                    "channel": f"c{rng.randrange(CHANNELS)}",
                    "ticket": {"title": f"alert {i}", "body": "soak " * 20},
                },
            )
            if reply is not None and reply["status"] == "success":
                new = Ticket(reply["data"]["sid"])
                self.tickets.append(new)
                self.open.append(new)
                tally.tickets_created += 1
                tally.emails_expected += 1
            return
        ticket.busy = True
        try:
            if kind == "hit.new":
                emailed = ticket.status == "unacknowledged"
                reply = await d.call(kind, user, {"sid": ticket.sid, "hit": {"summary": f"{i}"}})
                if reply is not None and reply["status"] == "success":
                    tally.hits_created += 1
                    tally.emails_expected += emailed
                return
            reply = await d.call(kind, user, {"sid": ticket.sid})
            if reply is None or reply["status"] != "success":
                return
            if kind == "ticket.close":
                ticket.status = "closed"
                self.open.remove(ticket)
            else:
                ticket.status = "acknowledged" if kind == "ticket.ack" else "unacknowledged"
        finally:
            ticket.busy = False


# --- the run --------------------------------------------------------------------------------------


async def scalar(engine: AsyncEngine, sql: str) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


# Figures counted in the store, each by its query.
STORE_COUNTS = {
    "tickets": "SELECT count(*) FROM tickets",
    "hits": "SELECT count(*) FROM hits",
    "emails_stored": "SELECT count(*) FROM emails",
    "emails_failed": "SELECT count(*) FROM emails WHERE status = 'failed'",
}


def mib(kib: int) -> str:
    return f"{kib / 1024:7.1f}"


@dataclass
class Figures:
    """What the store, the relay, the broker and the workers say after the load."""

    elapsed: float
    delivery_wait: float
    tickets: int
    hits: int
    emails_stored: int
    emails_failed: int
    delivered: int
    unique: int
    dead: int
    exit_codes: list[int | None]
    stop_time: float


class Soak:
    """One run: its services and workers (an async context), then its phases in order."""

    def __init__(self, commands: int, in_flight: int, workers: int, seed: int) -> None:
        self.commands, self.in_flight, self.workers, self.seed = commands, in_flight, workers, seed
        self.prefix = f"soak{uuid.uuid4().hex[:8]}"
        self.names = Names(self.prefix)
        self.relay = CountingRelay()
        self.logs = Path(tempfile.mkdtemp(prefix="soak-logs-"))
        self.procs: list[WorkerProcess] = []

    async def __aenter__(self) -> Soak:
        self.database_url = await create_database(POSTGRES_URL, "smtpw_soak")
        await asyncio.to_thread(self.relay.start)
        self.variables = worker_variables(self.prefix, self.database_url, secrets.token_urlsafe(32))
        self.procs = start_workers(self.variables, self.logs, self.workers)
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        self.engine = create_async_engine(self.database_url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for proc in self.procs:
            if proc.running:
                proc.kill()
        await delete_topology(self.connection, self.names)
        await self.connection.close()
        await self.engine.dispose()
        await drop_database(POSTGRES_URL, self.database_url)
        await asyncio.to_thread(self.relay.stop)

    async def set_up(self) -> Mix:
        """Waits for the workers; an owner, its domain, channels and SMTP users."""
        await wait_consumed(self.connection, self.names, self.procs)
        owner = await create_owner("soak", self.logs, **self.variables)
        channel = await self.connection.channel(publisher_confirms=True)
        # The worker replies to neither `amq.gen-…` nor `P.…` queues.
        reply_queue = await channel.declare_queue(
            f"{self.prefix}-replies", exclusive=True, auto_delete=True
        )
        exchange = await channel.get_exchange(self.names.commands, ensure=False)
        driver = Driver(channel, exchange, reply_queue.name, self.in_flight)
        await reply_queue.consume(driver.on_reply, no_ack=True)
        domain = f"{self.prefix}.example.com"
        users = await set_up_tenant(
            driver.ok,
            owner,
            domain,
            {"host": "127.0.0.1", "port": self.relay.port, "starttls": "never"},
            sender=f"alerts@{domain}",
            channels={f"c{n}": [f"oncall{n}@example.com"] for n in range(CHANNELS)},
            limits={"total_limit": 10**9, "hourly_limit": 10**9},
            users=USERS,
        )
        driver.tally = Tally()
        return Mix(driver, owner, users, domain)

    async def load(self, mix: Mix) -> float:
        """Sends every command; reads the workers' memory as the replies pass each checkpoint."""
        rng = random.Random(self.seed)  # noqa: S311 - a reproducible workload, not a secret
        checkpoints = {
            round(f * self.commands): {0.0: "start", 1.0: "end"}.get(f, f"{f:.0%}")
            for f in CHECKPOINTS
        }
        slots = mix.driver.slots
        tasks: set[asyncio.Task[None]] = set()
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            try:
                await mix.one(rng, i)
            finally:
                slots.release()
                done += 1
                if done in checkpoints:
                    self.read_memory(checkpoints[done])

        self.read_memory(checkpoints[0])
        started = time.perf_counter()
        for i in range(self.commands):
            await slots.acquire()
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        return time.perf_counter() - started

    def read_memory(self, label: str) -> None:
        for proc in self.procs:
            proc.memory[label] = proc.read_memory()

    async def drain(self, expected: int) -> float:
        """Waits until every stored email is sent and the relay has them all; how long."""
        started = time.perf_counter()
        deadline = time.monotonic() + max(60.0, expected / 50)
        while time.monotonic() < deadline:
            pending = await scalar(
                self.engine, "SELECT count(*) FROM emails WHERE status = 'pending'"
            )
            if pending == 0 and self.relay.delivered >= expected:
                break
            await asyncio.sleep(0.25)
        waited = time.perf_counter() - started
        await asyncio.sleep(1.0)  # a late duplicate would show up here
        self.read_memory("drained")
        return waited

    async def stop_workers(self) -> tuple[list[int | None], float]:
        """SIGTERM to every worker: their exit codes, and how long they took."""
        started = time.perf_counter()
        codes = await stop_workers(self.procs)
        return codes, time.perf_counter() - started

    async def run(self) -> tuple[Tally, Figures]:
        mix = await self.set_up()
        elapsed = await self.load(mix)
        tally = mix.driver.tally
        delivery_wait = await self.drain(tally.emails_expected)
        counted = {name: await scalar(self.engine, sql) for name, sql in STORE_COUNTS.items()}
        dead = (await queue_counts(self.connection, self.names.dead) or (0, 0))[0]
        codes, stop_time = await self.stop_workers()
        return tally, Figures(
            elapsed=elapsed,
            delivery_wait=delivery_wait,
            **counted,
            delivered=self.relay.delivered,
            unique=self.relay.unique,
            dead=dead,
            exit_codes=codes,
            stop_time=stop_time,
        )

    def report(self, tally: Tally, f: Figures) -> list[str]:
        """Prints the figures; what went wrong, if anything."""
        errors = {k: v for k, v in tally.outcomes.items() if not k.endswith(" success")}
        latencies = tally.latencies
        p50 = statistics.median(latencies) * 1000 if latencies else 0.0
        p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else p50
        by_type = Counter(k.split(" ")[0] for k in tally.outcomes.elements())
        print(
            f"load:      {tally.sent} commands in {f.elapsed:.1f} s = "
            f"{tally.sent / f.elapsed:.0f} commands/s; reply latency p50 {p50:.0f} ms, "
            f"p99 {p99:.0f} ms\n"
            f"mix:       {dict(sorted(by_type.items()))}\n"
            f"replies:   {tally.replies} of {tally.sent} received, {tally.missing} missing; "
            f"error replies: {errors or 'none'}\n"
            f"tickets:   {f.tickets} stored, {tally.tickets_created} created by replies\n"
            f"hits:      {f.hits} stored, {tally.hits_created} created by replies\n"
            f"emails:    {tally.emails_expected} expected, {f.emails_stored} stored "
            f"({f.emails_failed} failed), {f.delivered} delivered to the relay ({f.unique} "
            f"unique, {f.delivered - f.unique} duplicates), the last "
            f"{f.delivery_wait:.1f} s after the last reply\n"
            f"dead:      {f.dead} messages in P.dead\n"
            f"stop:      exit codes {f.exit_codes}, {f.stop_time:.1f} s after SIGTERM"
        )
        failures = []
        labels = list(self.procs[0].memory)
        print("memory MiB       " + "".join(f"{label:>9}" for label in labels))
        for n, proc in enumerate(self.procs, 1):
            for name, index in (("RSS ", 0), ("peak", 1)):
                row = "".join(f"{mib(proc.memory[label][index]):>9}" for label in labels)
                print(f"  worker {n} {name}  {row}")
            warm, end = proc.memory[WARM_UP][0], proc.memory["end"][0]
            allowed = max(GROWTH_MIB * 1024, warm * GROWTH_PERCENT / 100)
            print(
                f"  worker {n}: RSS {(end - warm) / 1024:+.1f} MiB from {WARM_UP} to the end "
                f"({(end - warm) / 1024 / (self.commands / 2000):+.2f} per 1000 commands; "
                f"allowed {allowed / 1024:.1f}); {len(proc.text_lines())} log lines at WARNING+"
            )
            if end - warm > allowed:
                failures.append(f"worker {n} memory grew by {(end - warm) / 1024:.1f} MiB")
        # At-least-once allows duplicates after a fault; this run injects none.
        checks = {
            "replies missing": tally.missing,
            "error replies": sum(errors.values()),
            "tickets stored != created": f.tickets != tally.tickets_created,
            "hits stored != created": f.hits != tally.hits_created,
            "emails stored != expected": f.emails_stored != tally.emails_expected,
            "emails not delivered": tally.emails_expected - f.unique,
            "emails duplicated": f.delivered - f.unique,
            "emails failed": f.emails_failed,
            "dead-lettered": f.dead,
            "worker exit codes": any(code != 0 for code in f.exit_codes),
        }
        failures += [f"{k}: {int(v)}" for k, v in checks.items() if v]
        print(f"verdict:   {'OK' if not failures else 'FAILED: ' + '; '.join(failures)}")
        return failures


async def main(commands: int, in_flight: int, workers: int, seed: int, keep_logs: bool) -> int:
    soak = Soak(commands, in_flight, workers, seed)
    print(
        f"soak: {commands} commands, {in_flight} in flight, {workers} worker processes, "
        f"prefix {soak.prefix}, worker logs in {soak.logs}",
        flush=True,
    )
    async with soak:
        tally, figures = await soak.run()
    failures = soak.report(tally, figures)
    if not failures and not keep_logs:
        await asyncio.to_thread(shutil.rmtree, soak.logs)
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    args = parser.parse_args()
    sys.exit(
        asyncio.run(main(args.commands, args.in_flight, args.workers, args.seed, args.keep_logs))
    )
