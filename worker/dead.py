"""What sits in `P.dead`, for an operator: list it, and replay it where it came from.

    list:   basic.get every message without acking it (held by this channel, so each get sees
            the next one), print it, then nack them all with requeue: RabbitMQ puts a requeued
            message back at its original position, so the queue is left as it was, in order.
    replay: basic.get a message, republish it where its latest `x-death` entry says it died
            (P.commands with its routing key for a command, P.deliveries or P.probes for a job),
            wait for the broker's confirm, and only then ack it in P.dead. A message of unknown
            origin, or one the broker cannot route, stays in P.dead.

Replay looks at no more messages than P.dead held when it began: a replayed message that fails
again lands at the tail of P.dead, and must not be replayed twice in one run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelClosed
from pamqp.commands import Basic

from worker.broker import COMMAND_QUEUES, PUBLISH_TIMEOUT, Names
from worker.connection import open_first

PREVIEW_CHARACTERS = 200
# Headers RabbitMQ adds when it dead-letters or redelivers a message. A replay is a new
# publication: carrying them over would make the worker take it for its last delivery attempt
# (x-delivery-count) and keep a history that no longer applies (x-death).
BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
# Keys whose values `dead list` masks, at any depth and in any case; under `auth`, every value.
SECRET_KEYS = frozenset({"token", "password", "pass", "smtp_password", "secret"})
AUTH_KEY = "auth"
MASK = "********"


class DeadLetterError(Exception):
    """P.dead cannot be read: the queue does not exist (a wrong prefix?)."""


@dataclass(frozen=True, slots=True)
class Death:
    """The latest entry of a message's `x-death` header: why and where it died last."""

    reason: str | None
    queue: str | None
    exchange: str | None
    routing_keys: tuple[str, ...]
    count: int | None
    time: datetime | None

    @classmethod
    def of(cls, headers: Mapping[str, Any] | None) -> Death | None:
        deaths = (headers or {}).get("x-death")
        # RabbitMQ keeps the entries most recent first.
        if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], Mapping):
            return None
        latest = deaths[0]
        keys = latest.get("routing-keys")
        count = latest.get("count")
        when = latest.get("time")
        return cls(
            reason=_text(latest.get("reason")),
            queue=_text(latest.get("queue")),
            exchange=_text(latest.get("exchange")),
            routing_keys=tuple(k for k in map(_text, keys) if k) if isinstance(keys, list) else (),
            count=count if isinstance(count, int) else None,
            time=when if isinstance(when, datetime) else None,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a replay publishes: an exchange ("" is the default one) and a routing key."""

    exchange: str
    routing_key: str

    def __str__(self) -> str:
        return f"{self.exchange or '(default)'} {self.routing_key}"


def target_of(names: Names, message: AbstractIncomingMessage) -> Target | None:
    """Where the message came from, by its latest death; None when that is not ours."""
    death = Death.of(message.headers)
    if death is None:
        return None
    if death.queue in (names.deliveries, names.probes):
        return Target("", death.queue)
    if death.queue in {names.queue(short) for short in COMMAND_QUEUES}:
        routing_key = death.routing_keys[0] if death.routing_keys else message.routing_key
        return Target(names.commands, routing_key) if routing_key else None
    return None


class _Untrusted(ValueError):
    """A body that parses, but not into something a preview may show as it is."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key twice, a reader of the JSON might take either value: show neither.
    if len({key for key, _ in pairs}) != len(pairs):
        raise _Untrusted("duplicate key")
    return dict(pairs)


def _constant(name: str) -> Any:
    raise _Untrusted(f"not JSON: {name}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Untrusted(f"not a finite number: {text}")
    return value


def parse(body: bytes) -> tuple[bool, Any]:
    """(True, the value) of a body that is strict JSON in UTF-8; (False, None) otherwise.

    Strict: no NaN or Infinity, no number beyond a float's range, no key twice in an object,
    and UTF-8 only (json.loads would guess UTF-16 or UTF-32 from a body's bytes).
    """
    try:
        value = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_finite,
        )
    except (ValueError, RecursionError):
        return False, None
    return True, value


def masked(value: Any) -> Any:
    """`value` with every secret's value replaced by MASK; see SECRET_KEYS."""
    if isinstance(value, dict):
        return {key: _masked_item(key, item) for key, item in value.items()}
    if isinstance(value, list):
        return [masked(item) for item in value]
    return value


def _masked_item(key: str, value: Any) -> Any:
    # casefold, not lower: it also folds "PASSWORD" written with a long s (U+017F).
    folded = key.casefold()
    if folded in SECRET_KEYS:
        return MASK
    if folded == AUTH_KEY:
        return {name: MASK for name in value} if isinstance(value, dict) else MASK
    return masked(value)


def preview(value: Any) -> str | None:
    """The first characters of a parsed body, re-serialized with every secret's value masked."""
    try:
        text = json.dumps(masked(value), ensure_ascii=False)
    except RecursionError:
        return None
    return text[:PREVIEW_CHARACTERS] + ("…" if len(text) > PREVIEW_CHARACTERS else "")


def describe(names: Names, message: AbstractIncomingMessage) -> dict[str, Any]:
    """One line of `smtp-worker dead list`."""
    death = Death.of(message.headers)
    target = target_of(names, message)
    # A body that is not strict JSON is not shown at all: what a secret looks like in it cannot
    # be known, so no pattern could be trusted to mask it.
    readable, value = parse(message.body)
    type_ = value.get("type") if isinstance(value, dict) else None
    return {
        "routing_key": message.routing_key,
        "type": type_ if isinstance(type_, str) else None,
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "reason": death.reason if death else None,
        "queue": death.queue if death else None,
        "count": death.count if death else None,
        "died_at": death.time.isoformat() if death and death.time else None,
        "replay_to": str(target) if target else None,
        "body_bytes": len(message.body),
        "body": preview(value) if readable else None,
    }


def republished(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The message as it was first published: same body and properties, no broker headers."""
    headers = {k: v for k, v in (message.headers or {}).items() if k not in BROKER_HEADERS}
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        # Not user_id: the broker refuses one that is not the publishing connection's user.
    )


@dataclass
class ReplaySummary:
    replayed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Of the messages P.dead held when the replay began, those still there.
    left_in_dead: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "skipped": len(self.skipped),
            "left_in_dead": self.left_in_dead,
            "skipped_messages": self.skipped,
        }


async def _dead_queue(channel: AbstractChannel, names: Names) -> AbstractQueue:
    try:
        return await channel.declare_queue(names.dead, passive=True)
    except ChannelClosed as exc:
        raise DeadLetterError(f"no queue {names.dead}: is SMTP_WORKER_PREFIX right?") from exc


def _depth(queue: AbstractQueue) -> int:
    result = queue.declaration_result
    return int(result.message_count or 0) if result is not None else 0


async def list_dead(
    amqp_url: str | Sequence[str],
    names: Names,
    write: Callable[[dict[str, Any]], None],
    limit: int | None = None,
) -> int:
    """Writes up to `limit` messages of P.dead, head first, and leaves them all there."""
    connection = await open_first(amqp_url)
    try:
        channel = await connection.channel()
        queue = await _dead_queue(channel, names)
        listed = 0
        last: AbstractIncomingMessage | None = None
        try:
            while limit is None or listed < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                last, listed = message, listed + 1
                write(describe(names, message))
        finally:
            await _requeue_up_to(last)
        return listed
    finally:
        # Should a reject not get through, closing the connection requeues what it held.
        await connection.close()


async def replay_dead(
    amqp_url: str | Sequence[str], names: Names, limit: int | None = None
) -> ReplaySummary:
    """Republishes up to `limit` messages of P.dead where they came from; see the module doc."""
    summary = ReplaySummary()
    connection = await open_first(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await _dead_queue(channel, names)
        budget = _depth(queue)
        commands = await channel.get_exchange(names.commands, ensure=False)
        last_held: AbstractIncomingMessage | None = None
        try:
            for _ in range(budget):
                if limit is not None and summary.replayed >= limit:
                    break
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                target = target_of(names, message)
                why = "unknown origin" if target is None else None
                if target is not None:
                    exchange = channel.default_exchange if target.exchange == "" else commands
                    confirmation = await exchange.publish(
                        republished(message),
                        target.routing_key,
                        mandatory=True,
                        timeout=PUBLISH_TIMEOUT,
                    )
                    # A returned message (nothing bound to its routing key) is confirmed too:
                    # only a plain Ack means a queue has it.
                    if isinstance(confirmation, Basic.Ack):
                        await message.ack()
                        summary.replayed += 1
                        continue
                    why = f"not routed to {target}"
                last_held = message
                summary.skipped.append({"message_id": message.message_id, "reason": why})
        finally:
            await _requeue_up_to(last_held)
        # Counted, not asked of the broker: it requeues the nacked messages asynchronously.
        summary.left_in_dead = budget - summary.replayed
        return summary
    finally:
        await connection.close()


async def _requeue_up_to(message: AbstractIncomingMessage | None) -> None:
    """Gives back every message this channel holds unacked, up to `message`, in one frame.

    A nack, not one reject per message: P.dead is a classic queue, which counts no delivery
    limit, and only the last message needs to be kept in memory.
    """
    if message is not None:
        await message.nack(multiple=True, requeue=True)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None
