"""Readiness: whether this worker can take messages now (`/readyz`, contract 9).

    broker     the connection and the publishing channel are open
    consumers  every queue the worker was started with has its consumer registered
    store      the store answers `SELECT 1` within STORE_TIMEOUT

`down()` names what is not; an empty list means ready.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from worker.broker import Broker
from worker.errors import StoreUnavailable
from worker.store import Store, ping

log = structlog.get_logger("worker.health")

# A store slower than this to answer `SELECT 1` is as good as down for a probe, whose caller
# (an orchestrator) gives up after a few seconds.
STORE_TIMEOUT = 2.0
# Probes arriving together, or a client asking in a loop, share one store check per this long.
STORE_CHECK_TTL = 1.0
_BROKER_TIMEOUT = 2.0


class Readiness:
    def __init__(self, broker: Broker, store: Store, consumers: int) -> None:
        self.broker = broker
        self.store = store
        self.consumers = consumers
        self._store_ok = False
        self._store_checked_at = -STORE_CHECK_TTL
        self._store_lock = asyncio.Lock()

    async def down(self) -> list[str]:
        down = []
        try:
            async with asyncio.timeout(_BROKER_TIMEOUT):
                registered = await self.broker.consuming()
        except TimeoutError:
            registered = None
        if registered is None:
            down.append("broker")
        elif registered < self.consumers:
            down.append("consumers")
        if not await self._store_answers():
            down.append("store")
        return down

    async def _store_answers(self) -> bool:
        async with self._store_lock:
            if time.monotonic() - self._store_checked_at >= STORE_CHECK_TTL:
                self._store_ok = await self._ask_store()
                self._store_checked_at = time.monotonic()
            return self._store_ok

    async def _ask_store(self) -> bool:
        try:
            async with asyncio.timeout(STORE_TIMEOUT), self.store.transaction() as conn:
                await ping(conn)
        except (StoreUnavailable, TimeoutError):
            return False
        except Exception:  # a probe answers "down", whatever the store raised
            log.warning("readiness.store_check_failed", exc_info=True)
            return False
        return True
