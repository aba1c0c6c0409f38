"""The probe consumer: relay probes (`settings.email.test`) run off the command consumers.

A probe waits on a relay for up to its timeout, so the command consumer does not run it: it
authenticates the command and checks its domain, queues a ProbeJob on P.probes (confirmed), and
acks the command. Here, per job:

    a turn: at most PROBES_PER_OWNER probes run at once per owner, PROBES_WAITING more wait
            in-process; the others are parked (republished to a delay queue, acked) and come back
    --> the reply recorded for its message_id, if there is one (a repeat or a redelivery)
    --> or: the handler again (reads and decrypts the settings), the probe, record the reply
    --> publish the reply --> ack

| what happened                                  | reply               | job                   |
|------------------------------------------------|---------------------|-----------------------|
| probed, or its command's reply was recorded    | success / recorded  | ack                   |
| its domain's settings were deleted meanwhile   | NotFound            | ack, `command.failed` |
| no turn for its owner                          | none yet            | parked, ack           |
| passing fault (store, broker), unexpected error| none                | reject with requeue   |
| ... on its last delivery attempt               | GeneralError        | reject: P.dead        |
| unreadable job                                 | none                | reject: P.dead        |

P.probes has a single active consumer: one worker runs every probe, so the limit per owner holds
across workers, and when that worker dies the next one gets its unacked jobs and runs them again.
Two jobs can answer one command (a repeat arrived while its probe ran): with a message_id, the
first to record its reply wins, and both send that reply, as a repeat gets the first reply.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pydantic
import structlog
from aio_pika.abc import AbstractIncomingMessage

from schemas import COMMANDS
from worker.broker import PARK_DELAYS, settle
from worker.consumer import Meta, _MessageIdReused, _returned, error_reply, success_reply
from worker.errors import (
    GENERAL_ERROR_MESSAGE,
    BrokerUnavailable,
    CommandError,
    ConcurrentWrite,
)
from worker.events import Effect, command_failed
from worker.gate import Gate, Park
from worker.handlers.base import Context, Principal, Router, Spec
from worker.jobs import ProbeJob
from worker.outcomes import Consumer, Outcome, Parts, StoreRetry, failed_attempt, processing
from worker.store import idempotency

log = structlog.get_logger("worker.probes")

PROBES_PER_OWNER = 4
PROBES_WAITING = 4  # per owner, each holding a prefetch slot; more are parked
# Jobs held at once: running (at most 4 per owner), waiting (4 per owner) and being parked.
PROBE_PREFETCH = 256
STORE_RETRY = StoreRetry((0.1, 0.5, 1.0, 2.0, 4.0, 8.0))

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Answer:
    reply: bytes
    status: str
    effects: list[Effect]
    recorded: bool = False  # found recorded: another job (or this one, before) answered first


def _refusal(job: ProbeJob, exc: CommandError, now: datetime) -> _Answer:
    """The probe's command refused as `exc` says: its error reply and `command.failed`."""
    reply = error_reply(job.type, job.message_id, exc.name, exc.message, exc.details)
    error = {"name": exc.name, "message": exc.message, "details": exc.details}
    event = command_failed(job.type, job.message_id, job.owner_id, now, error)
    return _Answer(reply, "error", [event])


class ProbeConsumer(Consumer):
    def __init__(self, parts: Parts, *, router: Router) -> None:
        super().__init__(parts)
        self.router = router
        self.gate = Gate(PARK_DELAYS, max_waiting=PROBES_WAITING)

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        try:
            job = ProbeJob.load(message.body)
            spec = self.router.get(job.type)
            if spec is None or spec.finish is None:
                raise ValueError(f"{job.type} is not a probe")
        except (pydantic.ValidationError, ValueError):
            log.error("probe.unreadable")
            await settle(message.reject(requeue=False), "probe.settle_failed")
            return
        structlog.contextvars.bind_contextvars(
            type=job.type, message_id=job.message_id, correlation_id=job.correlation_id
        )
        try:
            async with processing(message, log, "probe", Outcome) as run:
                run.outcome = await self._process(message, job, spec)
        finally:
            # The command's own count (contract 9): the command consumer queued it uncounted.
            self.metrics.command_processed(job.type, run.outcome, run.seconds)

    async def _process(
        self, message: AbstractIncomingMessage, job: ProbeJob, spec: Spec
    ) -> Outcome:
        turn = await self.gate.enter([(job.owner_id, PROBES_PER_OWNER)])
        if isinstance(turn, Park):
            return await self._park(message, job, turn.delay)
        meta = Meta.of(message)
        with turn:
            try:
                answer = await self._answer(job, spec)
            except Exception as exc:  # noqa: BLE001 - logged, traceback and all
                failed_attempt(log, "probe.failed_attempt", exc, meta.delivery_count)
                if not meta.last_attempt:
                    await settle(message.reject(requeue=True), "probe.settle_failed")
                    return Outcome.REQUEUED
                reply = error_reply(job.type, job.message_id, "GeneralError", GENERAL_ERROR_MESSAGE)
                await self._reply_quietly(job, reply, "error")
                await settle(message.reject(requeue=False), "probe.settle_failed")
                return Outcome.DEAD_LETTERED
        if _returned(message):
            # Its channel closed meanwhile: the job is back in the queue, and its next run
            # answers (from the record, when the command has a message_id).
            log.warning("probe.returned")
            return Outcome.RETURNED
        # A fresh duplicate's effects were published by the job that recorded them; a
        # redelivered job may have recorded them itself and died before publishing.
        effects = answer.effects if not answer.recorded or meta.redelivered else []
        try:
            await self._publish(job, answer, effects)
        except BrokerUnavailable as exc:
            log.warning("probe.publish_failed", cause=repr(exc.__cause__))
            await settle(message.reject(requeue=True), "probe.settle_failed")
            return Outcome.REQUEUED
        await settle(message.ack(), "probe.settle_failed")
        if answer.recorded:
            return Outcome.DUPLICATE
        return Outcome.ANSWERED if answer.status == "success" else Outcome.REFUSED

    async def _park(self, message: AbstractIncomingMessage, job: ProbeJob, delay: float) -> Outcome:
        """Its owner has every turn taken and enough waiting: back in the queue, for later."""
        try:
            await self.broker.publish_probe(job.parked_again().dump(), delay=delay)
        except BrokerUnavailable:
            await settle(message.reject(requeue=True), "probe.settle_failed")
            return Outcome.REQUEUED
        await settle(message.ack(), "probe.settle_failed")
        return Outcome.PARKED

    # --- the answer -----------------------------------------------------------------------------

    async def _answer(self, job: ProbeJob, spec: Spec) -> _Answer:
        assert spec.finish is not None
        principal = Principal(job.owner_id, job.user)
        now = datetime.now(UTC)
        recorded = await STORE_RETRY.run(self._recorded, job, now)
        if recorded is not None:
            return recorded
        data = COMMANDS[job.type][1].model_validate(job.data)
        try:
            prepared = await STORE_RETRY.run(self._prepare, spec, principal, data, now)
        except CommandError as exc:
            return await self._refused(job, exc, now)
        result = await spec.finish(prepared)
        reply = success_reply(job.type, job.message_id, result)
        return await STORE_RETRY.run(self._record, job, _Answer(reply, "success", []))

    async def _prepare(self, spec: Spec, principal: Principal, data: Any, now: datetime) -> Any:
        """The handler once more, as the command's sender: the settings as they are now."""
        async with self.store.transaction() as conn:
            return await spec.handler(
                Context(conn, principal, now, self.keyring, self.settings), data
            )

    async def _refused(self, job: ProbeJob, exc: CommandError, now: datetime) -> _Answer:
        return await STORE_RETRY.run(self._record, job, _refusal(job, exc, now))

    async def _recorded(self, job: ProbeJob, now: datetime) -> _Answer | None:
        if job.message_id is None:
            return None
        key = _key(job)
        async with self.store.transaction() as conn:
            found = (await idempotency.find(conn, [key], now)).get(key)
        if found is None:
            return None
        if found.type != job.type:
            # The principal used the message_id for a command of another type while the probe
            # waited for its relay: refused, unrecorded, as the command consumer refuses such a
            # repeat (contract 3), not answered with that command's reply.
            return _refusal(job, _MessageIdReused(), now)
        return _Answer(found.reply, found.status, found.effects, recorded=True)

    async def _record(self, job: ProbeJob, answer: _Answer) -> _Answer:
        """Records `answer` for the command's message_id; or, if another job of the same command
        recorded first, returns that one: a command has one reply."""
        if job.message_id is None:
            return answer
        now = datetime.now(UTC)
        try:
            async with self.store.transaction() as conn:
                # A probe's reply holds no secret.
                processed = idempotency.Processed(
                    job.type, answer.reply, False, answer.effects, answer.status
                )
                ttl = self.settings.idempotency_ttl
                await idempotency.record(conn, [(_key(job), processed)], now, ttl)
        except ConcurrentWrite:
            first = await self._recorded(job, now)
            if first is None:
                raise
            return first
        return answer

    # --- publishing -----------------------------------------------------------------------------

    async def _publish(self, job: ProbeJob, answer: _Answer, effects: list[Effect]) -> None:
        jobs = [self.broker.publish_event(e.routing_key, e.body) for e in effects]
        if job.reply_to is not None:
            jobs.append(
                self.broker.publish_reply(
                    job.reply_to,
                    answer.reply,
                    correlation_id=job.correlation_id,
                    type_=job.type,
                    status=answer.status,
                )
            )
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _reply_quietly(self, job: ProbeJob, body: bytes, status: str) -> None:
        if job.reply_to is None:
            return
        try:
            await self.broker.publish_reply(
                job.reply_to, body, correlation_id=job.correlation_id, type_=job.type, status=status
            )
        except BrokerUnavailable:
            log.warning("probe.reply_failed")


def _key(job: ProbeJob) -> idempotency.Key:
    assert job.message_id is not None
    return idempotency.Key(job.owner_id, job.user or "", job.message_id)
