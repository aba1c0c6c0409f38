"""The worker's lifecycle: start in order, stop in reverse.

start: HTTP -> store (migrate) -> broker (connect, declare) -> consumers (commands with
       P.unrouted; probes with the settings; deliveries) -> sweeper
stop:  cancel consumers -> let in-flight messages finish (grace period) -> then, unwinding one
       AsyncExitStack in reverse of the start: sweeper -> SMTP pool -> broker -> store -> HTTP
       (a start that fails part way unwinds the same stack, as far as it got)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

import structlog
from aio_pika.abc import AbstractIncomingMessage

from schemas import COMMANDS
from worker.broker import COMMAND_QUEUES, Broker
from worker.config import Settings
from worker.consumer import CommandConsumer
from worker.handlers import Router, make_router
from worker.health import Readiness
from worker.http import HttpServer, endpoints
from worker.metrics import Metrics
from worker.outcomes import Parts
from worker.probes import PROBE_PREFETCH, ProbeConsumer
from worker.security import Keyring, load_or_create_secret_key
from worker.store import Store, idempotency, migrate

log = structlog.get_logger("worker.app")

ALL_QUEUES = (*COMMAND_QUEUES, "deliveries")
SWEEP_EVERY = 300.0
# Emails in flight per worker: sending, or waiting a moment for a turn at their relay, unleased
# (worker.gate). An email whose relay has no turn to give soon is parked, so one owner's dead
# relay holds only the few slots of the sends it has in progress.
DELIVERY_PREFETCH = 256


def keyring_for(settings: Settings) -> Keyring:
    if settings.secret_key is not None:
        return Keyring(settings.secret_key.get_secret_value())
    return Keyring(load_or_create_secret_key(settings.secret_key_file))


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    """Runs `close` to its end, even when what awaits it is cancelled."""
    await asyncio.shield(close())


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Worker:
    def __init__(
        self,
        settings: Settings,
        queues: Iterable[str] = ALL_QUEUES,
        router: Router | None = None,
    ) -> None:
        unknown = set(queues) - set(ALL_QUEUES)
        if unknown:
            raise ValueError(f"unknown queues: {', '.join(sorted(unknown))}")
        # One handler for each command of the contract, or the worker does not start.
        self.router = router or make_router()
        self.router.check(COMMANDS)
        self.settings = settings
        self.queues = tuple(queues)
        self.store = Store(settings.database_url)
        self.broker = Broker(settings)
        self.keyring = keyring_for(settings)
        self.metrics = Metrics()
        self.metrics.watch_dead_letters(self.broker.names.dead, lambda: self.broker.connection)
        readiness = Readiness(self.broker, self.store, consumers=len(self.queues))
        self.http = (
            HttpServer(settings.http, endpoints(self.metrics, readiness)) if settings.http else None
        )
        self._in_flight: set[asyncio.Future[None]] = set()
        self._stack = contextlib.AsyncExitStack()

    def _tracked(
        self, queue: str, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        self.metrics.in_flight_messages.labels(queue)  # the queue's series, at 0 until a message

        async def run(message: AbstractIncomingMessage) -> None:
            # When the broker connection drops, aiormq cancels every consumer callback: an email
            # cut short after the relay took it, but before it was recorded as sent, would be
            # sent again. So a message's work is shielded and runs to its end; only its ack is
            # lost, and the redelivered message finds the work done.
            work = asyncio.ensure_future(handler(message))
            self._in_flight.add(work)
            work.add_done_callback(self._in_flight.discard)
            self.metrics.track(queue, work)
            await asyncio.shield(work)

        return run

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await asyncio.shield(self._stack.aclose())
            raise

    async def _start(self) -> None:
        """Starts each part; what has to be undone for it is pushed on the stack that `stop`
        (or a failed start) unwinds, in reverse."""
        stack = self._stack
        if self.http is not None:
            await self.http.start()  # first: a port already taken fails before anything else
            stack.push_async_callback(_shielded, self.http.close)
        stack.push_async_callback(_shielded, self.store.close)
        await migrate(self.store)
        stack.push_async_callback(_shielded, self.broker.close)
        await self.broker.connect()
        self.parts = Parts(self.settings, self.store, self.broker, self.keyring, self.metrics)
        consumer = functools.partial(CommandConsumer, self.parts, router=self.router)
        commands = consumer()
        for queue in self.queues:
            if queue in COMMAND_QUEUES:
                tracked = self._tracked(queue, commands)
                await self.broker.consume(queue, tracked, self.settings.prefetch)
        if any(queue in COMMAND_QUEUES for queue in self.queues):
            unrouted = consumer(unrouted=True)
            tracked = self._tracked("unrouted", unrouted)
            await self.broker.consume("unrouted", tracked, self.settings.prefetch)
        if "settings" in self.queues:
            # Every worker that takes settings commands can run the probes they queue.
            probes = ProbeConsumer(self.parts, router=self.router)
            tracked = self._tracked("probes", probes)
            await self.broker.consume("probes", tracked, PROBE_PREFETCH)
        if "deliveries" in self.queues:
            await self._start_deliveries()
        sweeper = asyncio.create_task(self._sweep(), name="idempotency-sweeper")
        stack.push_async_callback(_cancelled, sweeper)
        log.info("worker.started", queues=list(self.queues), prefix=self.settings.prefix)

    async def _start_deliveries(self) -> None:
        from worker.delivery import DeliveryConsumer  # noqa: PLC0415

        self.delivery = DeliveryConsumer(self.parts)
        self._stack.push_async_callback(self.delivery.close)
        self.metrics.relay_connections.set_function(lambda: self.delivery.pool.connections)
        tracked = self._tracked("deliveries", self.delivery)
        await self.broker.consume("deliveries", tracked, DELIVERY_PREFETCH)

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
        # The sweeper, the SMTP pool, the broker, the store, HTTP: the reverse of their start.
        await self._stack.aclose()
        log.info("worker.stopped")
