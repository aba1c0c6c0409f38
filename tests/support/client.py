"""The RPC client the tests use: what an upstream service sees, raw.

Unlike `worker.client.Client`, it hands the test the broker's messages as they came (bytes,
headers, correlation ids), replies on a named reply queue of its own, keeps every event and
every reply nobody waited for, and publishes whatever bytes a test chooses.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika

from tests.support.logs import EVENT_BODIES, remember_secrets
from worker.broker import Names
from worker.config import Settings


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
        self, body: bytes, routing_key: str, *, reply: bool = True, **properties: Any
    ) -> asyncio.Future[aio_pika.abc.AbstractIncomingMessage] | None:
        """Publishes raw bytes to P.commands; returns the future of the reply.

        `properties` are the message's other AMQP properties (`message_id`, `headers`, ...); its
        correlation_id, unless given, is its message_id or a new one.
        """
        correlation_id = (
            properties.pop("correlation_id", None)
            or properties.get("message_id")
            or uuid.uuid4().hex
        )
        future: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] | None = None
        if reply:
            future = asyncio.get_running_loop().create_future()
            self.replies[correlation_id] = future
        exchange = await self.channel.get_exchange(self.names.commands, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=self.reply_queue.name if reply else None,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **properties,
            ),
            routing_key=routing_key,
        )
        return future

    async def call_raw(
        self, body: bytes, routing_key: str, *, timeout: float = 20, **properties: Any
    ) -> aio_pika.abc.AbstractIncomingMessage:
        """Publishes raw bytes and waits for their reply; `properties` as `publish`'s."""
        future = await self.publish(body, routing_key, **properties)
        assert future is not None
        return await asyncio.wait_for(future, timeout)

    async def call(self, type_: str, auth: Any, data: Any = None, **kw: Any) -> dict[str, Any]:
        """Sends one command and returns its reply body; `kw` as `call_raw`'s."""
        body: dict[str, Any] = {"type": type_, "auth": auth}
        if data is not None:
            body["data"] = data
        remember_secrets(body)
        message = await self.call_raw(json.dumps(body).encode(), type_, **kw)
        reply: dict[str, Any] = json.loads(message.body)
        remember_secrets(reply)
        return reply

    async def ok(self, type_: str, auth: Any, data: Any = None, **kw: Any) -> dict[str, Any]:
        """Sends one command that must succeed, and returns the reply's `data`; `kw` as `call`'s."""
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
