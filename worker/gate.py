"""Turns: how a consumer shares its prefetch slots between owners and relays (contract 5).

A job needs a turn in one or more lanes (its owner, its relay), each with a limit of turns
running at once. When every lane it needs has room, it runs at once. When one is full, the job
either waits in-process for a turn, or `enter` tells the consumer to park it for a while (put
it back in the queue, through a delay queue, and ack it), so that a job that cannot run soon
does not hold a prefetch slot another owner's job could use.

A job waits only when its wait is bounded:
- at most `max_waiting` jobs wait per lane, and `max_waiting_total` in all: what keeps slots
  free for the jobs of other lanes, which may well have room;
- with `patience`, a job waits only for a lane that moves: it does not wait for one where
  nothing has started or ended for `patience` (a relay that never answers), and a job waiting
  for one that stops moving so is parked.

A parked job stays away for about half the time its place in the lane's line should take (the
lane's pace times the jobs ahead of it: waiting, and parked to come back before it), rounded down
to one of the `delays` (the delay queues). So a long backlog comes back spread out, a little
ahead of when its lane can take it, rather than all at once to be parked again; early rather
than late, since a relay left idle costs more than a job parked twice.

Single-threaded by design: everything here runs on the event loop, so a check and the grant it
leads to cannot be interleaved with another job's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Gate", "Park", "Turn"]

# A lane's history (how long its turns take) is what parks a dead relay's jobs at once; an idle
# lane keeps it this long, and lanes are swept at most this often.
_REMEMBER = 60.0
_SMOOTHING = 0.3  # weight of the latest turn in a lane's average turn duration


@dataclass(eq=False)
class _Lane:
    limit: int
    moved: float  # when a turn last started or ended here
    running: int = 0
    waiting: int = 0
    average: float | None = None  # seconds per turn, smoothed
    returning: list[float] = field(default_factory=list)  # when its parked jobs come back

    @property
    def full(self) -> bool:
        return self.running >= self.limit

    def pace(self, now: float) -> float:
        """Seconds between turns, as far as is known: a stuck turn counts for how long it has
        run so far."""
        stuck = now - self.moved if self.running else 0.0
        return max(self.average or 0.0, stuck) / self.limit


@dataclass(eq=False)
class _Waiter:
    lanes: list[_Lane]
    future: asyncio.Future[Turn]


@dataclass(frozen=True, slots=True)
class Park:
    """No turn soon: put the job back in its queue for `delay` seconds."""

    delay: float


class Turn:
    """A job's right to run in its lanes; give it back by leaving the `with` block."""

    def __init__(self, gate: Gate, lanes: list[_Lane], started: float) -> None:
        self._gate = gate
        self._lanes = lanes
        self._started = started
        self._released = False

    def __enter__(self) -> Turn:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._gate._release(self._lanes, self._started)


@dataclass
class Gate:
    delays: Sequence[float]  # the delay queues a parked job can wait in, shortest first
    max_waiting: int
    max_waiting_total: int | None = None
    patience: float | None = None
    _waiting: int = 0
    _lanes: dict[Hashable, _Lane] = field(default_factory=dict)
    _waiters: deque[_Waiter] = field(default_factory=deque)
    _swept: float = field(default_factory=time.monotonic)

    async def enter(self, needs: Sequence[tuple[Hashable, int]]) -> Turn | Park:
        """A turn in the lane of every (key, limit) of `needs`, or how long to park the job."""
        now = time.monotonic()
        self._sweep(now)
        lanes = [self._lane(key, limit, now) for key, limit in needs]
        if not any(lane.full for lane in lanes):
            return self._start(lanes, now)
        full = self.max_waiting_total is not None and self._waiting >= self.max_waiting_total
        if full or not all(self._may_wait(lane, now) for lane in lanes if lane.full):
            return self._park(lanes, now)
        waiter = _Waiter(lanes, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._waiting += 1
        for lane in lanes:
            lane.waiting += 1
        try:
            # asyncio.wait, not a timeout that cancels: a turn granted at the deadline is kept.
            while not waiter.future.done():
                await asyncio.wait([waiter.future], timeout=self.patience)
                if not waiter.future.done() and self._stalled(lanes, time.monotonic()):
                    break
        except BaseException:
            if waiter.future.done():
                waiter.future.result().release()  # granted, but its job is going away
            raise
        finally:
            self._waiting -= 1
            for lane in lanes:
                lane.waiting -= 1
            if not waiter.future.done():
                waiter.future.cancel()  # its lane stalled: no turn can be granted to it any more
                self._waiters.remove(waiter)
        if waiter.future.cancelled():
            return self._park(lanes, time.monotonic())
        return waiter.future.result()

    def _may_wait(self, lane: _Lane, now: float) -> bool:
        return lane.waiting < self.max_waiting and not self._stalled([lane], now)

    def _stalled(self, lanes: list[_Lane], now: float) -> bool:
        """Whether a full lane has seen nothing start or end for `patience`: a relay that does
        not answer."""
        if self.patience is None:
            return False
        return any(lane.full and now - lane.moved >= self.patience for lane in lanes)

    def _park(self, lanes: list[_Lane], now: float) -> Park:
        full = [lane for lane in lanes if lane.full]
        wait = 0.0
        for lane in full:
            lane.returning = [at for at in lane.returning if at > now]
            wait = max(wait, (lane.waiting + len(lane.returning) + 1) * lane.pace(now))
        delay = max([d for d in self.delays if d <= wait / 2], default=self.delays[0])
        for lane in full:
            lane.returning.append(now + delay)
        return Park(delay)

    def _lane(self, key: Hashable, limit: int, now: float) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(limit, moved=now)
        return lane

    def _start(self, lanes: list[_Lane], now: float) -> Turn:
        for lane in lanes:
            lane.running += 1
            lane.moved = now
        return Turn(self, lanes, now)

    def _release(self, lanes: list[_Lane], started: float) -> None:
        now = time.monotonic()
        took = now - started
        for lane in lanes:
            lane.running -= 1
            lane.moved = now
            average = took if lane.average is None else lane.average
            lane.average = (1 - _SMOOTHING) * average + _SMOOTHING * took
        # First come, first served, among the waiters whose every lane now has room.
        for waiter in list(self._waiters):
            if all(not lane.full for lane in waiter.lanes):
                self._waiters.remove(waiter)
                waiter.future.set_result(self._start(waiter.lanes, now))

    def _sweep(self, now: float) -> None:
        if now - self._swept < _REMEMBER:
            return
        self._swept = now
        for key, lane in list(self._lanes.items()):
            lane.returning = [at for at in lane.returning if at > now]
            idle = lane.running == 0 and lane.waiting == 0 and not lane.returning
            if idle and now - lane.moved >= _REMEMBER:
                del self._lanes[key]
