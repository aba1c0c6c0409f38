"""`kill -9` of the worker running relay probes (`settings.email.test`), then a new worker.

The probes wait on a relay that never answers; the command consumer has acked their commands
long before. Every command must still get its reply, from the next worker: a probe job is
acked only once its reply is out, and P.probes gives the unacked ones to the next consumer.
"""

from __future__ import annotations

import time

import pytest

from tests.support.polling import wait_until
from tests.support.rig import Rig, figure
from tests.support.silent_relay import SilentRelay
from tests.support.tenants import unique_domain

pytestmark = pytest.mark.faults

PROBES = 12


@pytest.mark.timeout(180)
async def test_probes_in_flight_when_their_worker_is_killed_are_answered_by_the_next(
    rig: Rig,
) -> None:
    first = await rig.start_worker()
    owner = await rig.new_owner()
    domain = unique_domain()
    async with SilentRelay() as silent:
        options = {"host": "127.0.0.1", "port": silent.port, "timeout": 3}
        await rig.load.call(
            "settings.email.create",
            owner,
            {"domain": domain, "provider": "smtp", "from": f"alerts@{domain}", "options": options},
        )
        ids = [f"probe-{n:02d}" for n in range(PROBES)]
        await rig.load.publish_many(
            ("settings.email.test", owner, {"domain": domain}, message_id) for message_id in ids
        )
        assert await wait_until(lambda: silent.open >= 4, timeout=30), "no probe in flight"
        first.kill()
        killed_at = time.monotonic()
        answered_at_kill = rig.load.answered(ids)
        in_flight_at_kill = silent.accepted

        await rig.start_worker()
        assert await rig.load.wait_answered(ids, PROBES, timeout=90), rig.load.answered(ids)
        answered_after = time.monotonic() - killed_at
        peak = silent.peak

    replies = {message_id: rig.load.replies[message_id] for message_id in ids}
    figure(
        "kill -9 amid probes",
        probes=PROBES,
        answered_at_kill=answered_at_kill,
        connections_at_kill=in_flight_at_kill,
        all_answered_after_kill_s=round(answered_after, 1),
        replies=sum(len(r) for r in replies.values()),
        peak_connections=peak,
    )
    for message_id, got in replies.items():
        assert {("success", False, "connect")} == {
            (r["status"], r["data"]["ok"], r["data"]["stage"]) for r in got
        }, message_id
        # A command answered twice (its job ran again) gets the same reply twice.
        assert 1 == len({str(r) for r in got}), got
    assert peak <= 4
