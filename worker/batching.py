"""Running together what is already waiting, without ever waiting for more.

A `Batches` takes items one at a time from many tasks (the consumers' callbacks, one per message)
and runs them in batches: whatever has been submitted by the time a runner is free is one batch,
up to `size` items. A runner that finds nothing waiting stops, so with one item at a time every
batch is that one item, run at once; under load the items that arrived while a batch ran form the
next one.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")

# What a batch's run gives each of its items: its result, or the exception it raised.
Ran = Callable[[list[_T]], Awaitable[Sequence[_R | BaseException]]]


class Batches(Generic[_T, _R]):
    """Runs submitted items by batches of up to `size`, `runners` batches at a time."""

    def __init__(self, run: Ran[_T, _R], *, size: int, runners: int = 1) -> None:
        assert size >= 1 and runners >= 1
        self._run = run
        self.size = size
        self.runners = runners
        self._waiting: deque[tuple[_T, asyncio.Future[_R]]] = deque()
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: _T) -> _R:
        """The result of `item`, run in a batch with whatever else is waiting."""
        future: asyncio.Future[_R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._running) < self.runners:
            # A context of its own: it runs the items of many submitters, not this one's.
            runner = asyncio.create_task(
                self._drain(), name="batch-runner", context=contextvars.Context()
            )
            self._running.add(runner)
        return await future

    async def _drain(self) -> None:
        try:
            await self._drain_waiting()
        finally:
            # At once, not in a done callback: a submitter woken by this runner's last result
            # must not find it still counted, and leave its item waiting for no runner.
            task = asyncio.current_task()
            assert task is not None
            self._running.discard(task)

    async def _drain_waiting(self) -> None:
        while self._waiting:
            batch: list[tuple[_T, asyncio.Future[_R]]] = []
            while self._waiting and len(batch) < self.size:
                item, future = self._waiting.popleft()
                if not future.done():  # its submitter was cancelled: nobody wants it run
                    batch.append((item, future))
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - given to every submitter of the batch
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
