"""Routing (contract sections 2, 3, 4): a command runs only under its own type, and none is lost.

The routing key picks the queue, and so the workers, a command reaches; the body's `type` picks
its handler. A body under another type's routing key is unreadable. A routing key no queue takes
goes through `P.commands`' alternate exchange to `P.unrouted`, where the worker answers it and
dead-letters it, instead of the broker dropping it unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest

from tests.support.client import Client
from tests.support.environment import Env, make_settings, running_env
from tests.support.logs import log_lines
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from worker.broker import DELIVERY_LIMIT, Names


def command(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


async def dead_body(client: Client, correlation_id: str, timeout: float = 10) -> bytes | None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for message in await client.dead_letters():
            if message.correlation_id == correlation_id:
                return message.body
        await asyncio.sleep(0.02)
    return None


def error_of(reply: aio_pika.abc.AbstractIncomingMessage) -> tuple[str, list[Any]]:
    error = json.loads(reply.body)["error"]
    return error["name"], [detail["loc"] for detail in error["details"]]


# --- the routing key must be the type -------------------------------------------------------------


async def test_a_relay_probe_under_a_ticket_routing_key_does_not_run(
    env: Env, smtp: SmtpServer, domain: str
) -> None:
    owner = await env.new_owner()
    settings = {"domain": domain, "provider": "smtp", "from": f"alerts@{domain}"}
    await env.client.ok("settings.email.create", owner, settings | {"options": relay_options(smtp)})
    body = command("settings.email.test", owner, {"domain": domain})

    reply = await env.client.call_raw(body, "ticket.zz")

    assert error_of(reply) == ("ValidationError", [["type"]])
    assert await dead_body(env.client, reply.correlation_id or "") == body
    assert smtp.connections == 0


async def test_a_body_of_one_type_under_another_of_its_queue_does_not_run(env: Env) -> None:
    owner = await env.new_owner()
    body = command("settings.smtp_user.add", owner, {"total_limit": 5, "hourly_limit": 5})

    reply = await env.client.call_raw(body, "settings.smtp_user.list")

    assert error_of(reply) == ("ValidationError", [["type"]])
    assert await dead_body(env.client, reply.correlation_id or "") == body
    assert (await env.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"] == []


# --- P.unrouted -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routing_key", "type_"),
    [
        ("nothing.here", "nothing.here"),
        ("nothing.here", "settings.smtp_user.list"),
        ("settings", "settings.smtp_user.list"),
    ],
    ids=["unknown-type", "known-type", "prefix-of-a-pattern"],
)
async def test_a_command_no_queue_takes_is_answered_and_dead_lettered(
    env: Env, routing_key: str, type_: str
) -> None:
    owner = await env.new_owner()
    body = command(type_, owner, {})

    reply = await env.client.call_raw(body, routing_key)

    assert json.loads(reply.body)["type"] == type_
    assert error_of(reply) == ("ValidationError", [["type"]])
    assert await dead_body(env.client, reply.correlation_id or "") == body


async def test_an_unroutable_command_naming_a_refused_reply_to_is_dead_lettered_unanswered(
    env: Env,
) -> None:
    correlation_id = uuid.uuid4().hex
    exchange = await env.client.channel.get_exchange(env.client.names.commands, ensure=False)

    await exchange.publish(
        aio_pika.Message(b"{}", correlation_id=correlation_id, reply_to="amq.rabbitmq.reply-to.x"),
        routing_key="nothing.here",
    )

    assert await dead_body(env.client, correlation_id) == b"{}"


async def test_a_client_may_declare_the_topology_as_the_contract_gives_it(env: Env) -> None:
    names = env.client.names
    channel = await env.client.connection.channel()
    quorum = {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": names.dead,
    }

    await channel.declare_exchange(
        names.commands,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": names.unrouted},
    )
    await channel.declare_exchange(names.unrouted, aio_pika.ExchangeType.FANOUT, durable=True)
    for queue in ("tickets", "hits", "settings", "unrouted"):
        await channel.declare_queue(names.queue(queue), durable=True, arguments=quorum)

    assert not channel.is_closed


# --- upgrading a deployment whose P.commands has no alternate exchange ----------------------------


@contextlib.asynccontextmanager
async def env_of(
    amqp_url: str,
    database_url: str,
    prepare: Callable[[aio_pika.abc.AbstractChannel, Names], Awaitable[object]],
) -> AsyncIterator[Env]:
    """A world whose workers and client the test starts itself, once `prepare` has declared
    on the broker what an earlier release or an operator left there."""
    settings = make_settings(amqp_url, database_url)
    connection = await aio_pika.connect(amqp_url)
    await prepare(await connection.channel(), Names(settings.prefix))
    await connection.close()
    async with running_env(
        amqp_url, database_url, workers=0, connect=False, settings=settings
    ) as env:
        yield env


def upgrades(prefix: str) -> int:
    return sum(
        1
        for line in log_lines()
        if "topology.commands_exchange_upgraded" in line and prefix in line
    )


async def test_a_commands_exchange_of_an_earlier_release_is_upgraded(
    amqp_url: str, database_url: str
) -> None:

    async def old_exchange(channel: aio_pika.abc.AbstractChannel, names: Names) -> None:
        await channel.declare_exchange(names.commands, aio_pika.ExchangeType.TOPIC, durable=True)

    async with env_of(amqp_url, database_url, old_exchange) as env:
        settings = env.settings
        await env.start_worker()
        await env.start_worker()  # finds it upgraded already
        env.client = await Client.connect(settings)
        owner = await env.new_owner()

        unrouted = await env.client.call_raw(command("nothing.here", owner, {}), "nothing.here")
        listed = await env.client.call("settings.smtp_user.list", owner, {})

        assert error_of(unrouted) == ("ValidationError", [["type"]])
        assert listed["status"] == "success"
        assert upgrades(settings.prefix) == 1


async def test_a_p_dead_declared_as_a_quorum_queue_is_taken_as_found(
    amqp_url: str, database_url: str
) -> None:
    """What an operator does on a cluster so that P.dead survives a node's loss (README)."""

    async def quorum_dead(channel: aio_pika.abc.AbstractChannel, names: Names) -> None:
        await channel.declare_queue(names.dead, durable=True, arguments={"x-queue-type": "quorum"})

    async with env_of(amqp_url, database_url, quorum_dead) as env:
        settings, names = env.settings, Names(env.settings.prefix)
        await env.start_worker()
        env.client = await Client.connect(settings)
        owner = await env.new_owner()
        body = command("nothing.here", owner, {})

        reply = await env.client.call_raw(body, "nothing.here")

        assert error_of(reply) == ("ValidationError", [["type"]])
        assert await dead_body(env.client, reply.correlation_id or "") == body
        # Refused (PRECONDITION_FAILED) unless it is still the quorum queue it was.
        await env.client.channel.declare_queue(
            names.dead, durable=True, arguments={"x-queue-type": "quorum"}
        )
