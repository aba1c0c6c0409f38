"""The worker's lifecycle: start in order, stop in reverse.

start: store (migrate) -> broker (connect, declare) -> consumers -> sweeper
stop:  cancel consumers -> let in-flight messages finish (grace period) -> sweeper -> broker
       -> store
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker.broker import COMMAND_QUEUES, Broker
from worker.config import Settings
from worker.consumer import CommandConsumer
from worker.security import Keyring, load_or_create_secret_key
from worker.store import Store, idempotency, migrate

log = structlog.get_logger("worker.app")

ALL_QUEUES = (*COMMAND_QUEUES, "deliveries")
SWEEP_EVERY = 300.0


def keyring_for(settings: Settings) -> Keyring:
    if settings.secret_key is not None:
        return Keyring(settings.secret_key.get_secret_value())
    return Keyring(load_or_create_secret_key(settings.secret_key_file))


class Worker:
    def __init__(self, settings: Settings, queues: Iterable[str] = ALL_QUEUES) -> None:
        unknown = set(queues) - set(ALL_QUEUES)
        if unknown:
            raise ValueError(f"unknown queues: {', '.join(sorted(unknown))}")
        self.settings = settings
        self.queues = tuple(queues)
        self.store = Store(settings.database_url)
        self.broker = Broker(settings)
        self.keyring = keyring_for(settings)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []

    def _tracked(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def run(message: AbstractIncomingMessage) -> None:
            self._in_flight += 1
            self._idle.clear()
            try:
                await handler(message)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

        return run

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await asyncio.shield(self.broker.close())
            await asyncio.shield(self.store.close())
            raise

    async def _start(self) -> None:
        await migrate(self.store)
        await self.broker.connect()
        commands = self._tracked(
            CommandConsumer(self.settings, self.store, self.broker, self.keyring)
        )
        for queue in self.queues:
            if queue in COMMAND_QUEUES:
                await self.broker.consume(queue, commands, self.settings.prefetch)
        if "deliveries" in self.queues:
            await self._start_deliveries()
        self._tasks.append(asyncio.create_task(self._sweep(), name="idempotency-sweeper"))
        log.info("worker.started", queues=list(self.queues), prefix=self.settings.prefix)

    async def _start_deliveries(self) -> None:
        from worker.mail.delivery import DeliveryConsumer  # noqa: PLC0415

        self.delivery = DeliveryConsumer(self.settings, self.store, self.broker, self.keyring)
        await self.broker.consume(
            "deliveries", self._tracked(self.delivery), self.settings.prefetch
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                async with self.store.transaction() as conn:
                    removed = await idempotency.sweep(conn, datetime.now(UTC))
                log.debug("idempotency.swept", removed=removed)
            except Exception:
                log.warning("idempotency.sweep_failed", exc_info=True)

    async def stop(self) -> None:
        log.info("worker.stopping", in_flight=self._in_flight)
        await self.broker.stop_consuming()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.shutdown_grace)
        except TimeoutError:
            log.warning("worker.grace_expired", in_flight=self._in_flight)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            await delivery.close()
        await asyncio.shield(self.broker.close())
        await asyncio.shield(self.store.close())
        log.info("worker.stopped")
