"""A bare aio-pika RPC echo server in its own process: the floor of any worker on this broker.

    python -m benchmarks.echo QUEUE

Declares the quorum queue QUEUE (durable, as the worker's command queues), consumes it with the
worker's prefetch, and answers each message as the worker does at the least: it publishes a
persistent reply with a broker confirm to the message's `reply_to`, then acks the message.
Prints `ready` once consuming; stops on SIGTERM. Broker: SMTP_WORKER_TEST_AMQP_URL.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import aio_pika

from benchmarks.parties import AMQP_URL
from worker.config import Settings


async def main(queue_name: str) -> None:
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=Settings.model_fields["prefetch"].default)
    queue = await channel.declare_queue(
        queue_name, durable=True, arguments={"x-queue-type": "quorum"}
    )

    async def echo(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await channel.default_exchange.publish(
            aio_pika.Message(
                message.body,
                correlation_id=message.correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            message.reply_to or "",
        )
        await message.ack()

    await queue.consume(echo)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
