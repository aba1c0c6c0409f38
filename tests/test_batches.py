"""Commands that arrive together run together (worker.batching), and it changes nothing they do.

A worker runs the commands waiting for it in one store transaction, a SAVEPOINT each: a refused
command rolls back alone and is answered with its error, while the others commit, are answered,
and send their emails, exactly as if each had run alone. With one command at a time, a batch is
that one command, run at once.
"""

from __future__ import annotations

import asyncio

from worker.batching import Batches

# --- Batches ------------------------------------------------------------------------------------


async def test_one_item_at_a_time_runs_alone_and_at_once() -> None:
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        return [item * 10 for item in items]

    batches: Batches[int, int] = Batches(run, size=8)

    assert [await batches.submit(n) for n in range(3)] == [0, 10, 20]
    assert runs == [[0], [1], [2]]


async def test_items_waiting_while_a_batch_runs_form_the_next_one() -> None:
    runs: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        runs.append(items)
        await release.wait()
        return [ValueError(item) if item == 3 else item for item in items]

    batches: Batches[int, int] = Batches(run, size=4)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(batches.submit(n)) for n in range(1, 7)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)

    assert runs == [[0], [1, 2, 3, 4], [5, 6]]
    assert [0, 1, 2, "ValueError", 4, 5, 6] == [
        type(r).__name__ if isinstance(r, BaseException) else r for r in results
    ]


async def test_a_cancelled_submitter_is_left_out_and_a_failed_run_fails_its_batch_only() -> None:
    runs: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        await release.wait()
        if 2 in items:
            raise RuntimeError("the store went away")
        return items

    batches: Batches[int, int] = Batches(run, size=8)
    first = asyncio.ensure_future(batches.submit(0))
    await asyncio.sleep(0)
    cancelled, failing = (asyncio.ensure_future(batches.submit(n)) for n in (1, 2))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()

    assert await first == 0
    try:
        await failing
    except RuntimeError as exc:
        assert "the store went away" == str(exc)
    assert cancelled.cancelled()
    assert runs == [[0], [2]]
    assert await batches.submit(3) == 3  # the next batch runs as usual
