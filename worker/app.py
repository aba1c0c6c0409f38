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
# Emails in flight per worker. Each is leased while it waits for one of the pool's few
# connections per relay; a small prefetch keeps that wait well inside the lease.
DELIVERY_PREFETCH = 32


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
        self._in_flight: set[asyncio.Future[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def _tracked(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def run(message: AbstractIncomingMessage) -> None:
            # When the broker connection drops, aiormq cancels every consumer callback: an email
            # cut short after the relay took it, but before it was recorded as sent, would be
            # sent again. So a message's work is shielded and runs to its end; only its ack is
            # lost, and the redelivered message finds the work done.
            work = asyncio.ensure_future(handler(message))
            self._in_flight.add(work)
            work.add_done_callback(self._in_flight.discard)
            await asyncio.shield(work)

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
        await self.broker.consume("deliveries", self._tracked(self.delivery), DELIVERY_PREFETCH)

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
        log.info("worker.stopping", in_flight=len(self._in_flight))
        await self.broker.stop_consuming()
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=self.settings.shutdown_grace)
            if pending:
                log.warning("worker.grace_expired", in_flight=len(pending))
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
