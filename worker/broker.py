"""The broker: topology, confirmed publishing, replies and events.

Every name below carries the deployment's prefix `P`:

    P.commands (topic) --ticket.*--> P.tickets     (quorum) --+
                       --hit.*-----> P.hits        (quorum) --+-- dead-letter --> P.dead (fanout)
                       --settings.#> P.settings    (quorum) --+                     |
                                     P.deliveries  (quorum) --+                  P.dead (queue)
    P.deliveries.delay.<ms> (classic, TTL) -- dead-letter back to --> P.deliveries
    P.events (topic): domain events, routing key = event type
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq.exceptions import AMQPError as AiormqError

from worker.config import Settings
from worker.errors import BrokerUnavailable

# Quorum queues count every return of a message (reject with requeue, a consumer's channel
# closing); past this many returns the broker dead-letters it. Changing it means redeclaring
# the queues, so it is a constant, not a setting.
DELIVERY_LIMIT = 10
COMMAND_QUEUES: Mapping[str, str] = {
    "tickets": "ticket.*",
    "hits": "hit.*",
    "settings": "settings.#",
}
PUBLISH_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def deliveries(self) -> str:
        return f"{self.prefix}.deliveries"

    def queue(self, short: str) -> str:
        return f"{self.prefix}.{short}"

    def delay(self, seconds: float) -> str:
        return f"{self.prefix}.deliveries.delay.{round(seconds * 1000)}ms"


def _publish_errors() -> tuple[type[BaseException], ...]:
    return (
        AMQPError,
        AiormqError,
        ChannelInvalidStateError,
        ConnectionError,
        OSError,
        asyncio.TimeoutError,
        RuntimeError,
    )


async def settle(action: Awaitable[Any], event: str) -> None:
    """Awaits an ack or reject. On a dead channel it fails, and that is fine: the broker gives
    every unacked message back by itself, so the failure is logged as `event` and dropped."""
    try:
        await action
    except Exception:  # noqa: BLE001 - see the docstring
        structlog.get_logger("worker.broker").warning(event)


class Broker:
    """One robust connection; a confirming channel to publish; one channel per consumer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        # Strong references: aio-pika restores channels and consumers after a reconnect only
        # while they are alive (aio-pika issues #231, #626).
        self._consumers: list[tuple[AbstractChannel, AbstractQueue, str]] = []

    async def connect(self) -> None:
        name = f"smtp-worker {socket.gethostname()}:{os.getpid()}"
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url, client_properties={"connection_name": name}
        )
        self._publisher = await self.connection.channel(publisher_confirms=True)
        await self._declare(self._publisher)

    @property
    def _quorum(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.names.dead,
        }

    async def _declare(self, channel: AbstractChannel) -> None:
        names = self.names
        topic, fanout = aio_pika.ExchangeType.TOPIC, aio_pika.ExchangeType.FANOUT
        commands = await channel.declare_exchange(names.commands, topic, durable=True)
        self._exchanges["events"] = await channel.declare_exchange(
            names.events, topic, durable=True
        )
        dead = await channel.declare_exchange(names.dead, fanout, durable=True)
        dead_queue = await channel.declare_queue(names.dead, durable=True)
        await dead_queue.bind(dead)
        for short, pattern in COMMAND_QUEUES.items():
            queue = await channel.declare_queue(
                names.queue(short), durable=True, arguments=self._quorum
            )
            await queue.bind(commands, pattern)
        await channel.declare_queue(names.deliveries, durable=True, arguments=self._quorum)
        for delay in self.settings.retry_delays:
            await channel.declare_queue(
                names.delay(delay),
                durable=True,
                arguments={
                    "x-message-ttl": round(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.deliveries,
                },
            )
        self._exchanges["commands"] = commands

    async def consume(
        self,
        short: str,
        callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
        prefetch: int,
    ) -> None:
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        arguments = self._quorum
        queue = await channel.declare_queue(
            self.names.queue(short), durable=True, arguments=arguments
        )
        tag = await queue.consume(callback)
        self._consumers.append((channel, queue, tag))

    async def stop_consuming(self) -> None:
        """Cancels every consumer: no new deliveries; what is in flight goes on."""
        for _channel, queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except _publish_errors():
                pass  # the channel is gone: the broker returns its messages anyway

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        type_: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publishes a persistent message and waits for the broker's confirm."""
        assert self._publisher is not None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=correlation_id,
            type=type_,
            headers=headers,
        )
        target = self._publisher.default_exchange if exchange == "" else self._exchanges[exchange]
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                # After a reconnect aio-pika restores channels one by one, in no fixed order: the
                # consumers' may be back before this one. Wait for it rather than fail, which
                # would spend a delivery attempt of the message being processed.
                await self._publisher.ready()
                await target.publish(message, routing_key, mandatory=False)
        except _publish_errors() as exc:
            raise BrokerUnavailable(f"publish to {exchange or 'default'} failed") from exc

    async def publish_event(self, routing_key: str, body: bytes) -> None:
        await self.publish("events", routing_key, body)

    async def publish_reply(
        self,
        reply_to: str,
        body: bytes,
        *,
        correlation_id: str | None,
        type_: str | None,
        status: str,
    ) -> None:
        await self.publish(
            "",
            reply_to,
            body,
            correlation_id=correlation_id,
            type_=type_,
            headers={"status": status},
        )

    async def publish_delivery(self, body: bytes, *, delay: float | None = None) -> None:
        queue = self.names.deliveries if delay is None else self.names.delay(delay)
        await self.publish("", queue, body)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        self._consumers.clear()
