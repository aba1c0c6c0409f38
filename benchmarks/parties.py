"""What the benchmark and the soak run share: worker processes, readiness, and the broker clean-up.

Each worker is `python -m worker run` (what `smtp-worker run` starts), consuming every queue,
deliveries included; an owner is created with `smtp-worker owner create`, as an operator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from worker.broker import COMMAND_QUEUES, PARK_DELAYS, Names
from worker.config import Settings

AMQP_URL = os.environ.get("SMTP_WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "SMTP_WORKER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: Path
    # label ("start", "10%", …, "end", "drained") -> (VmRSS, VmHWM) in KiB
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB, from /proc/<pid>/status."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_lines(self) -> int:
        return len(self.log.read_bytes().splitlines())


def worker_env(
    prefix: str, database_url: str, secret_key: str, amqp_url: str = AMQP_URL
) -> dict[str, str]:
    """The environment of a worker at `prefix` on `database_url`: relays on 127.0.0.1 allowed,
    warnings and errors logged, no HTTP endpoints."""
    return {
        **os.environ,
        "SMTP_WORKER_AMQP_URL": amqp_url,
        "SMTP_WORKER_DATABASE_URL": database_url,
        "SMTP_WORKER_SECRET_KEY": secret_key,
        "SMTP_WORKER_PREFIX": prefix,
        "SMTP_WORKER_LOG_LEVEL": "WARNING",
        "SMTP_WORKER_RELAY_ALLOW": "127.0.0.0/8",
        "SMTP_WORKER_HTTP": "",
    }


def start_worker(env: dict[str, str], log: Path) -> WorkerProcess:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"], env=env, stdout=out, stderr=out
        )
    return WorkerProcess(process, log)


def worker_command(env: dict[str, str], *args: str) -> str:
    """Runs `smtp-worker ARGS` to completion; its standard output."""
    done = subprocess.run(  # noqa: S603 - the worker's own command line
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout.decode()


def create_owner(env: dict[str, str], name: str) -> dict[str, str]:
    owner: dict[str, str] = json.loads(worker_command(env, "owner", "create", "--name", name))
    return owner


async def queue_counts(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, or None when it does not exist (yet)."""
    # A passive declare of a missing queue closes its channel: one channel per question.
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return None
    assert declared.declaration_result is not None
    result = declared.declaration_result
    await channel.close()
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def wait_ready(
    connection: aio_pika.abc.AbstractConnection, names: Names, procs: list[WorkerProcess]
) -> None:
    """Waits until every worker consumes every queue."""
    queues = [names.queue(short) for short in COMMAND_QUEUES] + [names.deliveries]
    deadline = time.monotonic() + 60
    while True:
        counts = [await queue_counts(connection, queue) for queue in queues]
        if all(c is not None and c[1] >= len(procs) for c in counts):
            return
        exited = [p.log for p in procs if p.process.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise RuntimeError(f"workers not consuming: {counts}; see {exited or 'the logs'}")
        await asyncio.sleep(0.2)


async def stop_workers(procs: list[WorkerProcess], timeout: float = 60) -> list[int | None]:
    """SIGTERM to every worker still running, then their exit codes (None: killed after
    `timeout` seconds)."""
    for proc in procs:
        if proc.process.poll() is None:
            proc.process.terminate()
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(await asyncio.to_thread(proc.process.wait, timeout))
        except subprocess.TimeoutExpired:
            proc.process.kill()
            await asyncio.to_thread(proc.process.wait)
            codes.append(None)
    return codes


async def delete_topology(connection: aio_pika.abc.AbstractConnection, names: Names) -> None:
    """Deletes every queue and exchange a worker at `names.prefix` declares."""
    queues = [names.queue(q) for q in (*COMMAND_QUEUES, "dead")]
    queues += [names.deliveries, names.probes, names.unrouted]
    delays = {*Settings.model_fields["retry_delays"].default, *PARK_DELAYS}
    queues += [names.delay(d) for d in sorted(delays)]
    queues += [names.delay(d, "probes") for d in PARK_DELAYS]
    for queue in queues:
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            async with connection.channel() as channel:
                await channel.queue_delete(queue)
    for exchange in (names.commands, names.events, names.dead, names.unrouted):
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            async with connection.channel() as channel:
                await channel.exchange_delete(exchange)
