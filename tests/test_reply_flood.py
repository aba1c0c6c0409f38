"""A flood of direct reply-to tokens naming a node that does not run (contract sections 3 and 5).

Such a token is well formed, so the command runs; RabbitMQ closes the connection that publishes
its reply. The worker publishes those replies on a connection of its own, and what a flood of
them may cost it is bounded: that connection is opened again at most once a second, and a node
whose tokens alone closed it is taken for down for a while, its replies dropped at once. Every
command still runs once, and another owner's commands are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import aio_pika

from tests.support.environment import Env
from tests.support.logs import log_lines
from worker.reply_to import DIRECT_REPLY_TO

ADD = "settings.smtp_user.add"
LIST = "settings.smtp_user.list"
FLOOD = 200


def token_of_absent_node(index: int) -> str:
    """A token as the broker forms it, of a node `reply@1234567` that no cluster runs."""
    node = b"reply@1234567"
    tail = index.to_bytes(12, "big")
    pid = base64.b64encode(bytes([0x83, 0x58, 0x76]) + len(node).to_bytes(2, "big") + node + tail)
    return f"{DIRECT_REPLY_TO}.{pid.decode()}.{base64.b64encode(bytes(16)).decode()}"


def worker_lines(event: str, since: int) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in log_lines(since))
    return [line for line in lines if line.get("event") == event]


async def test_a_flood_of_tokens_of_an_absent_node_reopens_the_reply_connection_a_few_times(
    env: Env,
) -> None:
    attacker, other = await env.new_owner("attacker"), await env.new_owner("other")
    since = len(log_lines())
    exchange = await env.client.channel.get_exchange(env.client.names.commands, ensure=False)
    body = json.dumps(
        {"type": ADD, "auth": attacker, "data": {"total_limit": 1, "hourly_limit": 1}}
    ).encode()
    message_ids = [uuid.uuid4().hex for _ in range(FLOOD)]

    async def flood() -> None:
        for index, message_id in enumerate(message_ids):
            message = aio_pika.Message(
                body, message_id=message_id, reply_to=token_of_absent_node(index)
            )
            await exchange.publish(message, routing_key=ADD)

    async def timed() -> float:
        started = time.monotonic()
        reply = await env.client.call(LIST, other, {}, timeout=30)
        assert reply["status"] == "success", reply
        return time.monotonic() - started

    async def calls() -> list[float]:
        return list(await asyncio.gather(*(timed() for _ in range(20))))

    durations, _ = await asyncio.gather(calls(), flood())
    flooded = set(message_ids)

    def ran() -> list[dict[str, object]]:
        processed = worker_lines("command.processed", since)
        return [line for line in processed if line.get("message_id") in flooded]

    # A command is logged once its reply is dealt with, which may be a while after its commit.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = (await env.client.ok(LIST, attacker, {}))["smtp_list"]
        if len(listed) == FLOOD and len(ran()) >= FLOOD:
            break
        await asyncio.sleep(0.2)

    assert FLOOD == len(listed)
    assert ["success"] * FLOOD == [line["outcome"] for line in ran()]
    # Without the bounds, a connection per reply: FLOOD openings, one at a time.
    opened = worker_lines("broker.replies_connection_opened", since)
    assert len(opened) <= 10, len(opened)
    assert max(durations) < 10
