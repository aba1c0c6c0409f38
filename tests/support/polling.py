"""Waiting until something holds, polling it."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, step: float = 0.1
) -> bool:
    """Polls `predicate()` (a function or a coroutine function) until it is true or `timeout`
    seconds pass; says which."""
    deadline = time.monotonic() + timeout
    while not await _holds(predicate):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Polls `check` until it holds; fails the test when `timeout` seconds pass first."""
    if not await wait_until(check, timeout, step=0.02):
        raise AssertionError(f"still not true after {timeout} s")


async def _holds(predicate: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = predicate()
    if inspect.isawaitable(result):
        return bool(await result)
    return bool(result)
