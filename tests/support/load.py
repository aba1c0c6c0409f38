"""The fault scenarios' load client: an upstream service that keeps every reply it gets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika

from tests.support.logs import remember_secrets
from tests.support.polling import wait_until
from worker.broker import Names
from worker.config import Settings
from worker.connection import connect_first

# Bounds of every wait below: generous, since the machine may be busy with other test runs.
START_TIMEOUT = 60.0


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
