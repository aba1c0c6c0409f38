"""What a test or a benchmark asks of the broker directly: queue depths, readiness, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aio_pika

from tests.support.processes import WorkerProcess
from worker.broker import COMMAND_QUEUES, PARK_DELAYS, Names
from worker.config import Settings
from worker.connection import open_first

PARKED = ("deliveries", "probes")  # the queues whose jobs wait in delay queues when parked
DEFAULT_RETRY_DELAYS: tuple[float, ...] = tuple(Settings.model_fields["retry_delays"].default)


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


async def wait_consumed(
    connection: aio_pika.abc.AbstractConnection,
    names: Names,
    workers: Sequence[WorkerProcess],
    timeout: float = 60,
    shorts: Sequence[str] = (*COMMAND_QUEUES, "deliveries"),
) -> None:
    """Waits until each of `workers` consumes every queue of `shorts` (by default every command
    queue and the deliveries queue); raises RuntimeError after `timeout` seconds, or as soon as
    one of them has exited."""
    queues = [names.queue(short) for short in shorts]
    deadline = time.monotonic() + timeout
    while True:
        counts = [await queue_counts(connection, queue) for queue in queues]
        if all(c is not None and c[1] >= len(workers) for c in counts):
            return
        exited = [worker.log_path for worker in workers if not worker.running]
        if exited or time.monotonic() > deadline:
            raise RuntimeError(f"workers not consuming: {counts}; see {exited or 'the logs'}")
        await asyncio.sleep(0.2)


async def delete_topology(
    connection: aio_pika.abc.AbstractConnection,
    names: Names,
    retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
) -> None:
    """Deletes every queue and exchange a worker at `names.prefix` declares."""
    queues = [names.queue(q) for q in (*COMMAND_QUEUES, "dead")]
    queues += [names.deliveries, names.probes, names.unrouted]
    queues += [names.delay(d) for d in sorted({*retry_delays, *DEFAULT_RETRY_DELAYS})]
    queues += [names.delay(d, q) for d in PARK_DELAYS for q in PARKED]
    # A failed delete closes its channel, so each gets a channel of its own; all at once.

    async def delete(queue: str | None = None, exchange: str | None = None) -> None:
        with contextlib.suppress(aio_pika.exceptions.AMQPError):  # it never existed
            async with connection.channel() as channel:
                if queue is not None:
                    await channel.queue_delete(queue)
                else:
                    assert exchange is not None
                    await channel.exchange_delete(exchange)

    await asyncio.gather(*(delete(queue=queue) for queue in queues))
    exchanges = (names.commands, names.events, names.dead, names.unrouted)
    await asyncio.gather(*(delete(exchange=exchange) for exchange in exchanges))


async def delete_prefix(amqp_url: str, settings: Settings) -> None:
    """Removes every queue and exchange of a test's prefix."""
    connection = await open_first(amqp_url)
    try:
        await delete_topology(connection, Names(settings.prefix), settings.retry_delays)
    finally:
        await connection.close()
