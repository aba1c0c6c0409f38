"""Throughput of the worker against a bare aio-pika RPC echo on the same broker.

    python -m benchmarks.throughput [--requests 3000] [--in-flight 200] [--rounds 3]

The baseline consumes a quorum queue, publishes a confirmed reply and acks: the floor of what any
worker on this broker can do. Each scenario then sends the same number of requests with the same
number in flight, through a worker running in this process, and prints requests per second:
the median of the rounds, and its ratio to the baseline's median measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import structlog

from benchmarks.databases import create_database, drop_database
from worker import logs
from worker.app import Worker
from worker.broker import Names
from worker.config import Settings

AMQP_URL = os.environ.get("SMTP_WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "SMTP_WORKER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


class Driver:
    """Publishes requests with at most `in_flight` outstanding; counts replies."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, reply_queue: str) -> None:
        self.channel = channel
        self.reply_queue = reply_queue
        self.pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = self.pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def run(
        self,
        exchange: aio_pika.abc.AbstractExchange,
        routing_key: str,
        bodies: Callable[[int], bytes],
        requests: int,
        in_flight: int,
    ) -> tuple[float, int]:
        semaphore = asyncio.Semaphore(in_flight)
        errors = 0

        async def one(i: int) -> None:
            nonlocal errors
            async with semaphore:
                correlation_id = uuid.uuid4().hex
                future = asyncio.get_running_loop().create_future()
                self.pending[correlation_id] = future
                await exchange.publish(
                    aio_pika.Message(
                        bodies(i),
                        message_id=correlation_id,
                        correlation_id=correlation_id,
                        reply_to=self.reply_queue,
                        content_type="application/json",
                    ),
                    routing_key,
                )
                body = await asyncio.wait_for(future, 60)
                if b'"status":"error"' in body:
                    errors += 1
                    if errors == 1:
                        print("first error reply:", body.decode()[:300])

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return requests / (time.perf_counter() - started), errors


async def echo_baseline(
    connection: aio_pika.abc.AbstractConnection,
    prefix: str,
    driver: Driver,
    requests: int,
    in_flight: int,
) -> float:
    server = await connection.channel(publisher_confirms=True)
    await server.set_qos(prefetch_count=256)
    queue = await server.declare_queue(
        f"{prefix}.echo", durable=True, arguments={"x-queue-type": "quorum"}
    )

    async def echo(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await server.default_exchange.publish(
            aio_pika.Message(
                message.body,
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            message.reply_to or "",
        )
        await message.ack()

    tag = await queue.consume(echo)
    rate, _ = await driver.run(
        server.default_exchange, queue.name, lambda i: b"{}", requests, in_flight
    )
    await queue.cancel(tag)
    await queue.delete(if_unused=False, if_empty=False)
    await server.close()
    return rate


async def _owner(worker: Worker) -> dict[str, str]:
    from datetime import UTC, datetime  # noqa: PLC0415

    from worker.store import owners  # noqa: PLC0415

    async with worker.store.transaction() as conn:
        owner_id, token = await owners.create(conn, worker.keyring, "bench", datetime.now(UTC))
    return {"owner_id": owner_id, "token": token}


async def scenario(
    name: str,
    database_url: str,
    driver: Driver,
    connection: aio_pika.abc.AbstractConnection,
    requests: int,
    in_flight: int,
) -> dict[str, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = Settings(
        amqp_url=AMQP_URL,
        database_url=database_url,
        prefix=prefix,
        secret_key="bench-" + uuid.uuid4().hex,
        log_level="WARNING",
        relay_allow="127.0.0.0/8",
        http="",
    )
    worker = Worker(settings, ("settings", "tickets", "hits"))
    await worker.start()
    channel = await connection.channel()
    exchange = await channel.get_exchange(Names(prefix).commands, ensure=False)
    owner = await _owner(worker)
    call = _Caller(driver, exchange)
    domain = f"{prefix}.example.com"
    await call.ok(
        "settings.email.create",
        owner,
        {
            "domain": domain,
            "provider": "smtp",
            "from": f"alerts@{domain}",
            "options": {"host": "127.0.0.1", "port": 2525},
        },
    )
    await call.ok(
        "settings.channel.put",
        owner,
        {"name": "ops", "domain": domain, "recipients": ["oncall@example.com"]},
    )
    user = await call.ok(
        "settings.smtp_user.add", owner, {"total_limit": 10**9, "hourly_limit": 10**9}
    )
    user_auth = {"login": user["smtp_user_name"], "password": user["smtp_password"]}

    def body(type_: str, auth: Any, data: Callable[[int], Any]) -> Callable[[int], bytes]:
        return lambda i: json.dumps({"type": type_, "auth": auth, "data": data(i)}).encode()

    results = {}
    for label, type_, auth, data in (
        ("settings.channel.get", "settings.channel.get", owner, lambda i: {"name": "ops"}),
        (
            "ticket.new",
            "ticket.new",
            user_auth,
            lambda i: {"channel": "ops", "ticket": {"title": f"alert {i}", "body": "b"}},
        ),
    ):
        rate, errors = await driver.run(
            exchange, type_, body(type_, auth, data), requests, in_flight
        )
        assert errors == 0, f"{errors} error replies in {label}"
        results[f"{name} {label}"] = rate
    await channel.close()
    await worker.stop()
    admin = await connection.channel()
    for queue in ("tickets", "hits", "settings", "dead", "deliveries"):
        await admin.queue_delete(f"{prefix}.{queue}")
    for delay in settings.retry_delays:
        await admin.queue_delete(Names(prefix).delay(delay))
    for exchange_name in ("commands", "events", "dead"):
        await admin.exchange_delete(f"{prefix}.{exchange_name}")
    await admin.close()
    return results


class _Caller:
    def __init__(self, driver: Driver, exchange: aio_pika.abc.AbstractExchange) -> None:
        self.driver, self.exchange = driver, exchange

    async def ok(self, type_: str, auth: Any, data: Any) -> Any:
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.driver.pending[correlation_id] = future
        await self.exchange.publish(
            aio_pika.Message(
                json.dumps({"type": type_, "auth": auth, "data": data}).encode(),
                correlation_id=correlation_id,
                reply_to=self.driver.reply_queue,
            ),
            type_,
        )
        reply = json.loads(await asyncio.wait_for(future, 30))
        assert reply["status"] == "success", reply
        return reply["data"]


async def main(requests: int, in_flight: int, rounds: int, stores: list[str]) -> None:
    logs.configure("WARNING", "json")
    if not os.environ.get("BENCH_LOGS"):
        structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel()
    # The worker replies to neither `amq.gen-…` nor `P.…` queues.
    reply_queue = await channel.declare_queue(
        f"bench-replies-{uuid.uuid4().hex}", exclusive=True, auto_delete=True
    )
    driver = Driver(channel, reply_queue.name)
    await reply_queue.consume(driver.on_reply, no_ack=True)
    figures: dict[str, list[float]] = {}
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    database = await create_database(POSTGRES_URL, "smtpw_bench") if "postgres" in stores else None
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite+aiosqlite:///{tmp}/bench.db", "postgres": database or ""}
        for _ in range(rounds):
            figures.setdefault("baseline echo", []).append(
                await echo_baseline(connection, prefix, driver, requests, in_flight)
            )
            for store in stores:
                for label, rate in (
                    await scenario(store, urls[store], driver, connection, requests, in_flight)
                ).items():
                    figures.setdefault(label, []).append(rate)
    await connection.close()
    if database is not None:
        await drop_database(POSTGRES_URL, database)
    baseline = statistics.median(figures["baseline echo"])
    print(f"{requests} requests, {in_flight} in flight, {rounds} rounds; median req/s")
    for label, rates in figures.items():
        median = statistics.median(rates)
        print(
            f"  {label:40s} {median:8.0f} req/s   {median / baseline:5.2f} x baseline   "
            f"(rounds: {', '.join(f'{r:.0f}' for r in rates)})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stores", default="sqlite,postgres")
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.in_flight, args.rounds, args.stores.split(",")))
