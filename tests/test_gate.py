"""worker.gate: who runs, who waits in-process, who is parked, and for how long."""

from __future__ import annotations

import asyncio

from worker.gate import Gate, Park, Turn

DELAYS = (1.0, 2.0, 5.0, 10.0)
RELAY = (("relay", "a.example"), 1)


async def turn(gate: Gate, *needs: tuple[object, int]) -> Turn:
    got = await gate.enter(needs or (RELAY,))
    assert isinstance(got, Turn), got
    return got


async def test_a_job_runs_at_once_while_its_lanes_have_room():
    gate = Gate(DELAYS, max_waiting=4)

    turns = [await turn(gate, (("relay", "a"), 2)), await turn(gate, (("relay", "a"), 2))]

    assert 2 == len(turns)


async def test_a_waiting_job_gets_the_turn_its_lane_gives_back():
    gate = Gate(DELAYS, max_waiting=4)
    first = await turn(gate)
    waiting = asyncio.ensure_future(gate.enter([RELAY]))
    await asyncio.sleep(0.01)
    assert not waiting.done()

    first.release()

    assert isinstance(await asyncio.wait_for(waiting, 1), Turn)


async def test_waiters_take_their_turns_first_come_first_served():
    gate = Gate(DELAYS, max_waiting=4)
    running = await turn(gate)
    order: list[int] = []

    async def wait(n: int) -> None:
        got = await gate.enter([RELAY])
        assert isinstance(got, Turn)
        order.append(n)
        await asyncio.sleep(0)
        got.release()

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    running.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)

    assert [0, 1, 2] == order


async def test_other_lanes_run_while_one_is_full():
    gate = Gate(DELAYS, max_waiting=0)
    await turn(gate, (("relay", "dead"), 1))

    other = await gate.enter([(("relay", "healthy"), 1)])

    assert isinstance(other, Turn)


async def test_a_job_beyond_max_waiting_of_its_lane_is_parked():
    gate = Gate(DELAYS, max_waiting=2)
    await turn(gate)
    waiting = [asyncio.ensure_future(gate.enter([RELAY])) for _ in range(2)]
    await asyncio.sleep(0.01)

    parked = await gate.enter([RELAY])

    assert isinstance(parked, Park)
    assert not any(w.done() for w in waiting)
    for w in waiting:
        w.cancel()


async def test_a_job_beyond_max_waiting_total_is_parked_whatever_its_lane():
    gate = Gate(DELAYS, max_waiting=8, max_waiting_total=2)
    await turn(gate, (("relay", "a"), 1))
    await turn(gate, (("relay", "b"), 1))
    waiting = [
        asyncio.ensure_future(gate.enter([(("relay", "a"), 1)])),
        asyncio.ensure_future(gate.enter([(("relay", "b"), 1)])),
    ]
    await asyncio.sleep(0.01)

    parked = await gate.enter([(("relay", "b"), 1)])

    assert isinstance(parked, Park)
    for w in waiting:
        w.cancel()


async def test_a_job_of_a_lane_where_nothing_moved_for_patience_is_parked_at_once():
    gate = Gate(DELAYS, max_waiting=8, patience=0.05)
    await turn(gate)  # never given back: a relay that does not answer
    await asyncio.sleep(0.1)

    assert isinstance(await gate.enter([RELAY]), Park)


async def test_a_waiting_job_is_parked_once_its_lane_stalls():
    gate = Gate(DELAYS, max_waiting=8, patience=0.1)
    await turn(gate)

    got = await asyncio.wait_for(gate.enter([RELAY]), 1)

    assert isinstance(got, Park)


async def test_a_waiting_job_keeps_waiting_while_its_lane_moves():
    gate = Gate(DELAYS, max_waiting=8, patience=0.3)
    lane = (("relay", "busy"), 2)
    await turn(gate, lane)  # one connection hangs for good, the other one works
    working = await turn(gate, lane)
    first = asyncio.ensure_future(gate.enter([lane]))
    second = asyncio.ensure_future(gate.enter([lane]))
    await asyncio.sleep(0.2)
    working.release()
    working = await asyncio.wait_for(first, 1)
    assert isinstance(working, Turn)
    await asyncio.sleep(0.2)  # `second` has waited past its patience, but the lane moves

    working.release()

    assert isinstance(await asyncio.wait_for(second, 1), Turn)


async def test_jobs_parked_behind_a_slow_lane_come_back_spread_by_their_place_in_line():
    gate = Gate(DELAYS, max_waiting=0)
    first = await turn(gate)
    await asyncio.sleep(0.5)  # a lane that takes half a second per turn
    first.release()
    await turn(gate)

    delays = []
    for _ in range(30):
        parked = await gate.enter([RELAY])
        assert isinstance(parked, Park)
        delays.append(parked.delay)

    assert sorted(delays) == delays
    assert {1.0, 2.0, 5.0} <= set(delays)


async def test_a_cancelled_waiter_leaves_no_turn_taken():
    gate = Gate(DELAYS, max_waiting=4)
    first = await turn(gate)
    waiting = asyncio.ensure_future(gate.enter([RELAY]))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.01)

    first.release()

    assert isinstance(await gate.enter([RELAY]), Turn)
