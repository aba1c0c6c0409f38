"""Idempotency (contract section 3): a `message_id` already processed is answered, not executed.

Every test runs on both stores: the guarantee rests on the store's unique key, and concurrent
duplicates race for it differently on SQLite (one writer) and PostgreSQL (many).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from tests.conftest import Client, Env

ADD = "settings.smtp_user.add"
LIMITS = {"total_limit": 100, "hourly_limit": 10}


def add_user_body(owner: dict[str, str], data: Any = None) -> bytes:
    return json.dumps({"type": ADD, "auth": owner, "data": data or LIMITS}).encode()


async def send(client: Client, body: bytes, message_id: str | None) -> bytes:
    """Publishes one command under a correlation id of its own; returns the reply's raw body."""
    future = await client.publish(body, ADD, message_id=message_id, correlation_id=uuid.uuid4().hex)
    assert future is not None
    return (await asyncio.wait_for(future, 20)).body


async def user_names(client: Client, owner: dict[str, str]) -> list[str]:
    users = (await client.ok("settings.smtp_user.list", owner, {}))["smtp_list"]
    return sorted(user["smtp_user_name"] for user in users)


async def created_events(client: Client) -> list[Any]:
    """Every `smtp_user.created` event, after waiting a moment for a second one to show up."""
    return await client.wait_events("smtp_user.created", count=2, timeout=0.5)


async def test_a_repeated_message_id_is_executed_once(env: Env) -> None:
    owner = await env.new_owner()

    await send(env.client, add_user_body(owner), "add-once")
    await send(env.client, add_user_body(owner), "add-once")

    assert len(await user_names(env.client, owner)) == 1
    assert len(await created_events(env.client)) == 1


async def test_a_repeated_message_id_gets_the_first_reply_byte_for_byte(env: Env) -> None:
    owner = await env.new_owner()

    first = await send(env.client, add_user_body(owner), "add-twice")
    second = await send(env.client, add_user_body(owner), "add-twice")

    reply = json.loads(first)
    assert first == second
    assert (reply["status"], reply["command_id"]) == ("success", "add-twice")


async def test_a_command_without_message_id_is_executed_every_time(env: Env) -> None:
    owner = await env.new_owner()

    first = json.loads(await send(env.client, add_user_body(owner), None))
    second = json.loads(await send(env.client, add_user_body(owner), None))

    names = [first["data"]["smtp_user_name"], second["data"]["smtp_user_name"]]
    assert await user_names(env.client, owner) == sorted(names)
    assert names[0] != names[1]


async def test_a_refused_command_gets_its_error_reply_again(env: Env) -> None:
    owner = await env.new_owner()
    refused = add_user_body(owner, {"total_limit": 100, "hourly_limit": 0})

    first = await send(env.client, refused, "refused-twice")
    second = await send(env.client, refused, "refused-twice")

    assert first == second
    assert json.loads(first)["error"]["name"] == "ValidationError"


async def test_a_repeat_is_answered_from_the_record_whatever_its_body(env: Env) -> None:
    owner = await env.new_owner()
    first = await send(env.client, add_user_body(owner, {"total_limit": 1, "hourly_limit": 0}), "k")

    second = await send(env.client, add_user_body(owner), "k")

    assert first == second
    assert await user_names(env.client, owner) == []


async def test_idempotency_is_per_owner(env: Env) -> None:
    alice, bob = await env.new_owner("alice"), await env.new_owner("bob")

    for_alice = json.loads(await send(env.client, add_user_body(alice), "same-id"))
    for_bob = json.loads(await send(env.client, add_user_body(bob), "same-id"))

    assert await user_names(env.client, alice) == [for_alice["data"]["smtp_user_name"]]
    assert await user_names(env.client, bob) == [for_bob["data"]["smtp_user_name"]]


async def test_concurrent_duplicates_are_executed_once_and_all_get_the_same_reply(
    env: Env,
) -> None:
    owner = await env.new_owner()
    body = add_user_body(owner)

    replies = await asyncio.gather(*(send(env.client, body, "at-once") for _ in range(20)))

    assert len(set(replies)) == 1
    assert await user_names(env.client, owner) == [json.loads(replies[0])["data"]["smtp_user_name"]]
    assert len(await created_events(env.client)) == 1
