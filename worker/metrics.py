"""The worker's Prometheus metrics (contract 9), in a registry of each Worker's own.

    smtp_worker_commands_total{type,outcome}      command messages and what became of them
    smtp_worker_command_duration_seconds{type}    from delivery to the message's settlement
    smtp_worker_emails_total{outcome}             sent, failed (for good) or retried
    smtp_worker_email_duration_seconds            from the command's commit to the relay's "250"
    smtp_worker_in_flight{queue}                  messages being processed now
    smtp_worker_relay_connections                 SMTP connections the delivery pool holds open
    smtp_worker_dead_letters                      messages in P.dead (read at scrape time)

No label holds an owner id, a login or an address, and every label has a fixed set of values:
`type` is a command type of the contract or "unknown", whatever a message's routing key says.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from schemas import COMMANDS
from worker.outcomes import Outcome

log = structlog.get_logger("worker.metrics")

COMMAND_OUTCOMES = ("success", "refused", "unreadable", "duplicate", "requeued", "dead_lettered")
EMAIL_OUTCOMES = ("sent", "failed", "retried")
# The consumers' words for a message's fate, as their log lines spell them, to the contract's.
# A message handed back to the broker in any way (requeued, its channel gone, a bug, shutdown)
# is "requeued": the broker delivers it again. Any other outcome counts as "requeued" too.
_COMMAND_OUTCOME: dict[str, str] = {
    Outcome.SUCCESS: "success",
    Outcome.REFUSED: "refused",
    Outcome.UNREADABLE: "unreadable",
    Outcome.DUPLICATE: "duplicate",
    Outcome.REQUEUED: "requeued",
    Outcome.RETURNED: "requeued",
    Outcome.CRASHED: "requeued",
    Outcome.CANCELLED: "requeued",
    Outcome.DEAD_LETTERED: "dead_lettered",
    # A relay probe's command, answered by the probe consumer (worker.probes).
    Outcome.ANSWERED: "success",
}
# Fates that are not a command's: a probe queued on P.probes by the command consumer is counted
# once the probe consumer has answered it, and a probe job parked comes back to be answered.
_NOT_COUNTED = frozenset({Outcome.QUEUED, Outcome.PARKED})
# An email waits out RETRY_DELAYS (up to 30 minutes by default) before its last attempt.
_EMAIL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# How long a dead-letter count read from the broker is served before it is read again: a scrape
# every second costs the broker one passive declare per this many seconds.
DEAD_LETTERS_TTL = 5.0
_READ_TIMEOUT = 2.0

M = TypeVar("M", Counter, Gauge, Histogram)


def command_label(type_: str | None) -> str:
    """The `type` label of a command: one of the contract's types, else "unknown"."""
    return type_ if type_ is not None and type_ in COMMANDS else "unknown"


class Metrics:
    """What one worker counts; `exposition()` renders it in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = self._add(
            Counter,
            "smtp_worker_commands",
            "Command messages by type and what became of them.",
            ("type", "outcome"),
        )
        self.command_duration = self._add(
            Histogram,
            "smtp_worker_command_duration_seconds",
            "Time from a command message's delivery to its ack or reject.",
            ("type",),
        )
        self.emails = self._add(
            Counter,
            "smtp_worker_emails",
            "Delivery attempts by outcome: sent, failed for good, or retried later.",
            ("outcome",),
        )
        self.email_duration = self._add(
            Histogram,
            "smtp_worker_email_duration_seconds",
            "Time from the command's commit to the relay's acceptance of its email.",
            buckets=_EMAIL_BUCKETS,
        )
        self.in_flight_messages = self._add(
            Gauge, "smtp_worker_in_flight", "Messages being processed now, by queue.", ("queue",)
        )
        self.relay_connections = self._add(
            Gauge,
            "smtp_worker_relay_connections",
            "SMTP connections to relays the delivery pool holds open, idle or sending.",
        )
        for outcome in EMAIL_OUTCOMES:
            self.emails.labels(outcome)
        self._depths: list[QueueDepth] = []

    def _add(
        self,
        kind: type[M],
        name: str,
        documentation: str,
        labels: tuple[str, ...] = (),
        **options: Any,
    ) -> M:
        """A metric of `kind` in this worker's registry."""
        return kind(name, documentation, labels, registry=self.registry, **options)

    # --- fed by the consumers -------------------------------------------------------------------

    def command_processed(self, type_: str | None, outcome: Outcome, seconds: float) -> None:
        if outcome in _NOT_COUNTED:
            return
        label = command_label(type_)
        self.commands.labels(label, _COMMAND_OUTCOME.get(outcome, "requeued")).inc()
        self.command_duration.labels(label).observe(seconds)

    def email_processed(self, outcome: str, created_at: datetime | None = None) -> None:
        """An email `sent`, `failed` or `retried`; `created_at`: its command's commit, if sent."""
        self.emails.labels(outcome).inc()
        if outcome == "sent" and created_at is not None:
            waited = (datetime.now(UTC) - created_at).total_seconds()
            self.email_duration.observe(max(waited, 0.0))

    def track(self, queue: str, work: asyncio.Future[None]) -> None:
        """Counts `work` in flight on `queue` until it ends, however it ends."""
        gauge = self.in_flight_messages.labels(queue)
        gauge.inc()
        work.add_done_callback(lambda _: gauge.dec())

    # --- read at scrape time --------------------------------------------------------------------

    def watch_dead_letters(
        self, queue: str, connection: Callable[[], AbstractRobustConnection | None]
    ) -> None:
        depth = QueueDepth(
            "smtp_worker_dead_letters",
            "Messages waiting in the dead-letter queue (read at most every 5 s).",
            queue,
            connection,
        )
        self._depths.append(depth)
        self.registry.register(depth)

    async def exposition(self) -> bytes:
        await asyncio.gather(*(depth.refresh() for depth in self._depths))
        return generate_latest(self.registry)


class QueueDepth:
    """A gauge of how many messages one queue holds, read by a passive declare.

    Read at most every DEAD_LETTERS_TTL seconds, on a channel of its own that is closed at once
    (a passive declare of a missing queue closes its channel). While the broker cannot be
    asked, the gauge is left out of the exposition rather than reporting a stale count.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        queue: str,
        connection: Callable[[], AbstractRobustConnection | None],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.queue = queue
        self._connection = connection
        self._value: int | None = None
        self._read_at = -DEAD_LETTERS_TTL
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._read_at < DEAD_LETTERS_TTL:
                return
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    self._value = await self._read()
            except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                log.debug("metrics.queue_depth_unknown", queue=self.queue, exc_info=True)
                self._value = None
            self._read_at = time.monotonic()

    async def _read(self) -> int | None:
        connection = self._connection()
        transport = connection.transport if connection is not None else None
        if transport is None or transport.connection.is_closed:
            return None
        channel = await transport.connection.channel()
        try:
            declared = await channel.queue_declare(self.queue, passive=True)
        finally:
            if not channel.is_closed:
                await channel.close()
        return declared.message_count

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._value is None:
            return []
        return [GaugeMetricFamily(self.name, self.documentation, value=self._value)]
