"""Speed of the worker as users run it, against a bare RPC echo and a raw SMTP send.

    python -m benchmarks.throughput [--quick] [--rounds 3] [--requests 1000] [--in-flight 200]
        [--sequential 200] [--stores postgres,sqlite] [--workers 1,2] [--profile FILE]

Every party is its own OS process: an SMTP sink (`benchmarks.sink`), a bare aio-pika RPC echo
server (`benchmarks.echo`: consume a quorum queue, publish a confirmed persistent reply, ack), one
or two `smtp-worker run` consuming every queue, deliveries included, and this process, the client,
which keeps IN_FLIGHT requests outstanding, each a persistent message with a `message_id` and a
`reply_to`, as an upstream service sends them.

Each round measures, with a fresh broker prefix, a fresh database (PostgreSQL: a new database
next to SMTP_WORKER_TEST_POSTGRES_URL; SQLite: a new file) and new workers for each store and
worker count:

- the echo's replies/s with IN_FLIGHT requests outstanding, and its p50 latency with one;
- raw aiosmtplib sends/s to the same sink over 4 reused connections (the worker's per relay):
  what the SMTP client can do, the baseline of email delivery;
- `settings.channel.get` replies/s and `ticket.new` replies/s, IN_FLIGHT outstanding;
- `ticket.new` → email accepted by the sink, per second: the ticket.new requests over the time
  from the first request sent to the last of their emails accepted;
- `ticket.new` p50 latency with one request outstanding (SEQUENTIAL requests);
- a backlog drained, per second (one worker): three times REQUESTS `ticket.new` answered by a worker
  that consumes the command queues only, their emails then sent by another one started to
  consume P.deliveries only, from when its consumer is seen to the last email accepted; what a
  worker does after an outage of its relay or of its deliveries consumers;
- the CPU time (user + system) each request cost the echo, and the workers per
  `settings.channel.get` and per `ticket.new` with its email: on a shared machine, where the
  rates follow what else runs, the least noisy figure; and the workers' CPU in cores over the
  `ticket.new` load and its emails (below 1 per worker: it waited, for the store, the broker or
  the machine's CPUs);
- the CPU time the other parties spent per request, the echo's and `ticket.new` with its email:
  RabbitMQ's and PostgreSQL's processes (from /proc), the sink and this client; and from their
  sum, the most `ticket.new` per second this machine's cores could answer if the worker cost
  nothing at all (where the ratios to the echo end on this machine, whatever the worker does).

Prints the median of the rounds of each figure and its ratio to the echo's median of the same
run (rates to the echo's replies/s, latencies to its p50, CPU to its CPU per request), each
round's value, and the load average of the machine (a shared machine's figures vary with what
else runs). `--quick` (or BENCH_QUICK=1) is one round of 500 requests and 50 sequential ones.
`--profile FILE` records the first single worker (of the first store given) with py-spy (on
PATH or beside this Python) during its `ticket.new` load and emails, as collapsed stacks;
`python -m benchmarks.profile FILE` sums them.

The prefix's queues and exchanges and the databases are deleted at the end; the broker is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiosmtplib

from benchmarks.parties import (
    AMQP_URL,
    POSTGRES_URL,
    start_workers,
    worker_command,
    worker_variables,
)
from benchmarks.sink import read_sink
from tests.support.broker import delete_topology, wait_consumed
from tests.support.commandline import create_owner
from tests.support.databases import create_database, drop_database
from tests.support.processes import WorkerProcess, cpu_seconds, stop_workers
from tests.support.tenants import set_up_tenant
from worker.broker import COMMAND_QUEUES, Names, json_message

REPLY_TIMEOUT = 60.0
RAW_CONNECTIONS = 4
CPU_MS = "CPU ms/request"
PARTY_MS = "CPU ms"
WARM_UP = 50


@dataclass(frozen=True)
class Options:
    rounds: int
    requests: int
    in_flight: int
    sequential: int
    stores: tuple[str, ...]
    workers: tuple[int, ...]
    profile: Path | None


# --- the client -----------------------------------------------------------------------------------


class Client:
    """Publishes requests with at most `in_flight` outstanding, and matches their replies."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, reply_queue: str) -> None:
        self.channel, self.reply_queue = channel, reply_queue
        self.pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(self, exchange: aio_pika.abc.AbstractExchange, key: str, body: bytes) -> bytes:
        message_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        await exchange.publish(
            json_message(
                body, message_id=message_id, correlation_id=message_id, reply_to=self.reply_queue
            ),
            routing_key=key,
        )
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT)
        finally:
            self.pending.pop(message_id, None)

    async def load(
        self,
        exchange: aio_pika.abc.AbstractExchange,
        key: str,
        body: Callable[[int], bytes],
        requests: int,
        in_flight: int,
    ) -> tuple[float, list[float]]:
        """Sends `requests` requests, `in_flight` at a time: (seconds, each one's latency).
        Raises on an error reply, or when a reply does not come."""
        slots = asyncio.Semaphore(in_flight)
        latencies: list[float] = []

        async def one(i: int) -> None:
            async with slots:
                started = time.perf_counter()
                reply = await self.call(exchange, key, body(i))
                latencies.append(time.perf_counter() - started)
                if b'"error"' in reply and json.loads(reply).get("status") == "error":
                    raise RuntimeError(f"{key}: error reply {reply[:300]!r}")

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return time.perf_counter() - started, latencies

    async def ok(
        self, exchange: aio_pika.abc.AbstractExchange, type_: str, auth: Any, data: Any
    ) -> Any:
        reply = json.loads(await self.call(exchange, type_, command(type_, auth, data)))
        if reply["status"] != "success":
            raise RuntimeError(f"{type_} failed during set-up: {reply}")
        return reply["data"]


def command(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


# --- the parties ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def party(*args: str) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m ARGS` in its own process: (the process, its first line of output)."""
    process = subprocess.Popen(  # noqa: ASYNC220, S603 - our own modules; starting is quick
        [sys.executable, "-m", *args], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        if not line:
            raise RuntimeError(f"{' '.join(args)} exited with {process.wait()}")
        yield process, line.decode().strip()
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait)


async def emails_accepted(control_port: int, expected: int, timeout: float) -> float:
    """Waits until the sink has accepted `expected` emails; the wall-clock time of the last."""
    deadline = time.monotonic() + timeout
    while True:
        count, last = await read_sink(control_port)
        if count >= expected:
            return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sink accepted {count} emails of {expected}")
        await asyncio.sleep(0.05)


def _service(pid: str) -> str | None:
    """Which service's process `pid` is: "RabbitMQ" (its Erlang VM), "PostgreSQL" (its server
    processes), or None."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    if comm.startswith("beam"):
        return "RabbitMQ"
    if comm.startswith("postgres") or comm.startswith("postmaster"):
        return "PostgreSQL"
    return None


class Parties:
    """The CPU time the other parties on this machine spend on a load: RabbitMQ's and
    PostgreSQL's processes (found in /proc; a backend that exits during the load takes its time
    with it), the sink, and this process, the client."""

    def __init__(self, sink_pid: int) -> None:
        self.sink_pid = sink_pid

    def snapshot(self) -> dict[str, float]:
        """Per process (pid, or "sink" and "client"), the CPU seconds it has used so far."""
        seen: dict[str, float] = {}
        for pid in [pid for pid in os.listdir("/proc") if pid.isdigit()]:
            if _service(pid):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    seen[pid] = cpu_seconds(int(pid))
        seen["sink"] = cpu_seconds(self.sink_pid)
        seen["client"] = time.process_time()
        return seen

    @staticmethod
    def used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Seconds used between two snapshots, by party."""
        totals = dict.fromkeys(("RabbitMQ", "PostgreSQL", "sink", "client"), 0.0)
        for key, seconds in after.items():
            party_ = key if key in ("sink", "client") else _service(key)
            if party_ is not None:
                totals[party_] += seconds - before.get(key, 0.0)
        return totals


@contextlib.contextmanager
def py_spy(path: Path | None, pid: int) -> Any:
    """Records `pid` with py-spy into `path` (collapsed stacks) while the block runs."""
    if path is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    recorder = subprocess.Popen(  # noqa: S603 - py-spy, found above
        [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", str(path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)


# --- one run --------------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: Options, connection: aio_pika.abc.AbstractConnection) -> None:
        self.options = options
        self.connection = connection
        self.figures: dict[tuple[str, str, int], list[float]] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.profiled = False
        self.echo_pid = 0
        self.parties: Parties | None = None
        self.owner: Any = None

    def record(self, figure: str, store: str, workers: int, value: float) -> None:
        self.figures.setdefault((figure, store, workers), []).append(value)

    def record_parties(
        self, what: str, store: str, workers: int, before: dict[str, float], requests: int
    ) -> None:
        """The other parties' CPU per request since `before`, each and in all."""
        assert self.parties is not None
        used = Parties.used(before, self.parties.snapshot())
        if store != "postgres":
            used.pop("PostgreSQL")
        for name, seconds in used.items():
            self.record(f"{what}: {name} {PARTY_MS}", store, workers, seconds * 1000 / requests)
        total = sum(used.values()) * 1000 / requests
        self.record(f"{what}: the others {PARTY_MS}", store, workers, total)

    async def echo(self, client: Client, queue: str) -> None:
        exchange = client.channel.default_exchange
        o = self.options
        await client.load(exchange, queue, lambda i: b"{}", WARM_UP, 10)
        cpu = cpu_seconds(self.echo_pid)
        assert self.parties is not None
        parties = self.parties.snapshot()
        elapsed, _ = await client.load(exchange, queue, lambda i: b"{}", o.requests, o.in_flight)
        self.record("replies/s", "echo", 0, o.requests / elapsed)
        self.record(CPU_MS, "echo", 0, (cpu_seconds(self.echo_pid) - cpu) * 1000 / o.requests)
        self.record_parties("request", "echo", 0, parties, o.requests)
        _, latencies = await client.load(exchange, queue, lambda i: b"{}", o.sequential, 1)
        self.record("p50 ms, 1 in flight", "echo", 0, statistics.median(latencies) * 1000)

    async def raw_smtp(self, smtp_port: int) -> None:
        """Emails/s of aiosmtplib alone over RAW_CONNECTIONS reused connections to the sink."""
        message = (
            "From: alerts@bench.example.com\r\nTo: oncall@example.com\r\n"
            "Subject: [bench] alert\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + "YWxlcnQ=\r\n"
            * 20
        ).encode()
        share = [
            len(range(n, self.options.requests, RAW_CONNECTIONS)) for n in range(RAW_CONNECTIONS)
        ]

        async def sender(count: int) -> None:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False) as s:
                for _ in range(count):
                    await s.sendmail("alerts@bench.example.com", ["oncall@example.com"], message)

        started = time.perf_counter()
        await asyncio.gather(*(sender(count) for count in share))
        elapsed = time.perf_counter() - started
        self.record("raw aiosmtplib emails/s", "sink", 0, self.options.requests / elapsed)

    @contextlib.asynccontextmanager
    async def database(self, store: str, prefix: str) -> AsyncIterator[str]:
        if store == "sqlite":
            yield f"sqlite+aiosqlite:///{self.tmp}/{prefix}.db"
            return
        url = await create_database(POSTGRES_URL, "smtpw_bench")
        try:
            yield url
        finally:
            await drop_database(POSTGRES_URL, url)

    async def worker(self, client: Client, ports: tuple[int, int], store: str, count: int) -> None:
        """The worker's figures on `store` with `count` worker processes."""
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        names = Names(prefix)
        procs: list[WorkerProcess] = []
        async with self.database(store, prefix) as database_url:
            variables = worker_variables(prefix, database_url, secrets.token_urlsafe(32))
            try:
                await worker_command(variables, self.tmp, "migrate")
                procs = start_workers(variables, self.tmp, count)
                await wait_consumed(self.connection, names, procs)
                exchange = await client.channel.get_exchange(names.commands, ensure=False)
                await self.measure(client, exchange, variables, ports, procs, store)
            finally:
                codes = await stop_workers(procs)
                await delete_topology(self.connection, names)
            if any(code != 0 for code in codes):
                raise RuntimeError(f"worker exit codes {codes}; logs in {self.tmp}")

    async def tenant(
        self,
        client: Client,
        exchange: aio_pika.abc.AbstractExchange,
        variables: dict[str, str],
        ports: tuple[int, int],
    ) -> tuple[Callable[[int], bytes], int]:
        """An owner (`self.owner`), its relay (the sink), an SMTP user and a channel "ops": the
        body of the I-th `ticket.new`, and the sink's control port."""
        smtp_port, control_port = ports
        owner = self.owner = await create_owner("bench", self.tmp, **variables)
        domain = f"{variables['prefix']}.example.com"
        (auth,) = await set_up_tenant(
            functools.partial(client.ok, exchange),
            owner,
            domain,
            {"host": "127.0.0.1", "port": smtp_port, "starttls": "never"},
            sender=f"alerts@{domain}",
            channels={"ops": ["oncall@example.com"]},
            limits={"total_limit": 10**9, "hourly_limit": 10**9},
        )

        def new(i: int) -> bytes:
            ticket = {"title": f"alert {i}", "body": "disk almost full on db-1\n" * 8}
            return command("ticket.new", auth, {"channel": "ops", "ticket": ticket})

        return new, control_port

    async def measure(
        self,
        client: Client,
        exchange: aio_pika.abc.AbstractExchange,
        variables: dict[str, str],
        ports: tuple[int, int],
        procs: list[WorkerProcess],
        store: str,
    ) -> None:
        o, workers = self.options, len(procs)
        new, control_port = await self.tenant(client, exchange, variables, ports)
        owner = self.owner

        def get(i: int) -> bytes:
            return command("settings.channel.get", owner, {"name": "ops"})

        # Warm-up: every worker opens its store and relay connections.
        sent, _ = await read_sink(control_port)
        await client.load(exchange, "settings.channel.get", get, WARM_UP, 10)
        await client.load(exchange, "ticket.new", new, WARM_UP, 10)
        await emails_accepted(control_port, sent + WARM_UP, 60)

        key, cpu = "settings.channel.get", sum(p.cpu_seconds() for p in procs)
        elapsed, _ = await client.load(exchange, key, get, o.requests, o.in_flight)
        used = sum(p.cpu_seconds() for p in procs) - cpu
        self.record("settings.channel.get replies/s", store, workers, o.requests / elapsed)
        self.record(f"{key} {CPU_MS}", store, workers, used * 1000 / o.requests)

        profile = None
        if o.profile and workers == 1 and not self.profiled:
            profile, self.profiled = o.profile, True
        sent, _ = await read_sink(control_port)
        cpu = sum(p.cpu_seconds() for p in procs)
        assert self.parties is not None
        parties = self.parties.snapshot()
        with py_spy(profile, procs[0].pid):
            started, wall = time.perf_counter(), time.time()
            elapsed, _ = await client.load(exchange, "ticket.new", new, o.requests, o.in_flight)
            last = await emails_accepted(control_port, sent + o.requests, max(60, o.requests / 5))
        used = sum(p.cpu_seconds() for p in procs) - cpu
        self.record_parties("ticket.new + email", store, workers, parties, o.requests)
        self.record("ticket.new replies/s", store, workers, o.requests / elapsed)
        self.record("ticket.new → email accepted/s", store, workers, o.requests / (last - wall))
        self.record(f"ticket.new + email {CPU_MS}", store, workers, used * 1000 / o.requests)
        self.record("worker CPU, cores", store, workers, used / (time.perf_counter() - started))

        _, latencies = await client.load(exchange, "ticket.new", new, o.sequential, 1)
        self.record(
            "ticket.new p50 ms, 1 in flight", store, workers, statistics.median(latencies) * 1000
        )

    async def backlog(self, client: Client, ports: tuple[int, int], store: str) -> None:
        """Emails/s of one worker sending a backlog queued while P.deliveries had no consumer."""
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        names = Names(prefix)
        procs: list[WorkerProcess] = []
        count = 3 * self.options.requests
        async with self.database(store, prefix) as database_url:
            variables = worker_variables(prefix, database_url, secrets.token_urlsafe(32))
            try:
                await worker_command(variables, self.tmp, "migrate")
                procs = start_workers(variables, self.tmp, 1, list(COMMAND_QUEUES))
                await wait_consumed(self.connection, names, procs, shorts=list(COMMAND_QUEUES))
                exchange = await client.channel.get_exchange(names.commands, ensure=False)
                new, control_port = await self.tenant(client, exchange, variables, ports)
                await client.load(exchange, "ticket.new", new, count, self.options.in_flight)
                sent, _ = await read_sink(control_port)
                procs += start_workers(variables, self.tmp, 1, ["deliveries"])
                await wait_consumed(self.connection, names, procs[1:], shorts=["deliveries"])
                started = time.time()
                last = await emails_accepted(control_port, sent + count, max(60, count / 5))
            finally:
                codes = await stop_workers(procs)
                await delete_topology(self.connection, names)
            if any(code != 0 for code in codes):
                raise RuntimeError(f"worker exit codes {codes}; logs in {self.tmp}")
        self.record(f"backlog of {count} emails drained/s", store, 1, count / (last - started))

    async def run(self) -> list[tuple[float, float, float]]:
        """Every round; the load average before each."""
        o = self.options
        channel = await self.connection.channel()
        # The worker replies to neither `amq.gen-…` nor `P.…` queues.
        reply_queue = await channel.declare_queue(
            f"bench-replies-{uuid.uuid4().hex}", exclusive=True, auto_delete=True
        )
        client = Client(channel, reply_queue.name)
        await reply_queue.consume(client.on_reply, no_ack=True)
        echo_queue = f"bench{uuid.uuid4().hex[:8]}.echo"
        loads = []
        try:
            async with (
                party("benchmarks.sink") as (sink, sink_ports),
                party("benchmarks.echo", echo_queue) as (echo, _),
            ):
                self.echo_pid = echo.pid
                smtp_port, control_port = (int(port) for port in sink_ports.split())
                self.parties = Parties(sink.pid)
                for n in range(o.rounds):
                    loads.append(os.getloadavg())
                    print(f"round {n + 1} of {o.rounds}, load average {loads[-1]}", flush=True)
                    await self.echo(client, echo_queue)
                    await self.raw_smtp(smtp_port)
                    for store in o.stores:
                        for count in o.workers:
                            await self.worker(client, (smtp_port, control_port), store, count)
                        if 1 in o.workers:
                            await self.backlog(client, (smtp_port, control_port), store)
        finally:
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                async with self.connection.channel() as admin:
                    await admin.queue_delete(echo_queue)
            await channel.close()
        loads.append(os.getloadavg())
        shutil.rmtree(self.tmp)
        return loads

    def report(self, loads: list[tuple[float, float, float]], seconds: float) -> None:
        o = self.options
        medians = {key: statistics.median(values) for key, values in self.figures.items()}
        echo_rate = medians["replies/s", "echo", 0]
        echo_p50 = medians["p50 ms, 1 in flight", "echo", 0]
        echo_cpu = medians[CPU_MS, "echo", 0]
        print(
            f"\n{o.requests} requests with {o.in_flight} in flight, {o.sequential} with 1; "
            f"medians of {o.rounds} round(s) in {seconds:.0f} s; {os.cpu_count()} cores; "
            f"load average (1, 5, 15 min) before each round and at the end: "
            + "; ".join(" ".join(f"{x:.2f}" for x in load) for load in loads)
        )
        print(f"{'figure':40s} {'store':>8s} {'workers':>7s} {'median':>9s} {'× echo':>7s}  rounds")
        for (figure, store, workers), values in self.figures.items():
            median = medians[figure, store, workers]
            if figure.startswith("worker CPU") or figure.endswith(PARTY_MS):
                ratio = ""
            elif figure.endswith(CPU_MS):
                ratio = f"{median / echo_cpu:6.2f}×"
            elif "ms" in figure:
                ratio = f"{median / echo_p50:6.2f}×"
            else:
                ratio = f"{median / echo_rate:6.2f}×"
            print(
                f"{figure:40s} {store:>8s} {workers or '':>7} {median:9.1f} {ratio:>7s}  "
                + ", ".join(f"{v:.1f}" for v in values)
            )
        cores = os.cpu_count() or 1
        for (figure, store, workers), others in medians.items():
            if figure == f"ticket.new + email: the others {PARTY_MS}" and others > 0:
                ceiling = cores * 1000 / others
                print(
                    f"{store}, {workers} worker(s): the other parties spend {others:.1f} ms of CPU "
                    f"on a ticket.new and its email; with a worker that cost none, {cores} cores "
                    f"would answer at most {ceiling:.0f}/s ({ceiling / echo_rate:.2f}× echo)"
                )


async def main(options: Options) -> None:
    # Interrupted, the run still stops its processes and deletes what it made (a shell starts a
    # background job with SIGINT ignored: SIGTERM too).
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    connection = await aio_pika.connect_robust(AMQP_URL)
    bench = Bench(options, connection)
    started = time.perf_counter()
    try:
        loads = await bench.run()
    except asyncio.CancelledError:
        print(f"interrupted: processes stopped, queues and databases deleted; logs in {bench.tmp}")
        raise SystemExit(130) from None
    finally:
        await connection.close()
    bench.report(loads, time.perf_counter() - started)


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    parser.add_argument("--quick", action="store_true", default=quick, help="one short round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--sequential", type=int)
    parser.add_argument("--stores", default="postgres,sqlite")
    parser.add_argument("--workers", type=_numbers, default=(1, 2))
    parser.add_argument("--profile", type=Path, help="py-spy's collapsed stacks go here")
    args = parser.parse_args()
    defaults = (1, 500, 50) if args.quick else (3, 1000, 200)
    asyncio.run(
        main(
            Options(
                rounds=args.rounds or defaults[0],
                requests=args.requests or defaults[1],
                in_flight=args.in_flight,
                sequential=args.sequential or defaults[2],
                stores=tuple(args.stores.split(",")),
                workers=args.workers,
                profile=args.profile,
            )
        )
    )
