"""The command consumer: THE one place that decides what happens to a command message.

    body --read (worker.parsing)--> command or envelope
         --authenticate, idempotency, complete, handler (one transaction)--> result
         --publish reply, events, email jobs (confirmed)--> ack

| what happened                                    | reply           | message                    |
|--------------------------------------------------|-----------------|----------------------------|
| success, or a repeat of a processed one          | success/stored  | ack                        |
| a probe, checked: queued on P.probes             | worker.probes   | ack                        |
| refused by the rules (CommandError)              | error           | ack, `command.failed`      |
| unreadable: not JSON/object, too large, unknown  | ValidationError | reject, no requeue: P.dead |
|   type, routing key not the type; and every      |                 |                            |
|   message of P.unrouted                          |                 |                            |
| a reply_to it may not name (worker.reply_to)     | none, not run   | reject, no requeue: P.dead |
| passing fault, unexpected error                  | none            | reject with requeue        |
| ... on its last delivery attempt (as the broker  | GeneralError    | reject, no requeue: P.dead |
|   counts them, not a publisher's header)         |                 |                            |
| its reply refused by the broker (a nack, its     | dropped         | ack                        |
|   channel closed over it), or its queue gone     |                 |                            |
| the broker connection lost while publishing, or  | none            | reject with requeue        |
|   its events/jobs still nacked after the pauses  |                 |                            |
|   of worker.broker.NACK_RETRY_DELAYS             |                 |                            |
| its channel closed while it ran                  | none (not yet)  | back in the queue already  |
| a bug in this module (it must not happen)        | none            | reject with requeue        |

Idempotency records are kept per owner, principal and type. Refusals are remembered like
successes, but for ValidationError and AuthenticationError: a corrected command may reuse their
message_id. A message_id the principal already used for another type is a Conflict.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pydantic
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from pydantic_core import to_json

from schemas import CommandBody
from schemas.envelope import UserAuth
from worker import parsing
from worker.batching import Batches
from worker.broker import DELIVERY_LIMIT
from worker.errors import (
    GENERAL_ERROR_MESSAGE,
    AuthenticationError,
    BrokerUnavailable,
    CommandError,
    CommitUnknown,
    ConcurrentWrite,
    Conflict,
    StoreUnavailable,
    UnreadableMessage,
    ValidationError,
)
from worker.events import Effect, command_failed
from worker.handlers.base import Context, Principal, Router, Spec, authenticate
from worker.jobs import ProbeJob
from worker.outcomes import (
    Consumer,
    Outcome,
    Parts,
    Settlement,
    StoreRetry,
    failed_attempt,
    processing,
    settle_as,
)
from worker.parsing import MAX_DETAILS, Envelope
from worker.store import Connection, Savepoints, idempotency, users

log = structlog.get_logger("worker.consumer")

# In-process retries while the store is unreachable: about 30 s in all, so a short outage does
# not burn the message's delivery attempts; past that the message is requeued.
STORE_RETRY = StoreRetry((0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0))
CONCURRENT_WRITE_RETRIES = 5
MAX_REPLY_BYTES = 16 * 1024 * 1024
# Commands that arrived together run in one store transaction, a SAVEPOINT each, up to this many.
BATCH_SIZE = 64
# On a store with a single writer (SQLite), a batch holds it, and the email claims waiting for it
# hold their relays' turns meanwhile: shorter batches keep the emails flowing while commands pour
# in (with 64, a backlog of emails built up and was parked, and its relay sat idle).
SINGLE_WRITER_BATCH_SIZE = 16


@dataclass(frozen=True, slots=True)
class Meta:
    """What the consumer needs of the AMQP message besides its body."""

    message_id: str | None
    reply_to: str | None
    correlation_id: str | None
    routing_key: str | None
    redelivered: bool
    delivery_count: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Meta:
        # A redelivery is what the broker says, not what a header claims: any publisher can set
        # `x-delivery-count`; the broker sets it (over the publisher's) only on a redelivery.
        redelivered = bool(message.redelivered)
        count = (message.headers or {}).get("x-delivery-count", 0) if redelivered else 0
        return cls(
            message_id=message.message_id or None,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id or message.message_id or None,
            routing_key=message.routing_key,
            redelivered=redelivered,
            delivery_count=count if isinstance(count, int) else 0,
        )

    @property
    def last_attempt(self) -> bool:
        return self.delivery_count >= DELIVERY_LIMIT


@dataclass(frozen=True, slots=True)
class Result:
    reply: bytes | None  # None: the probe consumer answers (worker.probes)
    effects: list[Effect]
    outcome: Outcome
    status: str = "success"
    error: str | None = None  # the name of the error of a refusal
    batch: int = 1  # how many commands ran in its transaction


@dataclass(slots=True)
class _Job:
    """A command to run: read, its handler found, and who sent it once authenticated."""

    spec: Spec
    parsed: CommandBody | Envelope
    body: bytes
    meta: Meta
    principal: Principal | None = None

    def bound(self) -> AbstractContextManager[object]:
        """Its identity bound to the log context of the batch runner that runs it."""
        return structlog.contextvars.bound_contextvars(
            message_id=self.meta.message_id,
            correlation_id=self.meta.correlation_id,
            type=self.spec.type,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """What becomes of a command message, decided once (the table above) and applied once."""

    outcome: Outcome
    settle: Settlement
    type: str | None = None
    # Published, confirmed, before the ack; a broker that refuses them requeues the message.
    result: Result | None = None
    # An error reply sent as far as the broker takes it, before the message goes to P.dead.
    notice: bytes | None = None


@dataclass(slots=True)
class _Known:
    """What a transaction read at its start for all of its commands, and the idempotency records
    it writes at its end: a handful of statements for the batch, not three for each command."""

    # The SMTP users' logins by name; None once a command of an owner ran, which may have
    # changed them: each command then reads its own.
    logins: dict[str, users.Login] | None
    # The records kept under `looked_up`, the keys read; a key outside it is read when needed.
    found: dict[idempotency.Key, idempotency.Processed]
    looked_up: set[idempotency.Key]
    # What the transaction's commands did so far, recorded when it ends (and found by repeats
    # within it).
    records: dict[idempotency.Key, idempotency.Processed] = field(default_factory=dict)


class _MessageIdReused(Conflict):
    """The principal already used this message_id for a command of another type."""

    def __init__(self) -> None:
        super().__init__("this message_id was already used for a command of another type")


# Refusals not recorded for the message_id: a corrected command may reuse it. A reused one
# cannot be recorded: the first command's record holds the key.
_NOT_REMEMBERED = (ValidationError, AuthenticationError, _MessageIdReused)


def error_reply(
    type_: str | None, command_id: str | None, name: str, message: str, details: Any = None
) -> bytes:
    return to_json(
        {
            "status": "error",
            "type": type_,
            "command_id": command_id,
            "error": {"name": name, "message": message, "details": details},
        }
    )


def success_reply(type_: str, command_id: str | None, data: pydantic.BaseModel) -> bytes:
    reply = to_json(
        {"status": "success", "type": type_, "command_id": command_id, "data": data},
        by_alias=True,
    )
    if len(reply) > MAX_REPLY_BYTES:
        # Raised before the transaction commits: the command changes nothing.
        raise ValidationError(
            "the reply would be larger than 16 MiB; ask for less at once",
            [{"loc": ["data"], "msg": "the reply would be larger than 16 MiB"}],
        )
    return reply


def _bounded(details: Any) -> Any:
    return details[:MAX_DETAILS] if isinstance(details, list) else details


class CommandConsumer(Consumer):
    """Consumes the command queues; with `unrouted`, P.unrouted, whose messages are all refused."""

    def __init__(self, parts: Parts, *, router: Router, unrouted: bool = False) -> None:
        super().__init__(parts)
        self.router = router
        self.unrouted = unrouted
        writers = self.store.writers
        size = BATCH_SIZE if writers > 1 else SINGLE_WRITER_BATCH_SIZE
        self._batches: Batches[_Job, Result] = Batches(
            self._execute_all, size=size, runners=writers
        )

    # --- the message's fate ---------------------------------------------------------------------

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        meta = Meta.of(message)
        structlog.contextvars.bind_contextvars(
            message_id=meta.message_id, correlation_id=meta.correlation_id
        )
        try:
            async with processing(message, log, "command", Outcome) as run:
                run.outcome = await self._apply(message, meta, await self._decide(message, meta))
        finally:
            # The routing key is the type of every readable command; metrics bound the rest.
            self.metrics.command_processed(message.routing_key, run.outcome, run.seconds)

    async def _apply(
        self, message: AbstractIncomingMessage, meta: Meta, verdict: Verdict
    ) -> Outcome:
        """Carries out `verdict`: its results published (confirmed), else the message requeued;
        its notice replied, as far as the broker takes it; then the message settled."""
        if verdict.result is not None:
            try:
                await self._publish(meta, verdict.type, verdict.result)
            except BrokerUnavailable as exc:
                # Without its reply the command is not done; the broker will deliver it again (its
                # channel is most likely gone), and idempotency answers with the stored reply.
                log.warning("command.publish_failed", cause=repr(exc.__cause__))
                verdict = Verdict(Outcome.REQUEUED, "requeue")
        if verdict.notice is not None:
            await self._reply_quietly(meta, verdict.notice, verdict.type, "error")
        await settle_as(message, verdict.settle, "command.settle_failed")
        return verdict.outcome

    async def _decide(self, message: AbstractIncomingMessage, meta: Meta) -> Verdict:
        """What becomes of the message; the command runs here, nothing is published."""
        try:
            refusal = (
                None if meta.reply_to is None else await self.broker.reply_to_refusal(meta.reply_to)
            )
        except BrokerUnavailable:
            return Verdict(Outcome.REQUEUED, "requeue")
        if refusal is not None:
            # Not run, not answered: publishing to that name could crash the broker's channel
            # and with it this worker's connection (see worker.reply_to).
            log.warning("command.reply_to_refused", reason=refusal)
            return Verdict(Outcome.UNREADABLE, "dead")

        try:
            if meta.message_id is not None and len(meta.message_id) > 128:
                raise UnreadableMessage(
                    "message_id is longer than 128 characters",
                    [{"loc": ["properties", "message_id"], "msg": "at most 128 characters"}],
                )
            if meta.message_id is not None and "\x00" in meta.message_id:
                # It is a key of the store, which cannot hold U+0000 on PostgreSQL.
                raise UnreadableMessage(
                    "message_id holds the NUL character",
                    [{"loc": ["properties", "message_id"], "msg": "must not contain NUL"}],
                )
            if self.unrouted:
                raise UnreadableMessage(
                    "unknown or unroutable command type",
                    [{"loc": ["type"], "msg": "no command queue takes this routing key"}],
                )
            parsed = parsing.read(message.body, meta.routing_key, self.settings.max_message_bytes)
        except UnreadableMessage as exc:
            type_ = parsing.guess_type(message.body)
            structlog.contextvars.bind_contextvars(type=type_)
            reply = error_reply(type_, meta.message_id, exc.name, exc.message, exc.details)
            return Verdict(Outcome.UNREADABLE, "dead", type=type_, notice=reply)

        type_ = parsed.type
        structlog.contextvars.bind_contextvars(type=type_)
        spec = self.router.get(type_)
        try:
            if spec is None:
                raise NotImplementedError(f"no handler for {type_}")
            result = await self._batches.submit(_Job(spec, parsed, message.body, meta))
        except Exception as exc:  # noqa: BLE001 - logged, traceback and all
            failed_attempt(log, "command.failed_attempt", exc, meta.delivery_count)
            if not meta.last_attempt:
                return Verdict(Outcome.REQUEUED, "requeue")
            reply = error_reply(type_, meta.message_id, "GeneralError", GENERAL_ERROR_MESSAGE)
            return Verdict(Outcome.DEAD_LETTERED, "dead", type=type_, notice=reply)

        structlog.contextvars.bind_contextvars(batch=result.batch)
        if result.error is not None:
            structlog.contextvars.bind_contextvars(error=result.error)
        if _returned(message):
            # Its channel closed while the command ran (the broker connection dropped): the broker
            # has put the message back, and the next delivery publishes the recorded results.
            # Publishing them now as well would only send the reply, events and emails twice.
            log.warning("command.returned")
            return Verdict(Outcome.RETURNED, "none")
        return Verdict(result.outcome, "ack", type=type_, result=result)

    async def _reply_quietly(self, meta: Meta, body: bytes, type_: str | None, status: str) -> None:
        if meta.reply_to is None:
            return
        try:
            await self.broker.publish_reply(
                meta.reply_to, body, correlation_id=meta.correlation_id, type_=type_, status=status
            )
        except BrokerUnavailable:
            log.warning("command.reply_failed")

    async def _publish(self, meta: Meta, type_: str | None, result: Result) -> None:
        jobs = []
        for effect in result.effects:
            if effect.kind == "event":
                jobs.append(self.broker.publish_event(effect.routing_key, effect.body))
            elif effect.kind == "probe":
                jobs.append(self.broker.publish_probe(effect.body))
            else:
                jobs.append(self.broker.publish_delivery(effect.body))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        # The reply last: replies have a channel of their own, and a reply confirmed before a
        # broker outage cut its command's events short would be sent again on the redelivery.
        if meta.reply_to is not None and result.reply is not None:
            await self.broker.publish_reply(
                meta.reply_to,
                result.reply,
                correlation_id=meta.correlation_id,
                type_=type_,
                status=result.status,
            )

    # --- execution ------------------------------------------------------------------------------

    async def _execute_all(self, jobs: list[_Job]) -> list[Result | BaseException]:
        """The results of commands that arrived together: alone, a command runs in a transaction
        of its own; several run in one, each in a SAVEPOINT, so a refused one rolls back alone."""
        if len(jobs) == 1:
            return [await self._execute(jobs[0])]
        try:
            results = await self._execute_batch(jobs)
        except Exception as exc:  # noqa: BLE001 - each command is run again, alone
            # A concurrent write, an outage, a bug in one of them: nothing of the batch was
            # committed, unless the store lost touch during COMMIT, when any of them may have been.
            log.warning("command.batch_failed", size=len(jobs), error=type(exc).__name__)
            maybe_done = isinstance(exc, CommitUnknown)
            runs = (self._execute(job, maybe_done=maybe_done) for job in jobs)
            return await asyncio.gather(*runs, return_exceptions=True)
        size = len(jobs)
        return [replace(r, batch=size) if isinstance(r, Result) else r for r in results]

    async def _execute_batch(self, jobs: list[_Job]) -> list[Result | BaseException]:
        results: list[Result | BaseException] = []
        async with self.store.transaction() as conn:
            known = await self._read_ahead(conn, jobs)
            savepoints = Savepoints(conn)
            for job in jobs:
                now = datetime.now(UTC)
                with job.bound():
                    await savepoints.begin()
                    try:
                        result = await self._run(conn, job, now, job.meta.redelivered, known)
                    except CommandError as exc:
                        await savepoints.rollback()
                        result = self._refused(job, exc, now, known)
                results.append(result)
            await self._record(conn, known)
        return results

    async def _read_ahead(self, conn: Connection, jobs: list[_Job]) -> _Known:
        """The logins and idempotency records `jobs` need, in a statement or two each; on
        PostgreSQL, in a batch, the row locks of their users."""
        claimed = [job.parsed.auth for job in jobs]
        logins = await users.logins(conn, {a.login for a in claimed if isinstance(a, UserAuth)})
        # Only users whose passwords were given are locked: naming another tenant's login takes
        # no lock of theirs. (Each command is then authenticated as ever, `authenticate`.)
        passed = {
            (a.login, a.password)
            for a in claimed
            if isinstance(a, UserAuth)
            and a.login in logins
            and self.keyring.verify(a.password, logins[a.login].password_hash)
        }
        verified = {login for login, _ in passed}
        if verified and len(jobs) > 1:
            # Locked before any command of the batch writes, and read again under the locks: a
            # reset, disable or delete committed since the read above counts (a user deleted
            # since is gone). A command alone locks its user when it counts its quota.
            locked = await users.lock(conn, verified)
            if locked is not None:
                for name in verified:
                    if name in locked:
                        logins[name] = locked[name]
                    else:
                        del logins[name]
        keys = set()
        for job in jobs:
            auth, message_id = job.parsed.auth, job.meta.message_id
            if message_id is None or auth is None:
                continue
            if isinstance(auth, UserAuth):
                # Only the records of a command whose own password passed are read ahead.
                if (auth.login, auth.password) in passed and auth.login in logins:
                    keys.add(idempotency.Key(logins[auth.login].owner_id, auth.login, message_id))
            else:
                keys.add(idempotency.Key(auth.owner_id, "", message_id))
        found = await idempotency.find(conn, keys, datetime.now(UTC))
        return _Known(logins, found, keys)

    async def _execute(self, job: _Job, *, maybe_done: bool = False) -> Result:
        with job.bound():
            return await self._execute_alone(job, maybe_done)

    async def _execute_alone(self, job: _Job, maybe_done: bool) -> Result:
        conflicts = 0
        maybe_done = maybe_done or job.meta.redelivered

        async def attempt() -> Result:
            nonlocal conflicts
            while True:
                try:
                    return await self._execute_once(job, maybe_done)
                except ConcurrentWrite:
                    conflicts += 1
                    if conflicts > CONCURRENT_WRITE_RETRIES:
                        raise

        def unavailable(exc: StoreUnavailable) -> None:
            # A commit the store may have done without saying so: the next attempt may find
            # this message's own record, its effects unpublished. After any other outage, a
            # record found is a concurrent duplicate's, which publishes them itself.
            nonlocal maybe_done
            maybe_done = maybe_done or isinstance(exc, CommitUnknown)

        return await STORE_RETRY.run(attempt, on_unavailable=unavailable)

    async def _execute_once(self, job: _Job, maybe_done: bool) -> Result:
        now = datetime.now(UTC)
        try:
            async with self.store.transaction() as conn:
                known = await self._read_ahead(conn, [job])
                result = await self._run(conn, job, now, maybe_done, known)
                await self._record(conn, known)
                return result
        except CommandError as exc:
            refused = _Known({}, {}, set())
            result = self._refused(job, exc, now, refused)
            if refused.records:
                async with self.store.transaction() as conn:
                    await self._record(conn, refused)
            return result

    async def _run(
        self, conn: Connection, job: _Job, now: datetime, maybe_done: bool, known: _Known
    ) -> Result:
        """The command's result, run in `conn`; CommandError when it is refused."""
        spec, parsed, meta = job.spec, job.parsed, job.meta
        # A run after a failed one authenticates again: the last one's principal is not this one's.
        job.principal = None
        auth = parsed.auth
        if auth is None:
            raise AuthenticationError()
        principal = await authenticate(conn, self.keyring, spec.auth, auth, known.logins)
        job.principal = principal
        if spec.auth == "owner":
            known.logins = None  # its handler may change an SMTP user
        if meta.message_id is not None:
            key = _key(principal, meta.message_id)
            if key not in known.looked_up:
                known.found.update(await idempotency.find(conn, [key], now))
                known.looked_up.add(key)
            found = known.records.get(key) or known.found.get(key)
            if found is not None:
                if found.type != spec.type:
                    raise _MessageIdReused()
                reply = found.reply
                if found.secret:
                    reply = self.keyring.decrypt(reply.decode()).encode()
                # A redelivery may follow a crash between commit and publish, a retry a commit
                # never confirmed: publish everything again. A fresh repeat gets its reply only.
                effects = found.effects if maybe_done else []
                return Result(reply, effects, Outcome.DUPLICATE, found.status)
        # Only now, its sender known, is the data of an envelope read in full.
        command = parsing.complete(job.body, parsed) if isinstance(parsed, Envelope) else parsed
        ctx = Context(conn, principal, now, self.keyring, self.settings)
        data = await spec.handler(ctx, command.data)
        if spec.finish is None:
            reply = success_reply(spec.type, meta.message_id, data)
            await ctx.finish()
            self._remember(known, principal, meta, spec, "success", reply, ctx.effects)
            return Result(reply, ctx.effects, Outcome.SUCCESS)
        # A probe waits on a relay for up to its timeout: the probe consumer runs it, and answers
        # and records it, without holding this consumer's slot (contract 5).
        probe = ProbeJob(
            type=spec.type,
            owner_id=principal.owner_id,
            user=principal.user,
            data=command.data.model_dump(mode="json", by_alias=True),
            message_id=meta.message_id,
            reply_to=meta.reply_to,
            correlation_id=meta.correlation_id,
        )
        return Result(None, [Effect("probe", "", probe.dump())], Outcome.QUEUED)

    def _remember(
        self,
        known: _Known,
        principal: Principal,
        meta: Meta,
        spec: Spec,
        status: str,
        reply: bytes,
        effects: list[Effect],
    ) -> None:
        """Keeps what the command did, to be recorded with the transaction (`_record`)."""
        if meta.message_id is None:
            return
        secret = spec.secret and status == "success"
        if secret:
            reply = self.keyring.encrypt(reply.decode()).encode()
        processed = idempotency.Processed(spec.type, reply, secret, effects, status)
        known.records[_key(principal, meta.message_id)] = processed

    async def _record(self, conn: Connection, known: _Known) -> None:
        records = list(known.records.items())
        await idempotency.record(conn, records, datetime.now(UTC), self.settings.idempotency_ttl)

    def _refused(self, job: _Job, exc: CommandError, now: datetime, known: _Known) -> Result:
        """The refusal's reply and event, remembered in `known` when it is to be recorded."""
        spec, principal, meta = job.spec, job.principal, job.meta
        details = _bounded(exc.details)
        reply = error_reply(spec.type, meta.message_id, exc.name, exc.message, details)
        owner_id = principal.owner_id if principal else None
        error = {"name": exc.name, "message": exc.message, "details": details}
        effects = [command_failed(spec.type, meta.message_id, owner_id, now, error)]
        if principal is not None and not isinstance(exc, _NOT_REMEMBERED):
            self._remember(known, principal, meta, spec, "error", reply, effects)
        return Result(reply, effects, Outcome.REFUSED, "error", exc.name)


def _key(principal: Principal, message_id: str) -> idempotency.Key:
    return idempotency.Key(principal.owner_id, principal.user or "", message_id)


def _returned(message: AbstractIncomingMessage) -> bool:
    """Whether the message's channel has closed, which gives every unacked message back."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False
