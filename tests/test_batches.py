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

import pytest
from sqlalchemy import text

from tests.support.environment import Env
from tests.support.logs import log_lines
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.world import configure
from worker import parsing
from worker.batching import Batches
from worker.consumer import CommandConsumer, Meta, Result, _Job

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


# --- one transaction, read ahead ----------------------------------------------------------------


async def _run_together(
    worker: Any, commands: list[tuple[str, dict[str, str], dict[str, Any], str]]
) -> list[dict[str, Any]]:
    """The replies of (type, auth, data, message_id) commands run as one batch, in this order:
    which commands the broker delivers together cannot be chosen from outside."""
    consumer = CommandConsumer(worker.parts, router=worker.router)
    jobs = []
    for type_, auth, data, message_id in commands:
        body = json.dumps({"type": type_, "auth": auth, "data": data}).encode()
        meta = Meta(message_id, None, message_id, type_, redelivered=False, delivery_count=0)
        parsed = parsing.read(body, type_, worker.settings.max_message_bytes)
        spec = worker.router.get(type_)
        jobs.append(_Job(spec, parsed, body, meta))
    results = await consumer._execute_all(jobs)
    replies = []
    for result in results:
        assert isinstance(result, Result), result
        assert result.batch == len(commands)
        assert result.reply is not None
        replies.append(json.loads(result.reply))
    return replies


@pytest.mark.parametrize("change", ["reset_password", "disable", "delete"])
async def test_a_user_changed_in_a_batch_is_refused_by_the_rest_of_it(
    env: Env, smtp: SmtpServer, change: str
) -> None:
    """The logins a batch read at its start are not trusted after an owner's command ran in it:
    a password reset, a disabled or a deleted user stops working at once, in the same batch."""
    world = await configure(env, smtp)
    change_command = {
        "reset_password": ("settings.smtp_user.reset_password", {}),
        "disable": ("settings.smtp_user.edit", {"status": "Disable"}),
        "delete": ("settings.smtp_user.delete", {}),
    }[change]
    type_, extra = change_command
    before, after = uuid.uuid4().hex, uuid.uuid4().hex
    replies = await _run_together(
        env.workers[0],
        [
            ("ticket.new", world.auth, world.ticket_data("before"), before),
            (type_, world.owner, {"smtp_user_name": world.user_name, **extra}, uuid.uuid4().hex),
            ("ticket.new", world.auth, world.ticket_data("after"), after),
            # A repeat of the first: its sender is authenticated before its record is found.
            ("ticket.new", world.auth, world.ticket_data("before"), before),
        ],
    )

    first, changed, *refused = replies
    assert "success" == first["status"] == changed["status"], (first, changed)
    expected = "Forbidden" if change == "disable" else "AuthenticationError"
    assert [("error", expected)] * 2 == [(r["status"], r["error"]["name"]) for r in refused]
    owner_id = world.owner["owner_id"]
    tickets = await env.query("SELECT title FROM tickets WHERE owner_id = :o", o=owner_id)
    titles = [row.title for row in tickets]
    assert ["before"] == titles


async def test_repeats_in_one_batch_are_answered_from_the_batch_and_recorded_once(
    env: Env, smtp: SmtpServer
) -> None:
    world = await configure(env, smtp)
    ids = [uuid.uuid4().hex for _ in range(3)]
    commands = [("ticket.new", world.auth, world.ticket_data(f"t{n}"), ids[n]) for n in range(3)]
    absent = {"channel": "absent", "ticket": {"title": "Lost", "body": "nowhere"}}
    refused_id = uuid.uuid4().hex
    commands.append(("ticket.new", world.auth, absent, refused_id))
    replies = await _run_together(env.workers[0], commands + commands[::-1])

    assert replies[:4] == replies[4:][::-1]
    assert ["success"] * 3 + ["error"] == [reply["status"] for reply in replies[:4]]
    assert 3 == await world.stored("tickets")
    recorded = [
        row
        for row in await env.query("SELECT message_id, status FROM processed_commands")
        if row.message_id in {*ids, refused_id}
    ]
    assert sorted([(i, "success") for i in ids] + [(refused_id, "error")]) == sorted(
        (row.message_id, row.status) for row in recorded
    )
    # And a repeat published later is answered from the records, by the worker.
    assert replies[0] == await world.call("ticket.new", world.ticket_data("t0"), message_id=ids[0])
