"""Bad input through the real broker: every one is answered, and its fate is the contract's.

Unreadable messages (contract section 4) get a `ValidationError` reply and are rejected into
`P.dead` with their body untouched; commands refused by the rules get an error reply, are acked
and announced by `command.failed`; an unexpected fault is retried up to the delivery limit. None
of it stops the worker.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from tests.support.client import Client
from tests.support.environment import Env, running_env
from tests.support.tenants import unique_domain
from worker import consumer
from worker.broker import DELIVERY_LIMIT
from worker.handlers.base import Context, Spec

Auth = dict[str, str]
Message = aio_pika.abc.AbstractIncomingMessage


async def dead_letter(
    client: Client, correlation_id: str | None, timeout: float = 10
) -> Message | None:
    """The message of this correlation id once it is in P.dead (the others there are dropped)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for message in await client.dead_letters():
            if message.correlation_id == correlation_id:
                return message
        await asyncio.sleep(0.02)
    return None


async def dead_body(client: Client, correlation_id: str | None) -> bytes | None:
    message = await dead_letter(client, correlation_id)
    return None if message is None else message.body


async def answers_a_good_command(client: Client, owner: Auth) -> bool:
    reply = await client.call("settings.smtp_user.list", owner, {})
    return reply["status"] == "success"


def command(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


class World:
    """A worker shared by the module's tests, and two owners, the first with email settings."""

    def __init__(self, env: Env, owner: Auth, other: Auth, domain: str) -> None:
        self.env, self.client = env, env.client
        self.owner, self.other, self.domain = owner, other, domain


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared_database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="module")
async def world(amqp_url: str, shared_database_url: str) -> AsyncIterator[World]:
    """One worker for the module: each test reads only what it sent, so they can share it."""
    async with running_env(amqp_url, shared_database_url) as env:
        owner, other, domain = (
            await env.new_owner("first"),
            await env.new_owner("second"),
            unique_domain(),
        )
        await env.client.ok(
            "settings.email.create",
            owner,
            {
                "domain": domain,
                "provider": "smtp",
                "from": f"alerts@{domain}",
                "options": {"host": "127.0.0.1", "port": 2525},
            },
        )
        yield World(env, owner, other, domain)


# --- unreadable: ValidationError, rejected into P.dead ------------------------------------------

UNREADABLE: list[tuple[str, str, Callable[[Auth], bytes], str | None, list[str]]] = [
    # id, routing key, body (given an owner's auth), message_id, loc of the one detail
    ("not-json", "settings.smtp_user.list", lambda a: b'{"type": "settings.', None, []),
    ("invalid-utf8", "settings.smtp_user.list", lambda a: b'{"type": "\xff\xfe"}', None, []),
    ("json-array", "settings.smtp_user.list", lambda a: b'[{"type": "x"}]', None, []),
    ("json-string", "settings.smtp_user.list", lambda a: b'"settings"', None, []),
    ("empty-body", "settings.smtp_user.list", lambda a: b"", None, []),
    (
        "unknown-type",
        "settings.nope",
        lambda a: command("settings.nope", a, {}),
        None,
        ["type"],
    ),
    (
        "missing-type",
        "settings.smtp_user.list",
        lambda a: json.dumps({"auth": a, "data": {}}).encode(),
        None,
        ["type"],
    ),
    (
        "message-id-with-nul",
        "settings.smtp_user.list",
        lambda a: command("settings.smtp_user.list", a, {}),
        "id\x00",
        ["properties", "message_id"],
    ),
    (
        "message-id-over-128",
        "settings.smtp_user.list",
        lambda a: command("settings.smtp_user.list", a, {}),
        "m" * 129,
        ["properties", "message_id"],
    ),
]
UNREADABLE_IDS = [case[0] for case in UNREADABLE]


@pytest.mark.parametrize(
    ("routing_key", "make_body", "message_id", "loc"),
    [case[1:] for case in UNREADABLE],
    ids=UNREADABLE_IDS,
)
async def test_an_unreadable_message_is_answered_validation_error(
    world: World,
    routing_key: str,
    make_body: Callable[[Auth], bytes],
    message_id: str | None,
    loc: list[str],
) -> None:
    reply = await world.client.call_raw(make_body(world.owner), routing_key, message_id=message_id)

    body = json.loads(reply.body)
    assert (body["status"], reply.headers["status"]) == ("error", "error")
    assert body["error"]["name"] == "ValidationError"
    assert [detail["loc"] for detail in body["error"]["details"]] == [loc]


@pytest.mark.parametrize(
    ("routing_key", "make_body", "message_id"),
    [case[1:4] for case in UNREADABLE],
    ids=UNREADABLE_IDS,
)
async def test_an_unreadable_message_lands_in_dead_with_its_body_untouched(
    world: World, routing_key: str, make_body: Callable[[Auth], bytes], message_id: str | None
) -> None:
    body = make_body(world.owner)

    reply = await world.client.call_raw(body, routing_key, message_id=message_id)

    assert await dead_body(world.client, reply.correlation_id) == body


async def test_an_unreadable_message_without_reply_to_lands_in_dead(world: World) -> None:
    correlation_id = uuid.uuid4().hex

    await world.client.publish(
        b"\x00\xffnot json", "settings.x", correlation_id=correlation_id, reply=False
    )

    assert await dead_body(world.client, correlation_id) == b"\x00\xffnot json"


async def test_a_body_over_max_message_bytes_is_answered_and_dead_lettered(env: Env) -> None:
    while env.workers:
        await env.workers.pop().stop()
    await env.start_worker(max_message_bytes=1024)
    owner = await env.new_owner()
    body = command("settings.smtp_user.list", owner, {"padding": "x" * 1024})

    reply = await env.client.call_raw(body, "settings.smtp_user.list")

    error = json.loads(reply.body)["error"]
    assert (error["name"], [d["loc"] for d in error["details"]]) == ("ValidationError", [[]])
    assert await dead_body(env.client, reply.correlation_id) == body
    assert await answers_a_good_command(env.client, owner)


# --- refused by the rules: error reply, acked, command.failed -----------------------------------

REFUSED: list[tuple[str, Callable[[World], tuple[str, Any, Any]], str, Callable[[World], Any]]] = [
    # id, (type, auth, data), error name, details (the locs of a ValidationError's)
    (
        "missing-field",
        lambda w: ("settings.smtp_user.add", w.owner, {"total_limit": 5}),
        "ValidationError",
        lambda w: [["data", "hourly_limit"]],
    ),
    (
        "wrong-type",
        lambda w: ("settings.smtp_user.add", w.owner, {"total_limit": "5", "hourly_limit": 1}),
        "ValidationError",
        lambda w: [["data", "total_limit"]],
    ),
    (
        "non-positive-limit",
        lambda w: ("settings.smtp_user.add", w.owner, {"total_limit": 5, "hourly_limit": 0}),
        "ValidationError",
        lambda w: [["data", "hourly_limit"]],
    ),
    (
        "invalid-email-address",
        lambda w: (
            "settings.channel.put",
            w.owner,
            {"name": "ops", "domain": w.domain, "recipients": ["ops@example.com", "not-an-email"]},
        ),
        "ValidationError",
        lambda w: [["data", "recipients", 1]],
    ),
    (
        # PostgreSQL cannot store U+0000: refused alike on both stores, before any query.
        "nul-character",
        lambda w: ("settings.smtp_user.edit", w.owner, {"smtp_user_name": "smtp_\x00"}),
        "ValidationError",
        lambda w: [["data", "smtp_user_name"]],
    ),
    (
        "nul-character-in-auth",
        lambda w: (
            "settings.smtp_user.list",
            {"owner_id": "\x00", "token": "nul-" + uuid.uuid4().hex},
            {},
        ),
        "AuthenticationError",
        lambda w: None,
    ),
    (
        "wrong-token",
        lambda w: (
            "settings.smtp_user.list",
            {"owner_id": w.owner["owner_id"], "token": "wrong-" + uuid.uuid4().hex},
            {},
        ),
        "AuthenticationError",
        lambda w: None,
    ),
    (
        "missing-auth",
        lambda w: ("settings.smtp_user.list", None, {}),
        "AuthenticationError",
        lambda w: None,
    ),
    (
        "another-owners-domain",
        lambda w: ("settings.email.get", w.other, {"domain": w.domain}),
        "NotFound",
        lambda w: {"missing": [w.domain]},
    ),
]
REFUSED_IDS = [case[0] for case in REFUSED]


async def failed_events(client: Client, command_id: str, timeout: float = 5) -> list[Any]:
    """The data of the `command.failed` events of this command, once there is one."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [
            event["data"]
            for event in client.events
            if event["type"] == "command.failed" and event["data"]["command_id"] == command_id
        ]
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.02)


def _locs(details: Any) -> Any:
    if isinstance(details, list):
        return [detail["loc"] for detail in details]
    return details


@pytest.mark.parametrize(
    ("make_command", "name", "make_details"), [case[1:] for case in REFUSED], ids=REFUSED_IDS
)
async def test_a_refused_command_is_answered_with_its_error(
    world: World,
    make_command: Callable[[World], tuple[str, Any, Any]],
    name: str,
    make_details: Callable[[World], Any],
) -> None:
    reply = await world.client.call(*make_command(world))

    assert reply["status"] == "error"
    assert (reply["error"]["name"], _locs(reply["error"]["details"])) == (name, make_details(world))


@pytest.mark.parametrize(("make_command", "name"), [case[1:3] for case in REFUSED], ids=REFUSED_IDS)
async def test_a_refused_command_is_announced_by_command_failed(
    world: World, make_command: Callable[[World], tuple[str, Any, Any]], name: str
) -> None:
    type_, auth, data = make_command(world)
    message_id = uuid.uuid4().hex

    await world.client.call(type_, auth, data, message_id=message_id)

    failed = await failed_events(world.client, message_id)
    assert [(data["type"], data["error"]["name"]) for data in failed] == [(type_, name)]


@pytest.mark.parametrize("make_command", [case[1] for case in REFUSED], ids=REFUSED_IDS)
async def test_a_refused_command_is_acked_not_dead_lettered(
    world: World, make_command: Callable[[World], tuple[str, Any, Any]]
) -> None:
    type_, auth, data = make_command(world)
    message_id = uuid.uuid4().hex

    await world.client.call(type_, auth, data, message_id=message_id)

    # Had it been rejected, it would be there by now: the reject follows the reply at once.
    assert await dead_letter(world.client, message_id, timeout=0.3) is None


async def test_a_refused_command_changes_nothing(world: World) -> None:
    owner = await world.env.new_owner()

    await world.client.call("settings.smtp_user.add", owner, {"total_limit": 5})

    assert (await world.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"] == []


# --- faults: retried up to the delivery limit -------------------------------------------------


async def test_an_unexpected_error_is_retried_until_the_delivery_limit_then_dead_lettered(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await env.new_owner()
    attempts: list[int] = []

    async def broken(ctx: Context, data: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("a bug")

    monkeypatch.setitem(
        env.workers[0].router.specs,
        "settings.smtp_user.list",
        Spec("settings.smtp_user.list", "owner", broken),
    )
    body = command("settings.smtp_user.list", owner, {})

    reply = await env.client.call_raw(body, "settings.smtp_user.list", message_id="boom")

    error = json.loads(reply.body)["error"]
    assert (error["name"], error["details"]) == ("GeneralError", None)
    assert await dead_body(env.client, "boom") == body
    # The first delivery, then one more per return the quorum queue's x-delivery-limit allows.
    assert len(attempts) == DELIVERY_LIMIT + 1
    assert env.client.orphan_replies == []


async def test_a_crash_of_the_consumer_itself_still_ends_in_dead(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise TypeError("a bug")

    monkeypatch.setattr(consumer, "error_reply", broken)
    correlation_id = uuid.uuid4().hex

    await env.client.publish(b"not json", "settings.x", correlation_id=correlation_id)

    # Each delivery is requeued, the delivery limit ends it: no message is held forever.
    assert await dead_body(env.client, correlation_id) == b"not json"


# --- the worker goes on -------------------------------------------------------------------------


async def test_the_worker_answers_a_good_command_after_every_bad_input(world: World) -> None:
    for _, routing_key, make_body, message_id, _ in UNREADABLE:
        await world.client.call_raw(make_body(world.owner), routing_key, message_id=message_id)
    for _, make_command, _, _ in REFUSED:
        await world.client.call(*make_command(world))

    assert await answers_a_good_command(world.client, world.owner)
