"""Idempotency (contract section 3): a `message_id` already processed is answered, not executed.

Records are kept per owner, per principal (the owner's token, or one SMTP user) and per type;
ValidationError and AuthenticationError refusals are not remembered; a reply holding a password
is stored encrypted; and a repeat is a redelivery only when the broker says so.

Every test runs on both stores: the guarantee rests on the store's unique key, and concurrent
duplicates race for it differently on SQLite (one writer) and PostgreSQL (many).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any

import pytest

from tests.support.client import Client
from tests.support.environment import Env
from tests.support.payloads import email_settings
from tests.support.smtp_servers import SmtpServer, silent_port
from tests.support.tenants import unique_domain
from tests.support.world import configure
from worker.handlers.base import Context

ADD = "settings.smtp_user.add"
EDIT = "settings.smtp_user.edit"
LIMITS = {"total_limit": 100, "hourly_limit": 10}


def add_user_body(owner: dict[str, str], data: Any = None) -> bytes:
    return json.dumps({"type": ADD, "auth": owner, "data": data or LIMITS}).encode()


async def send(client: Client, body: bytes, message_id: str | None, type_: str = ADD) -> bytes:
    """Publishes one command under a correlation id of its own; returns the reply's raw body."""
    future = await client.publish(
        body, type_, message_id=message_id, correlation_id=uuid.uuid4().hex
    )
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


async def test_a_refused_command_gets_its_error_reply_again_without_running_again(
    env: Env,
) -> None:
    owner = await env.new_owner()
    missing = json.dumps(
        {"type": EDIT, "auth": owner, "data": {"smtp_user_name": "smtp_nobody"}}
    ).encode()

    first = await send(env.client, missing, "refused-twice", EDIT)
    second = await send(env.client, missing, "refused-twice", EDIT)

    assert first == second
    assert json.loads(first)["error"]["name"] == "NotFound"
    failed = await env.client.wait_events("command.failed", count=2, timeout=0.5)
    assert [event["data"]["command_id"] for event in failed] == ["refused-twice"]


async def test_a_repeat_is_answered_from_the_record_whatever_its_body(env: Env) -> None:
    owner = await env.new_owner()
    first = await send(env.client, add_user_body(owner), "k")
    invalid = add_user_body(owner, {"total_limit": 1, "hourly_limit": 0})

    second = await send(env.client, invalid, "k")

    assert first == second
    assert await user_names(env.client, owner) == [json.loads(first)["data"]["smtp_user_name"]]


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


# --- scope: per owner, per principal, per type (contract section 3) ----------------------------


def body_of(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


async def test_a_corrected_command_may_reuse_the_message_id_of_a_validation_error(
    env: Env,
) -> None:
    owner = await env.new_owner()
    refused = await send(env.client, add_user_body(owner, {"total_limit": 5}), "fix-me")

    corrected = json.loads(await send(env.client, add_user_body(owner), "fix-me"))

    assert json.loads(refused)["error"]["name"] == "ValidationError"
    assert corrected["status"] == "success"
    assert await user_names(env.client, owner) == [corrected["data"]["smtp_user_name"]]


async def test_a_command_may_reuse_the_message_id_of_an_authentication_error(env: Env) -> None:
    owner = await env.new_owner()
    wrong = {"owner_id": owner["owner_id"], "token": "wrong-" + uuid.uuid4().hex}
    refused = await send(env.client, add_user_body(wrong), "retry-auth")

    retried = json.loads(await send(env.client, add_user_body(owner), "retry-auth"))

    assert json.loads(refused)["error"]["name"] == "AuthenticationError"
    assert retried["status"] == "success"


async def test_a_repeat_of_another_type_is_a_conflict_and_changes_nothing(env: Env) -> None:
    owner = await env.new_owner()
    added = json.loads(await send(env.client, add_user_body(owner), "one-id"))
    name = added["data"]["smtp_user_name"]
    delete = body_of("settings.smtp_user.delete", owner, {"smtp_user_name": name})

    reused = json.loads(await send(env.client, delete, "one-id", "settings.smtp_user.delete"))

    assert (reused["status"], reused["error"]["name"]) == ("error", "Conflict")
    assert await user_names(env.client, owner) == [name]
    # The first command's record stands: its repeat still gets its own reply.
    assert json.loads(await send(env.client, add_user_body(owner), "one-id")) == added


async def test_a_relay_probe_whose_message_id_another_type_took_meanwhile_is_a_conflict(
    env: Env,
) -> None:
    """A relay probe is answered, and recorded, once its relay has answered (contract 6): a
    command of another type that reused its message_id meanwhile is recorded first. The probe is
    then a Conflict, as any repeat of another type is, not that command's reply."""
    owner = await env.new_owner()
    domain = unique_domain()
    test = body_of("settings.email.test", owner, {"domain": domain})
    get = body_of("settings.email.get", owner, {"domain": domain})
    with silent_port() as port:
        options = {"host": "127.0.0.1", "port": port, "starttls": "never", "timeout": 5}
        await env.client.ok("settings.email.create", owner, email_settings(domain, **options))
        probed = await env.client.publish(
            test, "settings.email.test", message_id="probe-id", correlation_id="probe"
        )
        assert probed is not None
        await asyncio.sleep(0.5)  # the probe waits for its silent relay, 5 s

        got = json.loads(await send(env.client, get, "probe-id", "settings.email.get"))
        refused = json.loads((await asyncio.wait_for(probed, 20)).body)

    assert ("success", "settings.email.get") == (got["status"], got["type"])
    assert ("error", "settings.email.test", "Conflict") == (
        refused["status"],
        refused["type"],
        refused["error"]["name"],
    )
    # The first command's record stands: its repeat still gets its own reply.
    assert got == json.loads(await send(env.client, get, "probe-id", "settings.email.get"))


async def test_an_smtp_user_reusing_its_owners_message_id_gets_its_own_answer(
    env: Env, smtp: SmtpServer
) -> None:
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    added = json.loads(await send(env.client, add_user_body(world.owner), "shared-id"))
    user = {"login": added["data"]["smtp_user_name"], "password": added["data"]["smtp_password"]}
    get = body_of("ticket.get", user, {"sid": sid})

    reply = await send(env.client, get, "shared-id", "ticket.get")

    assert json.loads(reply)["data"]["ticket"]["sid"] == sid
    assert user["password"].encode() not in reply


async def test_two_smtp_users_of_one_owner_may_use_the_same_message_id(
    env: Env, smtp: SmtpServer
) -> None:
    world = await configure(env, smtp)
    other = await env.client.ok(ADD, world.owner, LIMITS)
    users = [world.auth, {"login": other["smtp_user_name"], "password": other["smtp_password"]}]
    new = [body_of("ticket.new", user, world.ticket_data()) for user in users]

    replies = [json.loads(await send(env.client, body, "per-user", "ticket.new")) for body in new]

    assert [reply["data"]["created"] for reply in replies] == [True, True]
    assert replies[0]["data"]["sid"] != replies[1]["data"]["sid"]


@pytest.mark.parametrize(
    ("type_", "data"),
    [(ADD, LIMITS), ("settings.smtp_user.reset_password", None)],
    ids=["add", "reset_password"],
)
async def test_a_stored_reply_holding_a_password_is_encrypted(
    env: Env, type_: str, data: Any
) -> None:
    owner = await env.new_owner()
    if data is None:
        data = {"smtp_user_name": (await env.client.ok(ADD, owner, LIMITS))["smtp_user_name"]}

    first = await send(env.client, body_of(type_, owner, data), "secret-reply", type_)

    password = json.loads(first)["data"]["smtp_password"]
    rows = await env.query(
        "SELECT reply, secret FROM processed_commands"
        " WHERE owner_id = :owner AND message_id = 'secret-reply'",
        owner=owner["owner_id"],
    )
    assert [bool(secret) for _, secret in rows] == [True]
    assert password not in rows[0][0]
    assert await send(env.client, body_of(type_, owner, data), "secret-reply", type_) == first


# --- redeliveries are what the broker says (x-delivery-count) -----------------------------------

FORGED = {"x-delivery-count": 10}


async def queued_email_jobs(env: Env) -> int:
    channel = await env.client.connection.channel()
    try:
        queue = await channel.declare_queue(env.client.names.deliveries, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def test_a_repeat_with_a_forged_delivery_count_gets_its_reply_only(
    env: Env, smtp: SmtpServer
) -> None:
    while env.workers:  # no delivery consumer: the email jobs stay in P.deliveries, countable
        await env.workers.pop().stop()
    await env.start_worker(queues=("tickets", "hits", "settings"))
    world = await configure(env, smtp)
    body = body_of("ticket.new", world.auth, world.ticket_data())
    first = await send(env.client, body, "forged", "ticket.new")

    future = await env.client.publish(body, "ticket.new", message_id="forged", headers=FORGED)
    assert future is not None
    second = (await asyncio.wait_for(future, 20)).body

    assert second == first
    assert len(await env.client.wait_events("ticket.created", count=2, timeout=0.5)) == 1
    assert await queued_email_jobs(env) == 1


async def test_a_fresh_command_with_a_forged_delivery_count_is_not_its_last_attempt(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = await env.new_owner()
    router = env.workers[0].router
    spec = router[ADD]
    attempts: list[int] = []

    async def fails_once(ctx: Context, data: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("a passing fault")
        return await spec.handler(ctx, data)

    monkeypatch.setitem(router.specs, ADD, dataclasses.replace(spec, handler=fails_once))

    future = await env.client.publish(add_user_body(owner), ADD, headers=FORGED)
    assert future is not None
    reply = json.loads((await asyncio.wait_for(future, 20)).body)

    assert reply["status"] == "success"
    assert len(attempts) == 2
