"""Scenario 6: a poison message, one that makes its handler raise every time.

No test-only code in the worker: the store is given a row that breaks an invariant, as a bad
manual fix or a half-restored backup would. A ticket's `hit_count` is set back below the
sequence number of a hit it already has, so every `hit.new` on it collides with that hit's key
and raises. The message is retried until the delivery limit, then dead-lettered with a
`GeneralError` reply, while the other commands keep flowing.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.support.polling import wait_until
from tests.support.rig import Rig, figure
from worker.broker import DELIVERY_LIMIT

pytestmark = pytest.mark.faults

COMMANDS = 200


async def test_a_poison_message_is_dead_lettered_while_the_others_flow(rig: Rig) -> None:
    worker = await rig.start_worker()
    await rig.setup_tenant()
    ticket = await rig.load.call(
        "ticket.new", rig.auth, {"channel": "ops", "ticket": {"title": "t", "body": "b"}}
    )
    await rig.load.call("hit.new", rig.auth, {"sid": ticket["sid"], "hit": {"summary": "first"}})
    await rig.query("UPDATE tickets SET hit_count = 0 WHERE sid = :sid", sid=ticket["sid"])
    poison = ("hit.new", rig.auth, {"sid": ticket["sid"], "hit": {"summary": "again"}}, "poison")
    commands = rig.tickets(COMMANDS, "flow")
    ids = [message_id for *_, message_id in commands]

    started = time.monotonic()
    await rig.load.publish_many([poison, *commands])
    assert await wait_until(lambda: "poison" in rig.load.replies, timeout=120)
    poisoned = time.monotonic()
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=120), rig.load.answered(ids)
    flowed = time.monotonic()
    dead = await rig.load.dead_letters(1, timeout=30)  # the reject follows the reply

    attempts = worker.processings(["poison"])["poison"]
    figure(
        "poison",
        commands=COMMANDS,
        poison_attempts=attempts,
        poison_dead_after_s=round(poisoned - started, 1),
        all_others_answered_s=round(flowed - started, 1),
        others=dict(worker.outcomes()),
        dead=[m.message_id for m in dead],
    )
    (reply,) = rig.load.replies["poison"]
    assert ("error", "GeneralError") == (reply["status"], reply["error"]["name"])
    assert ["poison"] == [m.message_id for m in dead]
    assert json.loads(dead[0].body)["data"] == poison[2]
    # The first delivery, then one more per return the quorum queue's x-delivery-limit allows.
    assert DELIVERY_LIMIT + 1 == attempts
    rig.replies_of(ids)  # every other command: one success
