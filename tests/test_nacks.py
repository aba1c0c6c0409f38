"""Publishes the broker nacks for a while (contract section 4: a passing fault, not a refusal).

While a node of a cluster restarts, the broker nacks publishes for a second or two (a queue they
route to is between leaders). The worker publishes a command's events and email jobs again
after a short pause, while it still holds the command, rather than requeueing it at once: ten
redeliveries in that second would dead-letter a command that ran, unanswered. Here a queue bound
to P.events that refuses every message (`reject-publish`, no room) makes the broker nack each
event, the way it does for a queue it cannot reach, until the queue goes away.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aio_pika
from yarl import URL

from tests.support.client import Client
from tests.support.environment import Env, running_env
from tests.support.logs import log_lines
from tests.support.polling import wait_until
from tests.support.proxy import Proxy

ADD = "settings.smtp_user.add"
LIMITS = {"total_limit": 10, "hourly_limit": 10}


def nacked(message_id: str) -> int:
    return sum('"publish.nacked"' in line and message_id in line for line in log_lines())


async def refusing_events(client: Client) -> aio_pika.abc.AbstractQueue:
    """A queue bound to every event that refuses each one: the broker nacks every event."""
    queue = await client.channel.declare_queue(
        f"refusing-{uuid.uuid4().hex}",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await queue.bind(client.names.events, routing_key="#")
    return queue


async def add_user(
    client: Client, owner: dict[str, str], tag: str
) -> tuple[str, asyncio.Future[aio_pika.abc.AbstractIncomingMessage]]:
    """Publishes a `settings.smtp_user.add` under a message_id of its own: the id, the reply."""
    message_id = f"{tag}-{uuid.uuid4().hex}"
    body = json.dumps({"type": ADD, "auth": owner, "data": LIMITS}).encode()
    reply = await client.publish(body, ADD, message_id=message_id)
    assert reply is not None
    return message_id, reply


async def answered_once(
    client: Client,
    owner: dict[str, str],
    message_id: str,
    reply: asyncio.Future[aio_pika.abc.AbstractIncomingMessage],
) -> None:
    """The command got one success reply (a second had two seconds to come), made its user
    once, and nothing was dead-lettered."""
    answer = json.loads((await asyncio.wait_for(reply, 30)).body)
    assert (answer["status"], answer["command_id"]) == ("success", message_id)
    await asyncio.sleep(2)
    assert [] == [r.correlation_id for r in client.orphan_replies]
    users = (await client.ok("settings.smtp_user.list", owner, {}))["smtp_list"]
    assert [answer["data"]["smtp_user_name"]] == [user["smtp_user_name"] for user in users]
    assert [] == await client.dead_letters()


async def test_a_command_whose_events_the_broker_nacks_for_a_while_is_answered_once(
    env: Env,
) -> None:
    owner = await env.new_owner()
    refusing = await refusing_events(env.client)

    message_id, reply = await add_user(env.client, owner, "nacked")
    # The broker nacks its events for a second (the time ten redeliveries take), then no more.
    await asyncio.sleep(1.0)
    await refusing.delete(if_unused=False, if_empty=False)

    await answered_once(env.client, owner, message_id, reply)
    # Each nacked try reached the other subscribers: an event comes at least once.
    created = await env.client.wait_events("smtp_user.created", count=1)
    assert {event["owner_id"] for event in created} == {owner["owner_id"]}
    assert nacked(message_id) >= 2  # the fault happened: its event was nacked, then sent again


async def test_a_nacked_publish_whose_connection_is_lost_in_the_pause_is_not_sent_again(
    amqp_url: str, database_url: str
) -> None:
    """Once the connection is gone, the broker gives the command back and its next delivery
    publishes its results: the pending publish must not go out on the new connection as well,
    which would answer the command twice."""
    broker = URL(amqp_url)
    with Proxy(broker.port or 5672, broker.host or "127.0.0.1") as proxy:
        through_proxy = str(broker.with_host(proxy.host).with_port(proxy.port))
        async with running_env(through_proxy, database_url, connect=False) as env:
            # Only the worker goes through the proxy.
            direct = env.settings.model_copy(update={"amqp_url": amqp_url})
            env.client = await Client.connect(direct)
            owner = await env.new_owner()
            refusing = await refusing_events(env.client)

            message_id, reply = await add_user(env.client, owner, "cut")
            assert await wait_until(lambda: nacked(message_id) >= 1, 10)
            # In the pause before the next try: the worker's connection reset, at once back.
            proxy.cut()
            proxy.restore()
            await refusing.delete(if_unused=False, if_empty=False)

            await answered_once(env.client, owner, message_id, reply)
