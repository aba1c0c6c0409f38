"""Commands that arrive together run together (worker.batching), and it changes nothing they do.

A worker runs the commands waiting for it in one store transaction, a SAVEPOINT each: a refused
command rolls back alone and is answered with its error, while the others commit, are answered,
and send their emails, exactly as if each had run alone. With one command at a time, a batch is
that one command, run at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from sqlalchemy import text

from tests.support.environment import Env
from tests.support.logs import log_lines
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.world import configure
from worker.batching import Batches

GOOD = 30


# --- Batches ------------------------------------------------------------------------------------


async def test_one_item_at_a_time_runs_alone_and_at_once() -> None:
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return [item * 10 for item in items]

    batches: Batches[int, int] = Batches(run, size=8)

    assert [await batches.submit(n) for n in range(3)] == [0, 10, 20]
    assert runs == [[0], [1], [2]]


async def test_items_waiting_while_a_batch_runs_form_the_next_one() -> None:
    runs: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        runs.append(items)
        await release.wait()
        return [ValueError(item) if item == 3 else item for item in items]

    batches: Batches[int, int] = Batches(run, size=4)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batches.submit(n)) for n in range(1, 7)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)

    assert runs == [[0], [1, 2, 3, 4], [5, 6]]
    assert [0, 1, 2, "ValueError", 4, 5, 6] == [
        type(r).__name__ if isinstance(r, BaseException) else r for r in results
    ]


async def test_a_cancelled_submitter_is_left_out_and_a_failed_run_fails_its_batch_only() -> None:
    runs: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        await release.wait()
        if 2 in items:
            raise RuntimeError("the store went away")
        return items

    batches: Batches[int, int] = Batches(run, size=8)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.sleep(0)
    cancelled, failing = (asyncio.ensure_future(batches.submit(n)) for n in (1, 2))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()

    assert await first == 0
    try:
        await failing
    except RuntimeError as exc:
        assert "the store went away" == str(exc)
    assert cancelled.cancelled()
    assert runs == [[0], [2]]
    assert await batches.submit(3) == 3  # the next batch runs as usual


# --- the worker ---------------------------------------------------------------------------------


async def test_refused_commands_in_a_batch_change_nothing_of_the_others(
    env: Env, smtp: SmtpServer
) -> None:
    world = await configure(env, smtp)
    small = await env.client.ok(
        "settings.smtp_user.add", world.owner, {"total_limit": 1, "hourly_limit": 1}
    )
    over_quota = {"login": small["smtp_user_name"], "password": small["smtp_password"]}
    wrong_password = {"login": world.user_name, "password": "x" + world.password}
    absent_channel = {"channel": "absent", "ticket": {"title": "Lost", "body": "nowhere"}}
    # (message_id, auth, data, the error expected or None)
    commands: list[tuple[str, dict[str, str], dict[str, Any], str | None]] = []
    for n in range(GOOD):
        commands.append((uuid.uuid4().hex, world.auth, world.ticket_data(f"good {n}"), None))
        refusal = {
            1: (over_quota, world.ticket_data(f"over quota {n}"), "QuotaExceeded"),
            2: (world.auth, absent_channel, "NotFound"),
            3: (wrong_password, world.ticket_data(f"intruder {n}"), "AuthenticationError"),
        }.get(n % 4)
        if refusal is not None:
            commands.append((uuid.uuid4().hex, *refusal))
    repeated = commands[::7]  # sent a second time under the same message_id

    # No worker while they are published: they wait in their queue, and run in batches.
    while env.workers:
        await env.workers.pop().stop()
    since = len(log_lines())
    futures: dict[str, list[asyncio.Future[Any]]] = {}
    for message_id, auth, data, _ in commands + repeated:
        body = json.dumps({"type": "ticket.new", "auth": auth, "data": data}).encode()
        correlation_id = uuid.uuid4().hex
        future = await env.client.publish(
            body, "ticket.new", message_id=message_id, correlation_id=correlation_id
        )
        assert future is not None
        futures.setdefault(message_id, []).append(future)
    await env.start_worker()

    replies: dict[str, list[dict[str, Any]]] = {}
    for message_id, waiting in futures.items():
        answered = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        replies[message_id] = [json.loads(message.body) for message in answered]

    sids = set()
    for message_id, _, _, expected in commands:
        first, *again = replies[message_id]
        assert all(reply == first for reply in again), (first, again)
        if expected is None:
            assert ("success", True) == (first["status"], first["data"]["created"]), first
            sids.add(first["data"]["sid"])
        else:
            assert ("error", expected) == (first["status"], first["error"]["name"]), first
    assert GOOD == len(sids)

    # Each good ticket stored and emailed once; nothing of the refused ones, nor counted.
    await smtp.wait_for(GOOD, timeout=30)
    await asyncio.sleep(0.5)
    assert sorted(world.message_id(sid) for sid in sids) == sorted(
        received.message["Message-ID"] for received in smtp.messages
    )
    assert GOOD == await world.stored("tickets")
    listed = (await world.settings("settings.smtp_user.list", {}))["smtp_list"]
    sent = {user["smtp_user_name"]: user["total_sent"] for user in listed}
    assert {world.user_name: GOOD * len(world.recipients), over_quota["login"]: 0} == sent

    # They did run together: the refused ones shared their transaction with others.
    lines = (json.loads(line) for line in log_lines(since))
    processed = [line for line in lines if line.get("event") == "command.processed"]
    refused = {message_id for message_id, *_, expected in commands if expected is not None}
    sizes = [line["batch"] for line in processed if line.get("message_id") in refused]
    assert len(sizes) == len(refused)
    assert max(sizes) > 1, sizes


async def test_an_email_that_cannot_be_claimed_holds_back_none_claimed_with_it(
    env: Env, smtp: SmtpServer
) -> None:
    world = await configure(env, smtp)
    broken = await configure(
        env, smtp, options=relay_options(smtp, auth={"user": "relay", "pass": "relay-secret"})
    )
    # Its relay password no longer decrypts (stored under another key, say).
    async with env.store.transaction() as conn:
        await conn.execute(
            text("UPDATE email_settings SET auth_pass_enc = :junk WHERE domain = :domain"),
            {"junk": "AAAA" * 20, "domain": broken.domain},
        )
    # The email jobs wait in P.deliveries while no worker consumes it, and are claimed in batches.
    while env.workers:
        await env.workers.pop().stop()
    await env.start_worker(queues=("tickets", "hits", "settings"))
    sids = [await world.new_ticket(f"good {n}") for n in range(GOOD)]
    unsendable = await broken.new_ticket("unsendable")
    since = len(log_lines())
    await env.start_worker(queues=("deliveries",))

    await smtp.wait_for(GOOD, timeout=30)
    assert sorted(world.message_id(sid) for sid in sids) == sorted(
        received.message["Message-ID"] for received in smtp.messages
    )
    # Its job fails alone, at each of its deliveries, and lands in P.dead untouched.
    dead: list[Any] = []
    for _ in range(200):
        dead += await env.client.dead_letters()
        if dead:
            break
        await asyncio.sleep(0.1)
    assert [unsendable] == [
        email.sid
        for email in await env.query(
            "SELECT sid FROM emails WHERE id = :id", id=json.loads(dead[0].body)["email_id"]
        )
    ]
    assert GOOD == len(smtp.messages)
    # Each good one was sent at its first delivery: none failed with it, none was requeued.
    good = {email_id for sid in sids for email_id in await world.email_ids(sid)}
    lines = (json.loads(line) for line in log_lines(since))
    outcomes = [
        line["outcome"]
        for line in lines
        if line.get("event") == "email.processed" and line.get("email_id") in good
    ]
    assert ["sent"] * GOOD == outcomes
