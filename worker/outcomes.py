"""What became of a message, as the consumers log and count it, and how they wait out a store
outage. Outcomes are enums of strings: a log line and a metric label show their values."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker.broker import Broker, settle
from worker.config import Settings
from worker.errors import BrokerUnavailable, StoreUnavailable
from worker.security import Keyring
from worker.store import Store

if TYPE_CHECKING:
    from worker.metrics import Metrics  # which counts these outcomes

log = structlog.get_logger("worker.store")

_T = TypeVar("_T")
_O = TypeVar("_O", bound=StrEnum)


class Outcome(StrEnum):
    """A command message's fate (the command and probe consumers)."""

    SUCCESS = "success"
    DUPLICATE = "duplicate"  # answered from its idempotency record
    REFUSED = "refused"  # by the rules: an error reply, acked
    QUEUED = "queued"  # a probe, checked and queued on P.probes
    ANSWERED = "answered"  # a probe job, run and answered
    PARKED = "parked"  # a probe job, put back for later: its owner had no free turn
    UNREADABLE = "unreadable"  # to P.dead
    DEAD_LETTERED = "dead-lettered"  # failed on its last delivery attempt: to P.dead
    REQUEUED = "requeued"
    RETURNED = "returned"  # its channel closed while it ran: the broker has it back
    CRASHED = "crashed"  # a bug of the consumer's own: requeued
    CANCELLED = "cancelled"  # shutdown
    UNKNOWN = "unknown"


class EmailOutcome(StrEnum):
    """An email job's fate (the delivery consumer)."""

    SENT = "sent"
    FAILED = "failed"  # for good
    RETRY = "retry"  # a transient failure: back on a delay queue, an attempt counted
    PARKED = "parked"  # no turn at its relay or owner soon: on a delay queue, no attempt spent
    MISSING = "missing"  # no such email
    DONE = "done"  # sent or failed before: a repeat job
    BUSY = "busy"  # another worker holds its lease: looked at again after a delay
    SATURATED = "saturated"  # its relay (shared with another domain) had no free connection
    REQUEUED = "requeued"
    CRASHED = "crashed"  # a bug of the consumer's own: requeued
    CANCELLED = "cancelled"  # shutdown
    UNKNOWN = "unknown"


# How a message leaves its consumer: acked; rejected, back into its queue or (dead-lettered)
# into P.dead; or not at all, when its channel has closed and the broker has it back already.
Settlement = Literal["ack", "requeue", "dead", "none"]


async def settle_as(message: AbstractIncomingMessage, how: Settlement, event: str) -> None:
    """Settles `message` as `how` says; a failure is logged as `event` (worker.broker.settle)."""
    if how == "ack":
        await settle(message.ack(), event)
    elif how != "none":
        await settle(message.reject(requeue=how == "requeue"), event)


# Why an email could not be claimed for sending (`saturated`: its relay, shared with another
# domain, has no free connection).
Unclaimed = Literal["missing", "done", "busy", "saturated"]


@dataclass(frozen=True, slots=True)
class StoreRetry:
    """Runs a store step again while the store is unavailable, after each of `delays`; past the
    last one, StoreUnavailable goes up (and the message is given back to the broker)."""

    delays: tuple[float, ...]

    async def run(
        self,
        operation: Callable[..., Awaitable[_T]],
        *args: Any,
        on_unavailable: Callable[[StoreUnavailable], None] | None = None,
    ) -> _T:
        """`operation(*args)`, tried again after each delay while the store is unavailable;
        `on_unavailable` hears of each outage."""
        for delay in (*self.delays, None):
            try:
                return await operation(*args)
            except StoreUnavailable as exc:
                if on_unavailable is not None:
                    on_unavailable(exc)
                if delay is None:
                    raise
                log.warning("store.unavailable", retry_in=delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


@dataclass(slots=True)
class Run(Generic[_O]):
    """One message being processed: its outcome so far, and when it started."""

    outcome: _O
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True, slots=True)
class Parts:
    """What the command, probe and delivery consumers work with: the worker's own."""

    settings: Settings
    store: Store
    broker: Broker
    keyring: Keyring
    metrics: Metrics


class Consumer:
    def __init__(self, parts: Parts) -> None:
        self.settings = parts.settings
        self.store = parts.store
        self.broker = parts.broker
        self.keyring = parts.keyring
        self.metrics = parts.metrics


@contextlib.asynccontextmanager
async def processing(
    message: AbstractIncomingMessage,
    logger: Any,
    name: str,
    outcomes: type[_O],
    *,
    processed: str | None = None,
) -> AsyncIterator[Run[_O]]:
    """What every consumer does around a message, whose outcome (one of `outcomes`, `unknown`
    until set) the block sets on the Run it is given: a bug of its own (an exception out of the
    block) is logged as `<name>.crashed` and the message requeued, since left unsettled it would
    hold a prefetch slot until its channel closes (requeued, it meets the delivery limit and lands
    in P.dead); at the end the outcome is logged, with the duration, as `processed` (by default
    `<name>.processed`), and the log context is cleared."""
    run = Run(outcomes("unknown"))
    try:
        yield run
    except asyncio.CancelledError:
        run.outcome = outcomes("cancelled")
        raise
    except Exception:
        logger.exception(f"{name}.crashed")
        run.outcome = outcomes("crashed")
        await settle_as(message, "requeue", f"{name}.settle_failed")
    finally:
        logger.info(
            processed or f"{name}.processed",
            outcome=run.outcome,
            duration_ms=round(run.seconds * 1000, 2),
        )
        structlog.contextvars.clear_contextvars()


def failed_attempt(logger: Any, event: str, exc: Exception, delivery_count: int) -> None:
    """Logs an attempt that failed, with its traceback unless the cause was a passing outage."""
    transient = isinstance(exc, StoreUnavailable | BrokerUnavailable)
    logger.warning(
        event,
        error=type(exc).__name__,
        transient=transient,
        exc_info=not transient,
        delivery_count=delivery_count,
    )
