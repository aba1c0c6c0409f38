"""Scenario 2: SIGTERM during load.

The worker stops taking messages, finishes what it holds (replies sent, acks given), and exits 0
within its grace period. What it never started waits in the queue for the next worker, which
executes each command once: no reply is sent twice, no command comes back already executed.
"""

from __future__ import annotations

import pytest

from tests.support.rig import Rig

pytestmark = pytest.mark.faults

COMMANDS = 300
GRACE = 20.0
PREFETCH = 50


async def test_sigterm_mid_load_finishes_what_is_in_flight_and_exits_0(rig: Rig) -> None:
    # A prefetch well below the load, so that some commands are still queued at the signal.
    first = await rig.start_worker(shutdown_grace=str(GRACE), prefetch=str(PREFETCH))
    commands, ids = await rig.ticket_load(COMMANDS, "term")

    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, COMMANDS // 4, timeout=120)
    code, seconds = await first.terminate(timeout=GRACE + 15)
    answered_by_first = rig.load.answered(ids)
    executed_by_first = first.outcomes()

    second = await rig.start_worker()
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=120), rig.load.answered(ids)
    sids = rig.replies_of(ids)
    assert await rig.wait_emails(set(sids.values()), timeout=60)

    after = await rig.aftermath(ids)
    after.figure(
        "SIGTERM",
        exit_code=code,
        exit_s=round(seconds, 2),
        grace_s=GRACE,
        in_flight_at_sigterm=first.lines_of("worker.stopping")[0]["in_flight"],
        answered_by_first=answered_by_first,
        first_worker=dict(executed_by_first),
        second_worker=dict(second.outcomes()),
    )
    assert (0, True) == (code, seconds < GRACE)
    assert 0 == first.count("worker.grace_expired")
    # Every command the first worker started, it finished: each one it executed was answered.
    assert {"success"} == set(executed_by_first)
    assert executed_by_first["success"] - 3 == answered_by_first  # 3: the tenant's settings
    # What the first never started, the second executed; nothing came back to it already
    # executed (a "duplicate"), and nothing was answered twice.
    assert {"success": COMMANDS - answered_by_first} == second.outcomes()
    assert [1] * COMMANDS == [len(rig.load.replies[i]) for i in ids]
    assert COMMANDS == sum(after.received.values()) == len(after.received)
    assert [] == after.dead
