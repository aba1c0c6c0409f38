"""Scenario 5: the SMTP relay down (through a proxy) for longer than the first retry delays.

With RETRY_DELAYS 0.5,1,2,4,8 the relay refuses connections until every email has failed at
least twice (and for 6 seconds at least): each waits in the delay queues and is delivered once
the relay is back, exactly once, every ticket's delivery `sent`, no `email.failed`.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.rig import Rig, figure

pytestmark = pytest.mark.faults

COMMANDS = 100
OUTAGE = 6.0
FAILURES = 2  # attempts every email fails before the relay comes back


async def fewest_attempts(rig: Rig) -> int:
    rows = await rig.query("SELECT min(attempts) AS n FROM emails")
    return int(rows[0].n or 0)


async def test_emails_wait_out_a_relay_outage_and_are_delivered_once(rig: Rig) -> None:
    rig.use_retry_delays(0.5, 1, 2, 4, 8)
    relay = rig.proxy(rig.smtp.port)
    worker = await rig.start_worker()
    await rig.setup_tenant(smtp_port=relay.port)
    commands = rig.tickets(COMMANDS, "relay")
    ids = [message_id for *_, message_id in commands]

    relay.cut()
    started = time.monotonic()
    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=60)
    sids = rig.replies_of(ids)
    for _ in range(600):
        if time.monotonic() - started > OUTAGE and await fewest_attempts(rig) >= FAILURES:
            break
        await asyncio.sleep(0.1)
    emails_during = len(rig.smtp.messages)
    relay.restore()
    restored = time.monotonic()
    assert await rig.wait_emails(set(sids.values()), timeout=60)
    delivered = time.monotonic()
    await asyncio.sleep(1)  # time enough for a second copy of any email to show up

    received = rig.emails_by_sid()
    attempts = await rig.query(
        "SELECT attempts, status, count(*) AS n FROM emails GROUP BY attempts, status"
    )
    tickets = await rig.query("SELECT delivery_status, count(*) AS n FROM tickets GROUP BY 1")
    figure(
        "relay outage",
        commands=COMMANDS,
        outage_s=round(restored - started, 1),
        emails_during=emails_during,
        all_delivered_after_s=round(delivered - restored, 1),
        emails=sum(received.values()),
        attempts={f"{row.status}/{row.attempts}": row.n for row in attempts},
        emails_processed=dict(worker.outcomes("email.processed")),
        dead=len(await rig.load.dead()),
    )
    assert 0 == emails_during
    assert COMMANDS == sum(received.values()) == len(received)
    assert {"sent": COMMANDS} == {row.delivery_status: row.n for row in tickets}
    assert all(row.attempts > FAILURES for row in attempts)  # failed, failed, then went through
    assert 0 == worker.count("email.processed", outcome="failed")
