"""Reply queues (contract section 3): which `reply_to` a command may name, and replies that fail.

A command naming a `reply_to` it may not (the worker's own queues, `amq.…`, a direct reply-to
token not formed as the broker forms it) is not executed, gets no reply and lands in `P.dead`:
RabbitMQ 3.10 closes the publisher's whole connection over a reply to a token it cannot decode,
and with it every other tenant's commands in flight. A token of another node (on a cluster, a
client on another node) is accepted, and its reply goes out on a connection of its own. A reply
the broker refuses or drops costs the command nothing: it is acked, and the other commands'
replies and events go on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import aio_pika
import pytest
from aiormq import spec

from tests.support.client import Client
from tests.support.environment import Env
from tests.support.logs import log_lines
from worker.app import Worker
from worker.broker import Broker
from worker.reply_to import DIRECT_REPLY_TO, refusal, token_node

ADD = "settings.smtp_user.add"
LIST = "settings.smtp_user.list"
LIMITS = {"total_limit": 10, "hourly_limit": 10}
# A token this broker (3.10.8) handed out: `reply@<phash2 of rabbit@vm>`.
REAL_TOKEN = (
    "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAALGwAAAAVrAl/P.e7OVwPQ7qTdJyuOxru/oFQ=="
)
KEY = base64.b64encode(bytes(16)).decode()


def token(node: bytes, tag: int = 0x76, tail: bytes = bytes(12), key: str = KEY) -> str:
    """A direct reply-to token shaped like the broker's, with the node and atom tag given."""
    length = len(node).to_bytes(2, "big") if tag in (0x76, 0x64) else bytes([len(node)])
    pid = base64.b64encode(bytes([0x83, 0x58, tag]) + length + node + tail).decode()
    return f"{DIRECT_REPLY_TO}.{pid}.{key}"


# --- the rule, as a function ----------------------------------------------------------------------

OWN_NODE = "reply@9248884"
REFUSED_NAMES = [
    ("token-x", "amq.rabbitmq.reply-to.x"),
    ("token-three-parts", "amq.rabbitmq.reply-to.abc.def"),
    (
        "token-base64-garbage",
        f"{DIRECT_REPLY_TO}.{base64.b64encode(b'garbage' * 4).decode()}.{KEY}",
    ),
    ("node-without-digits", token(b"reply@")),
    ("node-with-letters", token(b"reply@92488x4")),
    ("node-of-another-name", token(b"rabbit@9248884")),
    ("atom-ext", token(b"reply@9248884", tag=0x64)),
    ("small-atom-ext", token(b"reply@9248884", tag=0x73)),
    ("pid-tail-short", token(b"reply@9248884", tail=bytes(11))),
    ("key-short", token(b"reply@9248884", key=base64.b64encode(bytes(15)).decode())),
    ("key-unpadded", token(b"reply@9248884", key=KEY.rstrip("="))),
    ("token-empty", f"{DIRECT_REPLY_TO}."),
    ("amq-foo", "amq.foo"),
    ("server-named", "amq.gen-JzTY20BRgKO-HjmUJj0wLg"),
    ("worker-tickets", "smtp.tickets"),
    ("worker-dead", "smtp.dead"),
    ("256-bytes", "q" * 256),
    ("empty", ""),
]


@pytest.mark.parametrize(
    "name", [case[1] for case in REFUSED_NAMES], ids=[c[0] for c in REFUSED_NAMES]
)
def test_a_reply_to_the_broker_did_not_hand_out_is_refused(name: str) -> None:
    assert refusal(name, "smtp") is not None


ACCEPTED_NAMES = [
    ("direct", DIRECT_REPLY_TO),
    ("real-token", REAL_TOKEN),
    ("small-atom-utf8", token(b"reply@9248884", tag=0x77)),
    # A node of the cluster other than the worker's, as far as the worker can tell.
    ("another-node", token(b"reply@1234567")),
    ("queue", "billing.replies"),
    ("prefix-lookalike", "smtp-replies"),
    ("255-bytes", "é" * 127 + "q"),
]


@pytest.mark.parametrize(
    "name", [case[1] for case in ACCEPTED_NAMES], ids=[c[0] for c in ACCEPTED_NAMES]
)
def test_a_queue_name_or_a_token_as_the_broker_forms_it_is_accepted(name: str) -> None:
    assert refusal(name, "smtp") is None


def test_a_real_token_names_its_node() -> None:
    assert token_node(REAL_TOKEN) == OWN_NODE


# --- through the broker ---------------------------------------------------------------------------


async def publish(
    client: Client, body: bytes, routing_key: str, reply_to: str, correlation_id: str
) -> None:
    exchange = await client.channel.get_exchange(client.names.commands, ensure=False)
    await exchange.publish(
        aio_pika.Message(body, correlation_id=correlation_id, reply_to=reply_to),
        routing_key=routing_key,
    )


def command(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


async def dead_correlation_ids(client: Client, count: int, timeout: float = 10) -> list[str]:
    """The correlation ids of what lands in P.dead, once `count` are there (or time is up)."""
    found: list[str] = []
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        found += [message.correlation_id or "" for message in await client.dead_letters()]
        await asyncio.sleep(0.05)
    return found


async def users(client: Client, owner: dict[str, str]) -> list[Any]:
    return list((await client.ok(LIST, owner, {}))["smtp_list"])


def transport_of(worker: Worker) -> object:
    assert worker.broker.connection is not None
    return worker.broker.connection.transport


async def timed_calls(client: Client, owner: dict[str, str], count: int) -> list[float]:
    """`count` concurrent commands of `owner`; the seconds each took to be answered."""

    async def one() -> float:
        started = time.monotonic()
        reply = await client.call(LIST, owner, {}, timeout=30)
        assert reply["status"] == "success", reply
        return time.monotonic() - started

    return list(await asyncio.gather(*(one() for _ in range(count))))


# An AMQP short string holds 255 bytes, and aio-pika sends an empty one as no reply_to at all.
SENDABLE_REFUSED = [case for case in REFUSED_NAMES if case[0] not in {"256-bytes", "empty"}]


async def test_commands_naming_a_refused_reply_to_are_dead_lettered_unrun_while_others_run(
    env: Env,
) -> None:
    attacker, other = await env.new_owner("attacker"), await env.new_owner("other")
    names = [name.replace("smtp.", f"{env.settings.prefix}.") for _, name in SENDABLE_REFUSED]
    transport = transport_of(env.workers[0])
    ids = [uuid.uuid4().hex for _ in names]

    attack = asyncio.gather(
        *(
            publish(env.client, command(ADD, attacker, LIMITS), ADD, name, correlation_id)
            for name, correlation_id in zip(names, ids, strict=True)
        )
    )
    durations, _ = await asyncio.gather(timed_calls(env.client, other, 20), attack)

    assert sorted(await dead_correlation_ids(env.client, len(ids))) == sorted(ids)
    assert await users(env.client, attacker) == []
    assert max(durations) < 5
    assert transport_of(env.workers[0]) is transport
    assert env.client.orphan_replies == []


Replies = asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]


async def direct_reply_to(
    env: Env,
) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractExchange, Replies]:
    """A channel of the test client's connection consuming direct reply-to into `replies`, and
    P.commands on it."""
    channel = await env.client.connection.channel()
    replies: Replies = asyncio.Queue()
    pseudo = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
    await pseudo.consume(replies.put, no_ack=True)
    exchange = await channel.get_exchange(env.client.names.commands, ensure=False)
    return channel, exchange, replies


async def test_a_client_consuming_direct_reply_to_gets_its_reply(env: Env) -> None:
    owner = await env.new_owner()
    channel, exchange, replies = await direct_reply_to(env)

    await exchange.publish(
        aio_pika.Message(command(LIST, owner, {}), reply_to=DIRECT_REPLY_TO), routing_key=LIST
    )

    reply = json.loads((await asyncio.wait_for(replies.get(), 20)).body)
    assert reply["status"] == "success"
    await channel.close()


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


async def test_direct_reply_to_works_again_after_the_worker_reconnects(env: Env) -> None:
    owner = await env.new_owner()
    channel, exchange, replies = await direct_reply_to(env)
    message = aio_pika.Message(command(LIST, owner, {}), reply_to=DIRECT_REPLY_TO)
    await exchange.publish(message, routing_key=LIST)
    await asyncio.wait_for(replies.get(), 20)
    worker = env.workers[0]
    before = transport_of(worker)
    assert worker.broker.connection is not None and before is not None

    await before.connection.close(ConnectionError("cut by the test"))  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while transport_of(worker) in (before, None) or not worker.broker.connection.connected.is_set():
        assert time.monotonic() < deadline, "the worker did not reconnect"
        await asyncio.sleep(0.1)
    await exchange.publish(message, routing_key=LIST)

    reply = json.loads((await asyncio.wait_for(replies.get(), 30)).body)
    assert reply["status"] == "success"
    await channel.close()


async def stale_token(amqp_url: str) -> str:
    """A direct reply-to token the broker formed for a connection that is now closed."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    pseudo = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
    await pseudo.consume(ignore, no_ack=True)
    probe = await channel.declare_queue(exclusive=True)
    await channel.default_exchange.publish(
        aio_pika.Message(b"", reply_to=DIRECT_REPLY_TO), probe.name
    )
    message = await probe.get(no_ack=True, timeout=5)
    await connection.close()
    assert message.reply_to is not None and message.reply_to.startswith(DIRECT_REPLY_TO + ".")
    return message.reply_to


async def processed(message_id: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The worker's `command.processed` log lines of a message_id, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in log_lines() if message_id in line]
        found = [line for line in lines if line.get("event") == "command.processed"]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def publish_add(client: Client, owner: dict[str, str], reply_to: str) -> str:
    message_id = uuid.uuid4().hex
    exchange = await client.channel.get_exchange(client.names.commands, ensure=False)
    await exchange.publish(
        aio_pika.Message(command(ADD, owner, LIMITS), message_id=message_id, reply_to=reply_to),
        routing_key=ADD,
    )
    return message_id


async def test_a_command_naming_a_stale_token_runs_and_is_acked(env: Env) -> None:
    owner = await env.new_owner()
    transport = transport_of(env.workers[0])

    message_id = await publish_add(env.client, owner, await stale_token(env.amqp_url))

    assert [line["outcome"] for line in await processed(message_id)] == ["success"]
    assert len(await users(env.client, owner)) == 1
    assert await dead_correlation_ids(env.client, 1, timeout=0.5) == []
    assert transport_of(env.workers[0]) is transport


async def test_a_token_of_a_node_that_is_not_running_costs_its_reply_only(env: Env) -> None:
    """On a cluster, a token of another node is accepted; RabbitMQ closes the connection that
    publishes to one naming no running node: the worker's own connection is not that one."""
    owner, other = await env.new_owner(), await env.new_owner()
    transport = transport_of(env.workers[0])

    message_ids = [
        await publish_add(env.client, owner, token(b"reply@1234567", tail=bytes([i]) * 12))
        for i in range(3)
    ]
    durations = await timed_calls(env.client, other, 10)

    for message_id in message_ids:
        assert [line["outcome"] for line in await processed(message_id)] == ["success"]
    assert len(await users(env.client, owner)) == 3
    assert any(
        '"reply.dropped"' in line and "token of another node" in line for line in log_lines()
    )
    assert max(durations) < 5
    assert await dead_correlation_ids(env.client, 1, timeout=0.5) == []
    assert transport_of(env.workers[0]) is transport


async def test_a_command_whose_reply_queue_does_not_exist_runs_and_is_acked(env: Env) -> None:
    owner = await env.new_owner()

    message_id = await publish_add(env.client, owner, f"gone-{uuid.uuid4().hex}")

    assert [line["outcome"] for line in await processed(message_id)] == ["success"]
    assert len(await users(env.client, owner)) == 1
    assert await dead_correlation_ids(env.client, 1, timeout=0.5) == []


async def test_a_reply_the_broker_nacks_is_dropped_and_the_command_acked(env: Env) -> None:
    owner = await env.new_owner()
    full = await env.client.channel.declare_queue(
        f"full-{uuid.uuid4().hex}",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )

    message_id = await publish_add(env.client, owner, full.name)

    lines = await processed(message_id)
    assert [line["outcome"] for line in lines] == ["success"]
    assert any(
        '"reply.dropped"' in line and message_id in line and '"nack"' in line
        for line in log_lines()
    )
    assert len(await users(env.client, owner)) == 1
    assert await dead_correlation_ids(env.client, 1, timeout=0.5) == []


async def test_a_reply_the_broker_refuses_by_closing_its_channel_costs_no_other_reply(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    poisoned = uuid.uuid4().hex
    real = Broker.reply_properties

    def refused_for_one(
        correlation_id: str | None, type_: str | None, headers: dict[str, Any]
    ) -> spec.Basic.Properties:
        properties = real(correlation_id, type_, headers)
        if correlation_id == poisoned:
            # The broker closes a channel publishing as another user (PRECONDITION_FAILED).
            properties.user_id = "intruder"
        return properties

    monkeypatch.setattr(Broker, "reply_properties", staticmethod(refused_for_one))
    victim, others = await env.new_owner("victim"), [await env.new_owner() for _ in range(4)]
    transport = transport_of(env.workers[0])

    future = await env.client.publish(command(ADD, victim, LIMITS), ADD, correlation_id=poisoned)
    replies = await asyncio.gather(
        *(env.client.call(ADD, owner, LIMITS) for owner in others for _ in range(5))
    )

    assert [reply["status"] for reply in replies] == ["success"] * 20
    assert len(await env.client.wait_events("smtp_user.created", count=21)) == 21
    assert len(await users(env.client, victim)) == 1
    assert future is not None and not future.done()
    assert await dead_correlation_ids(env.client, 1, timeout=0.5) == []
    assert transport_of(env.workers[0]) is transport
    assert any('"reply.dropped"' in line and poisoned in line for line in log_lines())


async def test_a_command_sent_to_a_worker_queue_as_reply_to_never_gets_a_reply_there(
    env: Env,
) -> None:
    owner = await env.new_owner()
    correlation_id = uuid.uuid4().hex

    await publish(
        env.client,
        command(LIST, owner, {}),
        LIST,
        f"{env.settings.prefix}.settings",
        correlation_id,
    )

    # Had it been answered, its reply would have come back through P.settings as a command, and
    # landed in P.dead as an unreadable one.
    assert await dead_correlation_ids(env.client, 2, timeout=2) == [correlation_id]


async def test_replies_in_flight_with_refused_ones_cost_not_the_connection(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker closes a channel over a reply it refuses. A reply queued on that channel behind
    it would reach the broker after the channel's close-ok, on a channel it no longer knows, and
    it closes the whole connection for that (504 CHANNEL_ERROR - expected 'channel.open')."""
    poisoned = {f"poisoned-{i}" for i in range(10)}
    real = Broker.reply_properties

    def refused_for_some(
        correlation_id: str | None, type_: str | None, headers: dict[str, Any]
    ) -> spec.Basic.Properties:
        properties = real(correlation_id, type_, headers)
        if correlation_id in poisoned:
            properties.user_id = "intruder"
        return properties

    monkeypatch.setattr(Broker, "reply_properties", staticmethod(refused_for_some))
    broker, transport = env.workers[0].broker, transport_of(env.workers[0])
    queue = await env.client.channel.declare_queue(f"replies-{uuid.uuid4().hex}", exclusive=True)
    ids = [uuid.uuid4().hex for _ in range(190)]
    for index, correlation_id in enumerate(sorted(poisoned)):
        ids.insert(index * 20 + 10, correlation_id)

    await asyncio.gather(
        *(
            broker.publish_reply(
                queue.name, b"{}", correlation_id=correlation_id, type_=None, status="success"
            )
            for correlation_id in ids
        )
    )

    assert transport_of(env.workers[0]) is transport
    assert await broker.consuming() == len(broker._consumers)
    got: list[str] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message.correlation_id or "")
    assert sorted(got) == sorted(set(ids) - poisoned)
    assert sum('"reply.dropped"' in line for line in log_lines()) >= len(poisoned)
