"""`smtp-worker dead list` and `smtp-worker dead replay`, run as the operator runs them.

Every test dead-letters messages through the real worker and broker, then runs the command in a
subprocess against the test's prefix and reads its output.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.support.commandline import smtp_worker as run
from tests.support.environment import Env
from tests.support.logs import remember_secrets
from tests.support.payloads import email_settings
from tests.support.tenants import unique_domain
from worker.handlers.base import Context

# P.dead is the broker's business: one store is enough.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

Message = aio_pika.abc.AbstractIncomingMessage


async def smtp_worker(env: Env, *args: str, prefix: str | None = None) -> tuple[int, str, str]:
    """Runs `smtp-worker ARGS` on the test's broker and prefix: exit code, stdout, stderr."""
    ran = await run(
        *args,
        cwd=Path.cwd(),
        timeout=60,
        amqp_url=env.amqp_url,
        prefix=prefix or env.settings.prefix,
        log_level="WARNING",
    )
    return ran.code, ran.stdout, ran.stderr


async def dead_list(env: Env, *args: str) -> list[dict[str, Any]]:
    code, out, err = await smtp_worker(env, "dead", "list", *args)
    assert 0 == code, err
    return [json.loads(line) for line in out.splitlines()]


async def dead_replay(env: Env, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = await smtp_worker(env, "dead", "replay", *args)
    assert out, err
    summary: dict[str, Any] = json.loads(out)
    return code, summary


async def depth(env: Env, queue: str) -> int:
    channel = await env.client.connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result is not None
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


async def wait_depth(env: Env, queue: str, expected: int, timeout: float = 10) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    while (found := await depth(env, queue)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    return found


async def dead_letter_unreadable(env: Env, count: int, routing_key: str = "ticket.new") -> None:
    """Publishes `count` unreadable commands, waits for their replies and for them in P.dead."""
    already = await depth(env, env.client.names.dead)
    for i in range(count):
        await env.client.call_raw(f"not json {i}".encode(), routing_key, message_id=f"bad-{i}")
    assert already + count == await wait_depth(env, env.client.names.dead, already + count)


async def stop_worker(env: Env) -> None:
    """Stops the test's worker, so that replayed messages wait in their queues to be seen."""
    await env.workers.pop().stop()


async def take(env: Env, queue: str) -> list[Message]:
    channel = await env.client.connection.channel()
    try:
        source = await channel.get_queue(queue)
        taken = []
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken
    finally:
        await channel.close()


# --- dead list ----------------------------------------------------------------------------------


async def test_list_shows_an_unreadable_message_the_worker_dead_lettered(env):
    await dead_letter_unreadable(env, 1)

    listed = await dead_list(env)

    names = env.client.names
    assert [
        {
            "routing_key": "ticket.new",
            "type": None,
            "message_id": "bad-0",
            "correlation_id": "bad-0",
            "reason": "rejected",
            "queue": names.queue("tickets"),
            "count": 1,
            "replay_to": f"{names.commands} ticket.new",
            "body_bytes": 10,
            "body": None,
        }
    ] == [{k: v for k, v in line.items() if k != "died_at"} for line in listed]


async def test_list_leaves_the_queue_as_it_was_in_order(env):
    await dead_letter_unreadable(env, 5)

    first = await dead_list(env)
    second = await dead_list(env)

    taken = await take(env, env.client.names.dead)
    assert first == second
    assert [m.message_id for m in taken] == [line["message_id"] for line in first]


async def test_list_reads_p_dead_on_the_first_node_of_a_list_that_answers(env):
    await dead_letter_unreadable(env, 1)
    cluster = dataclasses.replace(env, amqp_url=f"amqp://guest:guest@127.0.0.1:1/,{env.amqp_url}")

    listed = await dead_list(cluster)

    assert ["bad-0"] == [line["message_id"] for line in listed]


async def test_list_honours_limit_from_the_head(env):
    await dead_letter_unreadable(env, 3)
    everything = await dead_list(env)

    assert everything[:2] == await dead_list(env, "--limit", "2")
    assert 3 == await depth(env, env.client.names.dead)


async def test_list_masks_secrets_in_the_body(env):
    password = "hunter2-" + uuid.uuid4().hex
    body = {"type": "ticket.explode", "auth": {"login": "u1", "password": password}, "data": {}}
    remember_secrets(body)
    await env.client.call_raw(json.dumps(body).encode(), "ticket.explode")
    await wait_depth(env, env.client.names.dead, 1)

    (line,) = await dead_list(env)

    assert password not in json.dumps(line)
    assert '"password": "********"' in line["body"]
    assert "ticket.explode" == line["type"]


async def dead_letter(env: Env, body: bytes) -> None:
    """Puts `body` in P.dead as it is, as if a worker had dead-lettered it."""
    names = env.client.names
    dead = await env.client.channel.get_exchange(names.dead, ensure=False)
    await dead.publish(aio_pika.Message(body, message_id="hostile"), routing_key="")
    assert 1 == await wait_depth(env, names.dead, 1)


SECRET = "s3cr3t-" + uuid.uuid4().hex
MASK = "********"


def hostile(text: str) -> str:
    """`text` with @SECRET@ as it is, and @ESCAPED@ as the secret with a JSON escape in it."""
    return text.replace("@SECRET@", SECRET).replace("@ESCAPED@", "\\u0073" + SECRET[1:])


# Bodies that are strict JSON: shown, re-serialized, with every secret masked.
READABLE = {
    "escaped-key-names": (
        '{"type": "ticket.new", "auth": {"login": "u1", "pass\\u0077ord": "@SECRET@"},'
        ' "data": {"tok\\u0065n": "@SECRET@", "options": {"p\\u0061ss": "@SECRET@"}}}',
        {
            "type": "ticket.new",
            "auth": {"login": MASK, "password": MASK},
            "data": {"token": MASK, "options": {"pass": MASK}},
        },
    ),
    "escaped-secret-value": (
        '{"type": "hit.new", "password": "@ESCAPED@", "comment": "no secret here"}',
        {"type": "hit.new", "password": MASK, "comment": "no secret here"},
    ),
    "nested-auth": (
        '{"type": "hit.new", "data": {"options": {"host": "relay.example.com",'
        ' "auth": {"user": "relay", "key": "@SECRET@", "more": {"deeper": "@SECRET@"}}},'
        ' "list": [{"auth": "@SECRET@"}, {"auth": ["@SECRET@"]}]}}',
        {
            "type": "hit.new",
            "data": {
                "options": {
                    "host": "relay.example.com",
                    "auth": {"user": MASK, "key": MASK, "more": MASK},
                },
                "list": [{"auth": MASK}, {"auth": MASK}],
            },
        },
    ),
    "upper-case-keys": (
        '{"PASSWORD": "@SECRET@", "Token": "@SECRET@", "SMTP_Password": "@SECRET@",'
        ' "Secret": "@SECRET@", "PASS": "@SECRET@", "AUTH": {"Login": "@SECRET@"}}',
        {
            "PASSWORD": MASK,
            "Token": MASK,
            "SMTP_Password": MASK,
            "Secret": MASK,
            "PASS": MASK,
            "AUTH": {"Login": MASK},
        },
    ),
    "secrets-that-are-not-strings": (
        '{"type": "hit.new", "data": {"token": {"value": "@SECRET@"}, "secret": ["@SECRET@"],'
        ' "pass": 7}}',
        {"type": "hit.new", "data": {"token": MASK, "secret": MASK, "pass": MASK}},
    ),
}
# Bodies that are not: not shown at all, however much of them a reader could make out.
UNREADABLE = {
    "duplicate-keys": b'{"type": "ticket.new", "data": {"token": 1, "token": "@SECRET@"}}',
    "truncated": b'{"type": "ticket.new", "auth": {"login": "u1", "password": "@SECRET@',
    "single-quotes": b"{'type': 'ticket.new', 'auth': {'password': '@SECRET@'}}",
    "not-json": b"login=u1&password=@SECRET@",
    "nan": b'{"type": "ticket.new", "auth": {"password": "@SECRET@"}, "n": NaN}',
    "huge-number": b'{"type": "ticket.new", "auth": {"password": "@SECRET@"}, "n": 1e999}',
    "binary": b"\x00\xff\xfe@SECRET@\x80",
    "utf-16": hostile('{"type": "ticket.new", "auth": {"password": "@SECRET@"}}').encode("utf-16"),
    "deeply-nested": b"[" * 100_000 + b'{"type": "ticket.new", "password": "@SECRET@"}',
}


@pytest.mark.parametrize(("raw", "shown"), READABLE.values(), ids=READABLE.keys())
async def test_list_shows_a_json_body_with_every_secret_masked(
    env, raw: str, shown: dict[str, Any]
):
    await dead_letter(env, hostile(raw).encode())

    code, out, err = await smtp_worker(env, "dead", "list")

    (line,) = [json.loads(text) for text in out.splitlines()]
    assert (0, json.dumps(shown, ensure_ascii=False)) == (code, line["body"])
    assert SECRET[1:] not in out + err


@pytest.mark.parametrize("raw", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_list_shows_no_body_that_is_not_strict_json(env, raw: bytes):
    body = raw.replace(b"@SECRET@", SECRET.encode())
    await dead_letter(env, body)

    code, out, err = await smtp_worker(env, "dead", "list")

    (line,) = [json.loads(text) for text in out.splitlines()]
    assert (0, None, None, len(body)) == (code, line["type"], line["body"], line["body_bytes"])
    assert SECRET[1:] not in out + err


async def test_list_without_the_queue_fails_and_says_why(env):
    prefix = f"missing{uuid.uuid4().hex[:8]}"

    code, out, err = await smtp_worker(env, "dead", "list", prefix=prefix)

    assert (1, "") == (code, out)
    assert f"no queue {prefix}.dead" in err


# --- dead replay --------------------------------------------------------------------------------


async def test_replayed_command_that_now_succeeds_gets_its_reply(env, monkeypatch):
    owner = await env.new_owner()
    domain = unique_domain()
    await env.client.ok("settings.email.create", owner, email_settings(domain))
    router = env.workers[0].router
    spec = router["settings.channel.put"]

    async def broken(ctx: Context, data: Any) -> Any:
        raise RuntimeError("a bug, fixed before the replay")

    monkeypatch.setitem(router.specs, spec.type, dataclasses.replace(spec, handler=broken))
    data = {"name": "ops", "domain": domain, "recipients": ["oncall@example.com"]}
    failed = await env.client.call("settings.channel.put", owner, data, message_id="put-ops")
    assert "GeneralError" == failed["error"]["name"]
    assert 1 == await wait_depth(env, env.client.names.dead, 1)
    monkeypatch.setitem(router.specs, spec.type, spec)
    second_reply = asyncio.get_running_loop().create_future()
    env.client.replies["put-ops"] = second_reply

    code, summary = await dead_replay(env)

    reply = json.loads((await asyncio.wait_for(second_reply, 20)).body)
    assert (0, 1, 0) == (code, summary["replayed"], summary["left_in_dead"])
    assert ("success", "put-ops") == (reply["status"], reply["command_id"])
    assert ["ops"] == [
        c["name"] for c in (await env.client.ok("settings.channel.list", owner))["channels"]
    ]


async def test_replay_honours_limit_head_first(env):
    await dead_letter_unreadable(env, 3)
    listed = await dead_list(env)
    await stop_worker(env)

    code, summary = await dead_replay(env, "--limit", "2")

    names = env.client.names
    replayed = await take(env, names.queue("tickets"))
    assert (0, 2, 1) == (code, summary["replayed"], summary["left_in_dead"])
    assert [line["message_id"] for line in listed[:2]] == [m.message_id for m in replayed]
    assert [listed[2]["message_id"]] == [line["message_id"] for line in await dead_list(env)]


async def test_replay_keeps_the_properties_and_drops_the_death_headers(env):
    exchange = await env.client.channel.get_exchange(env.client.names.commands, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            b"[1, 2]",
            content_type="application/json",
            message_id="m-1",
            correlation_id="c-1",
            reply_to=env.client.reply_queue.name,
            headers={"trace": "t-1"},
        ),
        routing_key="hit.new",
    )
    await wait_depth(env, env.client.names.dead, 1)
    await stop_worker(env)

    await dead_replay(env)

    (message,) = await take(env, env.client.names.queue("hits"))
    headers = message.headers or {}
    assert ("m-1", "c-1", env.client.reply_queue.name, "application/json", b"[1, 2]") == (
        message.message_id,
        message.correlation_id,
        message.reply_to,
        message.content_type,
        message.body,
    )
    assert ("hit.new", "t-1") == (message.routing_key, headers.get("trace"))
    assert set() == {k for k in headers if "death" in k}


async def replay_a_dead_job(env: Env, queue: str, body: bytes, message_id: str) -> tuple[int, Any]:
    """A job `queue`'s consumer dead-letters, then `dead replay` with the worker stopped."""
    await env.client.channel.default_exchange.publish(
        aio_pika.Message(body, message_id=message_id), routing_key=queue
    )
    await wait_depth(env, env.client.names.dead, 1)
    await stop_worker(env)
    return await dead_replay(env)


async def test_replay_sends_an_email_job_back_to_the_deliveries_queue(env):
    names = env.client.names

    code, summary = await replay_a_dead_job(env, names.deliveries, b"no email_id here", "job-1")

    assert (0, 1) == (code, summary["replayed"])
    assert ["job-1"] == [m.message_id for m in await take(env, names.deliveries)]
    assert 0 == await depth(env, names.queue("tickets"))


async def test_replay_sends_a_probe_job_back_to_the_probes_queue(env):
    names = env.client.names

    code, summary = await replay_a_dead_job(env, names.probes, b"no probe here", "probe-1")

    assert (0, 1) == (code, summary["replayed"])
    # A quorum queue with a single active consumer refuses basic.get: its depth says it is back.
    assert (1, 0) == (await wait_depth(env, names.probes, 1), await depth(env, names.dead))


async def test_replay_leaves_a_message_of_unknown_origin_in_dead(env):
    names = env.client.names
    dead = await env.client.channel.get_exchange(names.dead, ensure=False)
    await dead.publish(aio_pika.Message(b"{}", message_id="stray"), routing_key="")
    await wait_depth(env, names.dead, 1)

    code, summary = await dead_replay(env)

    assert (1, 0, 1) == (code, summary["replayed"], summary["left_in_dead"])
    assert [{"message_id": "stray", "reason": "unknown origin"}] == summary["skipped_messages"]
    assert ["stray"] == [line["message_id"] for line in await dead_list(env)]
