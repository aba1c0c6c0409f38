"""Scenario 1: `kill -9` of a worker in the middle of 1,000 `ticket.new`, then a new worker.

Every message_id gets its reply, every reply of one message_id names the same ticket, exactly
1,000 tickets exist, and every ticket's email reaches the SMTP server. An email can arrive twice
only if the killed worker was sending it (claimed, not yet recorded as sent): those are counted.
The worker runs the commands waiting for it in batches, one store transaction each: the kill
lands in the middle of one, and a batch's commands are all done or none.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.rig import Rig

pytestmark = pytest.mark.faults

COMMANDS = 1000


# The emails the killed worker held wait out their lease (60 s) before another worker sends them.
@pytest.mark.timeout(300)
async def test_a_worker_killed_mid_load_loses_no_command_and_no_email(rig: Rig) -> None:
    first = await rig.start_worker()
    commands, ids = await rig.ticket_load(COMMANDS, "kill")

    started = time.monotonic()
    publishing = asyncio.create_task(rig.load.publish_many(commands))
    assert await rig.load.wait_answered(ids, COMMANDS // 3, timeout=120)
    first.kill()
    killed_at = time.monotonic()
    answered_at_kill = rig.load.answered(ids)
    emails_at_kill = len(rig.smtp.messages)
    claimed = await rig.query(
        "SELECT sid FROM emails WHERE status = 'pending' AND lease_until IS NOT NULL"
    )
    in_flight = {row.sid for row in claimed}
    batches = [line["batch"] for line in first.lines_of("command.processed") if "batch" in line]
    await publishing

    second = await rig.start_worker()
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=120), rig.load.answered(ids)
    answered_at = time.monotonic()
    sids = rig.replies_of(ids)
    assert await rig.wait_emails(set(sids.values()), timeout=150)
    delivered_at = time.monotonic()

    tickets = await rig.query("SELECT count(*) AS n FROM tickets")
    after = await rig.aftermath(ids)
    duplicates = {sid for sid, times in after.received.items() if times > 1}
    after.figure(
        "kill -9",
        answered_at_kill=answered_at_kill,
        emails_at_kill=emails_at_kill,
        emails_in_flight_at_kill=len(in_flight),
        all_answered_s=round(answered_at - started, 1),
        all_emailed_s=round(delivered_at - started, 1),
        after_kill_s=round(delivered_at - killed_at, 1),
        tickets=tickets[0].n,
        largest_batch_before_kill=max(batches),
        duplicate_emails=sum(after.received[sid] - 1 for sid in duplicates),
        second_worker=dict(second.outcomes()),
    )
    assert max(batches) > 1  # the killed worker was running them in batches
    assert COMMANDS == len(set(sids.values()))
    assert COMMANDS == tickets[0].n
    assert set(sids.values()) == set(after.received)
    assert duplicates <= in_flight
    assert [] == after.dead
