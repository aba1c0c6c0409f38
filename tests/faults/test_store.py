"""Scenario 4: the store (PostgreSQL, through a proxy) unreachable for 10 seconds under load.

Its connections are reset and new ones blackholed (accepted, never answered: the connect
hangs), the harsher of the proxy's two outages; the refused kind is the broker's and relay's.

Commands are held (retried in the worker) or requeued, never failed: once the store is back
every command succeeds, with one ticket each, every email goes out once, and nothing reaches
P.dead. PostgreSQL itself is never stopped: other test runs share it.

And the nastiest moment of an outage: a COMMIT the store carried out whose answer never came
back. The worker's retry finds the command's own idempotency record; it must still publish the
reply, the events and the email job.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.rig import Rig, figure

pytestmark = pytest.mark.faults

COMMANDS = 300
OUTAGE = 10.0
LOST_ANSWERS = 200


async def test_commands_wait_out_a_10_s_store_outage_and_all_succeed(rig: Rig) -> None:
    proxy, through_proxy = rig.store_through_proxy()
    worker = await rig.start_worker(database_url=through_proxy)
    commands, ids = await rig.ticket_load(COMMANDS, "store")

    started = time.monotonic()
    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, COMMANDS // 4, timeout=120)
    answered_before = rig.load.answered(ids)
    proxy.cut(blackhole=True)
    await asyncio.sleep(OUTAGE)
    answered_during = rig.load.answered(ids) - answered_before
    proxy.restore()
    restored = time.monotonic()
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=120), rig.load.answered(ids)
    answered = time.monotonic()
    sids = rig.replies_of(ids)  # every reply a success: none failed for the outage
    assert await rig.wait_emails(set(sids.values()), timeout=120)
    finished = time.monotonic()

    tickets = await rig.query("SELECT count(*) AS n FROM tickets")
    after = await rig.aftermath(ids)
    after.figure(
        "store outage",
        outage_s=OUTAGE,
        answered_before=answered_before,
        answered_during=answered_during,
        all_answered_after_s=round(answered - restored, 1),
        total_s=round(finished - started, 1),
        store_retries=worker.count("store.unavailable"),
        commands_processed=dict(worker.outcomes()),
        emails_processed=dict(worker.outcomes("email.processed")),
        tickets=tickets[0].n,
    )
    assert COMMANDS == len(set(sids.values())) == tickets[0].n
    assert COMMANDS == sum(after.received.values()) == len(after.received)
    assert [] == after.dead


async def test_a_commit_whose_answer_is_lost_still_sends_its_reply_events_and_email(
    rig: Rig,
) -> None:
    proxy, through_proxy = rig.store_through_proxy()
    worker = await rig.start_worker(database_url=through_proxy)
    commands, ids = await rig.ticket_load(LOST_ANSWERS, "lost")

    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, LOST_ANSWERS // 10, timeout=120)
    # COMMITs sent now are done by PostgreSQL, but the worker never hears so; then the
    # connections break, and it must find out what its own retry already did.
    proxy.mute()
    await asyncio.sleep(2)
    proxy.cut()
    await asyncio.sleep(1)
    proxy.restore()
    assert await rig.load.wait_answered(ids, LOST_ANSWERS, timeout=120), rig.load.answered(ids)
    sids = rig.replies_of(ids)
    emailed = await rig.wait_emails(set(sids.values()), timeout=60)

    received = rig.emails_by_sid()
    pending = await rig.query("SELECT count(*) AS n FROM emails WHERE status = 'pending'")
    figure(
        "store answer lost",
        commands=LOST_ANSWERS,
        commands_processed=dict(worker.outcomes()),
        store_retries=worker.count("store.unavailable"),
        emails=sum(received.values()),
        emails_never_sent=pending[0].n,
    )
    assert emailed
    assert LOST_ANSWERS == sum(received.values()) == len(received)
