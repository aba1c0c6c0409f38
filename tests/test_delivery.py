"""Delivery through P.deliveries (contract section 7): relays, retries, TLS, login, reuse.

Real aiosmtpd servers play the relay, scripted to misbehave. The worker's RETRY_DELAYS are
(0.2, 0.4): an email gets at most three attempts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from sqlalchemy import update

from tests.support.environment import Env
from tests.support.logs import log_lines
from tests.support.payloads import relay_options
from tests.support.polling import eventually
from tests.support.smtp_servers import (
    DROP,
    SmtpServer,
    Tls,
    closed_port,
    echoing_answers,
    password_leaks,
)
from tests.support.tenants import BIG_LIMITS
from tests.support.world import World, configure
from worker.errors import CommitUnknown
from worker.mail.relay import NO_CONNECTION
from worker.store import emails as store_emails
from worker.store.tables import emails

ATTEMPTS = 3  # len(RETRY_DELAYS) + 1
SENT_KEYS = {"sid", "seq", "recipients", "message_id", "attempts"}
FAILED_KEYS = {"sid", "seq", "error", "permanent", "attempts"}


async def outcome(world: World, type_: str) -> dict[str, Any]:
    """The data of the one `email.sent` or `email.failed` event of the test."""
    (event,) = await world.env.client.wait_events(type_)
    data: dict[str, Any] = event["data"]
    return data


# --- success ------------------------------------------------------------------------------------


async def test_email_sent_event_describes_the_email(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp)
    sid = await world.new_ticket()

    sent = await outcome(world, "email.sent")

    assert {
        "sid": sid,
        "seq": None,
        "recipients": world.recipients,
        "message_id": world.message_id(sid),
        "attempts": 1,
    } == sent


async def test_hit_email_sent_event_names_the_hit(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    await world.ok("ticket.ack", {"sid": sid})
    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "silent"}})
    await world.ok("ticket.unack", {"sid": sid})

    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "emailed"}})

    events = await world.env.client.wait_events("email.sent", 2)
    assert {None, 2} == {event["data"]["seq"] for event in events}


# --- transient failures: retried ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "attempts"),
    [
        ({"DATA": ["451 4.3.0 try again later"] * 2}, 3),
        ({"DATA": [DROP]}, 2),
        ({"MAIL": ["421 4.7.0 too busy, closing"]}, 2),
        ({"RCPT": ["452 4.2.2 mailbox full"]}, 2),
    ],
    ids=["451-twice-at-DATA", "dropped-mid-DATA", "421-at-MAIL", "452-at-RCPT"],
)
async def test_transient_failure_is_retried_until_delivered(
    env: Env, script: dict[str, list[str]], attempts: int
):
    async with SmtpServer(script=script) as smtp:
        world = await configure(env, smtp)
        sid = await world.new_ticket()

        sent = await outcome(world, "email.sent")

        assert 1 == len(smtp.messages)
    assert attempts == sent["attempts"]
    assert {"status": "sent", "attempts": attempts, "last_error": None} == (
        await world.ticket(sid)
    )["delivery"]


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ({"DATA": itertools.repeat("451 4.3.0 try again later")}, "451 4.3.0 try again later"),
        ({"DATA": itertools.repeat(DROP)}, "connection closed by the server"),
    ],
    ids=["always-451", "always-dropped"],
)
async def test_transient_failures_past_the_last_retry_fail_for_good(
    env: Env, script: dict[str, Any], error: str
):
    async with SmtpServer(script=script) as smtp:
        world = await configure(env, smtp)
        sid = await world.new_ticket()

        failed = await outcome(world, "email.failed")

    assert FAILED_KEYS == set(failed)
    assert (sid, None, ATTEMPTS, False) == (
        failed["sid"],
        failed["seq"],
        failed["attempts"],
        failed["permanent"],
    )
    assert error in failed["error"]
    assert {"status": "failed", "attempts": ATTEMPTS, "last_error": failed["error"]} == (
        await world.ticket(sid)
    )["delivery"]


async def test_refused_connection_is_retried_then_fails_for_good(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp, options={"host": "127.0.0.1", "port": closed_port()})
    await world.new_ticket()

    failed = await outcome(world, "email.failed")

    # The same words as for a silent or resetting port: no port scanning through last_error.
    assert (NO_CONNECTION, ATTEMPTS, False) == (
        failed["error"],
        failed["attempts"],
        failed["permanent"],
    )


# --- permanent failures: at once ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ({"DATA": itertools.repeat("550 5.7.1 rejected")}, "550 5.7.1 rejected"),
        ({"MAIL": itertools.repeat("553 5.1.8 bad sender")}, "553 5.1.8 bad sender"),
        ({"RCPT": itertools.repeat("550 5.1.1 no such user")}, "550 5.1.1 no such user"),
    ],
    ids=["550-at-DATA", "553-at-MAIL", "550-at-RCPT"],
)
async def test_permanent_failure_fails_at_once(env: Env, script: dict[str, Any], error: str):
    async with SmtpServer(script=script) as smtp:
        world = await configure(env, smtp)
        sid = await world.new_ticket()

        failed = await outcome(world, "email.failed")

        assert [] == smtp.messages
    assert (1, True) == (failed["attempts"], failed["permanent"])
    assert error in failed["error"]
    assert {"status": "failed", "attempts": 1, "last_error": failed["error"]} == (
        await world.ticket(sid)
    )["delivery"]


async def test_one_refused_recipient_sends_to_none(env: Env):
    async with SmtpServer(script={"RCPT": [None, "550 5.1.1 no such user"]}) as smtp:
        world = await configure(env, smtp)
        await world.new_ticket()

        failed = await outcome(world, "email.failed")

        assert [] == smtp.messages
    assert "ops@example.org" in failed["error"]


# --- TLS and login ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "auth"),
    [("implicit", None), ("starttls", ("relay-user", "s3cret-relay-pass"))],
    # The STARTTLS server allows AUTH only over TLS: a delivery proves the upgrade happened.
    ids=["implicit", "starttls"],
)
async def test_tls_relay_with_a_self_signed_certificate_delivers(
    env: Env, tls: Tls, auth: tuple[str, str] | None
):
    async with SmtpServer(tls=tls, auth=auth) as smtp:
        world = await configure(env, smtp)

        await world.new_ticket()

        assert 1 == len(await smtp.wait_for(1))


@pytest.mark.parametrize(
    ("tls", "starttls"),
    [("implicit", "auto"), ("starttls", "auto"), ("starttls", "always")],
    ids=["implicit", "starttls-auto", "starttls-always"],
)
async def test_tls_relay_with_an_untrusted_certificate_fails_for_good(
    env: Env, tls: Tls, starttls: str
):
    async with SmtpServer(tls=tls) as smtp:
        options = relay_options(smtp, tls={"rejectUnauthorized": True}, starttls=starttls)
        world = await configure(env, smtp, options=options)
        await world.new_ticket()

        failed = await outcome(world, "email.failed")

        assert [] == smtp.messages
    assert (1, True) == (failed["attempts"], failed["permanent"])
    assert "certificate" in failed["error"]


async def test_starttls_always_fails_for_good_on_a_relay_without_it(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp, options=relay_options(smtp, starttls="always"))
    await world.new_ticket()

    failed = await outcome(world, "email.failed")

    assert (1, True) == (failed["attempts"], failed["permanent"])
    assert [] == smtp.messages


async def test_relay_that_needs_a_login_delivers(env: Env):
    async with SmtpServer(auth=("relay-user", "s3cret-relay-pass")) as smtp:
        world = await configure(env, smtp)

        await world.new_ticket()

        assert 1 == len(await smtp.wait_for(1))


async def test_rejected_login_fails_at_once(env: Env):
    async with SmtpServer(auth=("relay-user", "s3cret-relay-pass")) as smtp:
        options = relay_options(smtp, auth={"user": "relay-user", "pass": "wrong-relay-pass"})
        world = await configure(env, smtp, options=options)
        await world.new_ticket()

        failed = await outcome(world, "email.failed")

        assert [] == smtp.messages
    assert (1, True) == (failed["attempts"], failed["permanent"])
    assert "wrong-relay-pass" not in failed["error"]


# --- connections --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_500_emails_to_one_relay_open_a_handful_of_connections(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp, recipients=["oncall@example.com"], limits=BIG_LIMITS)
    data = [world.ticket_data(f"alert {n}") for n in range(500)]

    # The last of 500 replies comes after all 500 commands ran: on a machine busy with the fault
    # suite that is more than a call's usual 20 s. What is asserted here is connections, not time.
    await asyncio.gather(*(world.ok("ticket.new", d, timeout=90) for d in data))

    await smtp.wait_for(500, timeout=60)
    assert smtp.connections <= 10, f"{smtp.connections} connections for 500 emails"


async def test_relay_dropping_idle_connections_still_gets_the_next_email(
    env: Env, smtp: SmtpServer
):
    world = await configure(env, smtp)
    await world.new_ticket("first")
    await smtp.wait_for(1)

    smtp.drop_connections()
    await smtp.wait_closed()
    sid = await world.new_ticket("second")

    await smtp.wait_for(2)
    # The relay has it; the worker records it as sent a moment later.
    await env.client.wait_events("email.sent", count=2)
    assert 1 == (await world.ticket(sid))["delivery"]["attempts"]


# --- redelivery ---------------------------------------------------------------------------------


async def test_redelivered_job_of_a_sent_email_is_not_sent_again(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    await outcome(world, "email.sent")
    (email_id,) = await world.email_ids(sid)
    seen = len(log_lines())

    await env.client.channel.default_exchange.publish(
        aio_pika.Message(json.dumps({"email_id": email_id}).encode()),
        routing_key=env.client.names.deliveries,
    )

    async def processed() -> bool:
        return any(_is_done(line, email_id) for line in log_lines(seen))

    await eventually(processed)
    assert 1 == len(smtp.messages)
    assert {"status": "sent", "attempts": 1, "last_error": None} == (await world.ticket(sid))[
        "delivery"
    ]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_copies_of_one_job_sent_at_once_send_the_email_once(env: Env, smtp: SmtpServer):
    """A parked job and its redelivered original can both be in the queue: whichever claims the
    email second finds it sent, even when the first recorded it between its two reads."""
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    (email_id,) = await world.email_ids(sid)
    copies = 20
    seen = len(log_lines())
    for _ in range(copies):
        await env.client.channel.default_exchange.publish(
            aio_pika.Message(json.dumps({"email_id": email_id}).encode()),
            routing_key=env.client.names.deliveries,
        )

    async def all_finished() -> bool:
        finished = [_outcome(line, email_id) in ("sent", "done") for line in log_lines(seen)]
        return sum(finished) >= copies

    await eventually(all_finished)
    await outcome(world, "email.sent")
    assert 1 == len(smtp.messages)


async def test_email_leased_elsewhere_is_looked_at_again_without_retry_delays(
    env: Env, smtp: SmtpServer
):
    """RETRY_DELAYS may be empty (no retries, contract 1): a job whose email another worker holds
    under its lease is still put back for later, not crashed on."""
    for worker in env.workers:
        await worker.stop()
    env.workers.clear()
    await env.start_worker(retry_delays=())
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    await outcome(world, "email.sent")
    (email_id,) = await world.email_ids(sid)
    # As if another worker were sending it now: pending, under its lease.
    async with env.store.transaction() as conn:
        await conn.execute(
            update(emails)
            .where(emails.c.id == email_id)
            .values(
                status="pending",
                lease_until=datetime.now(UTC) + timedelta(hours=1),
                lease_holder="another worker",
            )
        )
    seen = len(log_lines())

    await env.client.channel.default_exchange.publish(
        aio_pika.Message(json.dumps({"email_id": email_id}).encode()),
        routing_key=env.client.names.deliveries,
    )

    async def looked_at() -> bool:
        return any(_outcome(line, email_id) is not None for line in log_lines(seen))

    await eventually(looked_at)
    assert ["busy"] == [
        found for line in log_lines(seen) if (found := _outcome(line, email_id)) is not None
    ][:1]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_email_whose_claim_answer_was_lost_is_sent_at_once_not_after_its_lease(
    env: Env, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
):
    """The store took the lease, but its answer never came back (on PostgreSQL the claim's
    UPDATE commits on its own): the claim's retry finds the email under this worker's own lease
    and takes it, rather than leaving it, busy, until the lease runs out a minute later."""
    real_claim = store_emails.claim
    lost: list[str] = []

    async def answer_lost_once(conn: Any, ids: Any, *args: Any, **kwargs: Any) -> Any:
        taken = await real_claim(conn, ids, *args, **kwargs)
        if taken and not lost:
            lost.extend(taken)
            raise CommitUnknown("the store became unavailable during a statement")
        return taken

    monkeypatch.setattr(store_emails, "claim", answer_lost_once)
    world = await configure(env, smtp)
    seen = len(log_lines())

    sid = await world.new_ticket()

    await outcome(world, "email.sent")
    (email_id,) = await world.email_ids(sid)
    assert [email_id] == lost
    assert ["sent"] == [
        found for line in log_lines(seen) if (found := _outcome(line, email_id)) is not None
    ]
    assert 1 == len(smtp.messages)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_claim_overtaken_by_another_copy_of_its_job_leaves_the_email_to_it(
    env: Env, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch
):
    """Two claims of one email at once in one worker (a parked copy of its job and the job
    redelivered; PostgreSQL runs two claims at a time): the one whose UPDATE comes second, however
    long it took, finds the email leased in a name it does not know, and leaves it."""
    real_claim = store_emails.claim
    first_waiting, first_may_go = asyncio.Event(), asyncio.Event()
    taken: list[set[str]] = []

    async def first_one_slow(conn: Any, ids: Any, *args: Any, **kwargs: Any) -> Any:
        first = not first_waiting.is_set()
        if first:
            first_waiting.set()
            await first_may_go.wait()
        claimed = await real_claim(conn, ids, *args, **kwargs)
        taken.append(set(claimed))
        return claimed

    monkeypatch.setattr(store_emails, "claim", first_one_slow)
    world = await configure(env, smtp)
    sid = await world.new_ticket()
    (email_id,) = await world.email_ids(sid)
    await asyncio.wait_for(first_waiting.wait(), 10)

    await env.client.channel.default_exchange.publish(
        aio_pika.Message(json.dumps({"email_id": email_id}).encode()),
        routing_key=env.client.names.deliveries,
    )
    await outcome(world, "email.sent")
    first_may_go.set()

    async def both_claimed() -> bool:
        return len(taken) == 2

    await eventually(both_claimed)
    assert [{email_id}, set()] == taken
    await asyncio.sleep(0.5)  # what the first one would send, were it to send
    assert 1 == len(smtp.messages)


def _outcome(line: str, email_id: str) -> str | None:
    record = json.loads(line)
    if (record.get("event"), record.get("email_id")) != ("email.processed", email_id):
        return None
    outcome: str = record.get("outcome")
    return outcome


def _is_done(line: str, email_id: str) -> bool:
    """True for the log line of the delivery consumer leaving `email_id` alone: already done."""
    record = json.loads(line)
    return (record.get("event"), record.get("email_id"), record.get("outcome")) == (
        "email.processed",
        email_id,
        "done",
    )


# --- what the relay says ------------------------------------------------------------------------

ECHOED = "r3lay?>Pa55~w0rd/+="
WITHHELD = "the relay's reply was withheld: it quoted the password"


@pytest.mark.parametrize("command", ["AUTH", "RCPT", "DATA"])
async def test_relay_password_echoed_by_the_relay_is_never_shown(env: Env, command: str):
    answers = echoing_answers(command, 554, "relay-user", ECHOED)
    logged = len(log_lines())
    server = SmtpServer(
        auth=("relay-user", ECHOED), auth_mechanisms=["PLAIN"], script={command: answers}
    )
    async with server as smtp:
        world = await configure(env, smtp, recipients=["oncall@example.com"])
        sids = [await world.new_ticket(f"alert {n}") for n in range(len(answers))]
        failed = await env.client.wait_events("email.failed", len(answers), timeout=30)
        assert [] == smtp.messages

    assert {sid: True for sid in sids} == {e["data"]["sid"]: e["data"]["permanent"] for e in failed}
    errors = {e["data"]["error"] for e in failed}
    errors |= {(await world.ticket(sid))["delivery"]["last_error"] for sid in sids}
    assert {f"554 {WITHHELD}", f"535 {WITHHELD}"} >= errors
    seen = "\n".join([*log_lines(logged), *map(json.dumps, env.client.events)])
    assert [] == password_leaks(seen, "relay-user", ECHOED)


async def test_relay_reply_holding_nul_fails_the_email_once(env: Env):
    async with SmtpServer(script={"RCPT": itertools.repeat("550 d\x00\x00\x00")}) as smtp:
        world = await configure(env, smtp, recipients=["oncall@example.com"])
        sid = await world.new_ticket()

        failed = await outcome(world, "email.failed")
        await asyncio.sleep(1)  # time enough for a second attempt or event to show up

    assert ("550 recipient refused (oncall@example.com: 550 d)", True, 1) == (
        failed["error"],
        failed["permanent"],
        failed["attempts"],
    )
    assert 1 == len([e for e in env.client.events if e["type"] == "email.failed"])
    assert {"status": "failed", "attempts": 1, "last_error": failed["error"]} == (
        await world.ticket(sid)
    )["delivery"]
    assert [] == await env.client.dead_letters()
