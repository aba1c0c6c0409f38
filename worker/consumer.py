"""The command consumer: THE one place that decides what happens to a command message.

    body --parse--> command --authenticate, idempotency, handler (one transaction)--> result
         --publish reply, events, email jobs (confirmed)--> ack

| what happened                              | reply          | message                   |
|--------------------------------------------|----------------|---------------------------|
| success, or a repeat of a processed one    | success/stored | ack                       |
| refused by the rules (CommandError)        | error          | ack, `command.failed`     |
| unreadable (not JSON/object, too large…)   | ValidationError| reject, no requeue: P.dead|
| passing fault, unexpected error            | none           | reject with requeue       |
| ... on its last delivery attempt           | GeneralError   | reject, no requeue: P.dead|
| the reply or an event cannot be published  | none           | reject with requeue       |
| its channel closed while it ran            | none (not yet) | back in the queue already |
| a bug in this module (it must not happen)  | none           | reject with requeue       |
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydantic
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from pydantic_core import to_json

from schemas import COMMANDS, CommandBody, command_adapter
from worker.broker import DELIVERY_LIMIT, Broker, settle
from worker.config import Settings
from worker.errors import (
    GENERAL_ERROR_MESSAGE,
    AuthenticationError,
    BrokerUnavailable,
    CommandError,
    CommitUnknown,
    ConcurrentWrite,
    StoreUnavailable,
    UnreadableMessage,
    ValidationError,
)
from worker.handlers.base import (
    REGISTRY,
    Context,
    Effect,
    Principal,
    Spec,
    authenticate,
    event_body,
)
from worker.security import Keyring
from worker.store import Store, idempotency

log = structlog.get_logger("worker.consumer")

# In-process retries while the store is unreachable: about 30 s in all, so a short outage does
# not burn the message's delivery attempts; past that the message is requeued.
STORE_BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)
CONCURRENT_WRITE_RETRIES = 5
_UNREADABLE_TYPES = frozenset({"json_invalid", "json_type", "dict_type", "model_type"})
_MAX_SHORTSTR = 255


@dataclass(frozen=True, slots=True)
class Meta:
    """What the consumer needs of the AMQP message besides its body."""

    message_id: str | None
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool
    delivery_count: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Meta:
        headers = message.headers or {}
        count = headers.get("x-delivery-count", 0)
        reply_to = message.reply_to
        if reply_to is not None and not (0 < len(reply_to) <= _MAX_SHORTSTR):
            reply_to = None
        return cls(
            message_id=message.message_id or None,
            reply_to=reply_to,
            correlation_id=message.correlation_id or message.message_id or None,
            redelivered=bool(message.redelivered) or bool(count),
            delivery_count=count if isinstance(count, int) else 0,
        )

    @property
    def last_attempt(self) -> bool:
        return self.delivery_count >= DELIVERY_LIMIT


@dataclass(frozen=True, slots=True)
class Result:
    reply: bytes
    effects: list[Effect]
    outcome: str
    status: str = "success"


class _InvalidData(Exception):
    """The body is a command of a known type, but its `auth` or `data` breaks the rules."""

    def __init__(self, type_: str, errors: list[Any], auth: Any) -> None:
        self.type = type_
        self.errors = errors
        self.auth = auth


def _raise_if_unreadable(first: Any) -> None:
    """The first validation error of a body that cannot be read as a command at all."""
    if first["type"] in _UNREADABLE_TYPES and not first["loc"]:
        raise UnreadableMessage("the body is not a JSON object", [{"loc": [], "msg": first["msg"]}])
    if first["type"] == "union_tag_not_found":
        raise UnreadableMessage(
            "the body has no command type", [{"loc": ["type"], "msg": "Field required"}]
        )
    if first["type"] == "union_tag_invalid":
        raise UnreadableMessage(
            "unknown command type", [{"loc": ["type"], "msg": "unknown command type"}]
        )


def _nul_errors(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """An error, located like pydantic's, for every string of `auth` or `data` holding U+0000.

    PostgreSQL text cannot hold that character (SQLite can): refusing it here, before any query
    sees it, answers the same on both stores instead of failing in the store on one.
    """
    found: list[dict[str, Any]] = []

    def walk(value: Any, loc: tuple[Any, ...]) -> None:
        if isinstance(value, str) and "\x00" in value:
            found.append({"loc": loc, "msg": "must not contain the NUL character"})
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*loc, index))

    for part in ("auth", "data"):
        walk(raw.get(part), (raw["type"], part))
    return found


def _details(errors: list[Any]) -> list[dict[str, Any]]:
    # The first element of a loc is the union tag; the sender never wrote it.
    return [{"loc": list(e["loc"][1:]), "msg": e["msg"]} for e in errors]


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
    return to_json(
        {"status": "success", "type": type_, "command_id": command_id, "data": data},
        by_alias=True,
    )


class CommandConsumer:
    def __init__(self, settings: Settings, store: Store, broker: Broker, keyring: Keyring) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.keyring = keyring

    # --- parsing --------------------------------------------------------------------------------

    def parse(self, body: bytes) -> CommandBody:
        if len(body) > self.settings.max_message_bytes:
            raise UnreadableMessage(
                f"the body is larger than {self.settings.max_message_bytes} bytes",
                [{"loc": [], "msg": "too large"}],
            )
        command: CommandBody | None = None
        errors: list[Any] = []
        try:
            command = command_adapter.validate_json(body)
        except pydantic.ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            _raise_if_unreadable(errors[0])
        # In valid JSON, U+0000 can only be written as this escape.
        if command is not None and b"\\u0000" not in body:
            return command
        raw = json.loads(body)  # valid JSON object: pydantic got past the tag
        errors += _nul_errors(raw)
        if command is not None and not errors:
            return command
        raise _InvalidData(raw["type"], errors, raw.get("auth"))

    @staticmethod
    def _guess_type(body: bytes) -> str | None:
        """The `type` of an unreadable body, as its reply can carry it back."""
        try:
            value = json.loads(body)
        except (ValueError, RecursionError):
            return None
        type_ = value.get("type") if isinstance(value, dict) else None
        if not isinstance(type_, str):
            return None
        # The reply's `type` property is an AMQP short string, at most 255 bytes of UTF-8, and
        # JSON escapes may hold lone surrogates, which neither UTF-8 nor the reply's JSON encode.
        return type_.encode(errors="ignore")[:_MAX_SHORTSTR].decode(errors="ignore")

    # --- the message's fate ---------------------------------------------------------------------

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        meta = Meta.of(message)
        structlog.contextvars.bind_contextvars(
            message_id=meta.message_id, correlation_id=meta.correlation_id
        )
        outcome = "unknown"
        try:
            outcome = await self._process(message, meta)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            # A bug of the consumer's own. Left unsettled, the message would hold a prefetch slot
            # until the channel closes; requeued, it meets the delivery limit and lands in P.dead.
            log.exception("command.crashed")
            outcome = "crashed"
            await settle(message.reject(requeue=True), "command.settle_failed")
        finally:
            log.info(
                "command.processed",
                outcome=outcome,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()

    async def _process(self, message: AbstractIncomingMessage, meta: Meta) -> str:
        type_: str | None = None
        invalid: _InvalidData | None = None
        command: CommandBody | None = None
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
            try:
                command = self.parse(message.body)
                type_ = command.type
            except _InvalidData as exc:
                invalid, type_ = exc, exc.type
        except UnreadableMessage as exc:
            type_ = self._guess_type(message.body)
            structlog.contextvars.bind_contextvars(type=type_)
            reply = error_reply(type_, meta.message_id, exc.name, exc.message, exc.details)
            await self._reply_quietly(meta, reply, type_, "error")
            await settle(message.reject(requeue=False), "command.settle_failed")
            return "unreadable"

        structlog.contextvars.bind_contextvars(type=type_)
        spec = REGISTRY.get(type_)
        try:
            if spec is None:
                raise NotImplementedError(f"no handler for {type_}")
            result = await self._execute(spec, command, invalid, meta)
        except Exception as exc:
            transient = isinstance(exc, StoreUnavailable | BrokerUnavailable)
            log.warning(
                "command.failed_attempt",
                error=type(exc).__name__,
                transient=transient,
                exc_info=not transient,
                delivery_count=meta.delivery_count,
            )
            if not meta.last_attempt:
                await settle(message.reject(requeue=True), "command.settle_failed")
                return "requeued"
            reply = error_reply(type_, meta.message_id, "GeneralError", GENERAL_ERROR_MESSAGE)
            await self._reply_quietly(meta, reply, type_, "error")
            await settle(message.reject(requeue=False), "command.settle_failed")
            return "dead-lettered"

        if _returned(message):
            # Its channel closed while the command ran (the broker connection dropped): the broker
            # has put the message back, and the next delivery publishes the recorded results.
            # Publishing them now as well would only send the reply, events and emails twice.
            log.warning("command.returned")
            return "returned"
        try:
            await self._publish(meta, type_, result)
        except BrokerUnavailable as exc:
            # Without its reply the command is not done; the broker will deliver it again (its
            # channel is most likely gone), and idempotency answers with the stored reply.
            log.warning("command.publish_failed", cause=repr(exc.__cause__))
            await settle(message.reject(requeue=True), "command.settle_failed")
            return "requeued"
        await settle(message.ack(), "command.settle_failed")
        return result.outcome

    async def _reply_quietly(self, meta: Meta, body: bytes, type_: str | None, status: str) -> None:
        if meta.reply_to is None:
            return
        try:
            await self.broker.publish_reply(
                meta.reply_to, body, correlation_id=meta.correlation_id, type_=type_, status=status
            )
        except BrokerUnavailable:
            log.warning("command.reply_failed")

    async def _publish(self, meta: Meta, type_: str, result: Result) -> None:
        jobs = []
        if meta.reply_to is not None:
            jobs.append(
                self.broker.publish_reply(
                    meta.reply_to,
                    result.reply,
                    correlation_id=meta.correlation_id,
                    type_=type_,
                    status=result.status,
                )
            )
        for effect in result.effects:
            if effect.kind == "event":
                jobs.append(self.broker.publish_event(effect.routing_key, effect.body))
            else:
                jobs.append(self.broker.publish_delivery(effect.body))
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    # --- execution ------------------------------------------------------------------------------

    async def _execute(
        self, spec: Spec, command: CommandBody | None, invalid: _InvalidData | None, meta: Meta
    ) -> Result:
        conflicts = 0
        backoff = iter(STORE_BACKOFF)
        maybe_done = meta.redelivered
        while True:
            try:
                return await self._execute_once(spec, command, invalid, meta, maybe_done)
            except ConcurrentWrite:
                conflicts += 1
                if conflicts > CONCURRENT_WRITE_RETRIES:
                    raise
            except StoreUnavailable as exc:
                # A commit the store may have done without saying so: the next attempt may find
                # this message's own record, its effects unpublished. After any other outage, a
                # record found is a concurrent duplicate's, which publishes them itself.
                maybe_done = maybe_done or isinstance(exc, CommitUnknown)
                delay = next(backoff, None)
                if delay is None:
                    raise
                log.warning("store.unavailable", retry_in=delay)
                await asyncio.sleep(delay)

    async def _execute_once(
        self,
        spec: Spec,
        command: CommandBody | None,
        invalid: _InvalidData | None,
        meta: Meta,
        maybe_done: bool,
    ) -> Result:
        now = datetime.now(UTC)
        principal: Principal | None = None
        try:
            async with self.store.transaction() as conn:
                principal = await authenticate(
                    conn, self.keyring, spec.auth, self._auth(spec, command, invalid)
                )
                if meta.message_id is not None:
                    found = await idempotency.find(conn, principal.owner_id, meta.message_id, now)
                    if found is not None:
                        # A redelivery may follow a crash between commit and publish, a retry
                        # a commit never confirmed: publish everything again. A fresh repeat
                        # gets its reply only.
                        effects = found.effects if maybe_done else []
                        return Result(found.reply, effects, "duplicate", _status(found.reply))
                if invalid is not None:
                    raise ValidationError("the command's data is invalid", _details(invalid.errors))
                assert command is not None
                ctx = Context(conn, principal, now, self.keyring, self.settings)
                data = await spec.handler(ctx, command.data)
                if spec.finish is None:
                    reply = success_reply(spec.type, meta.message_id, data)
                    await self._record(conn, principal, meta, spec.type, reply, ctx.effects, now)
                    await ctx.finish()
                    return Result(reply, ctx.effects, "success")
            # Slow I/O after the transaction; its reply is recorded in a second one.
            data = await spec.finish(data)
            reply = success_reply(spec.type, meta.message_id, data)
            if meta.message_id is not None:
                async with self.store.transaction() as conn:
                    await self._record(conn, principal, meta, spec.type, reply, ctx.effects, now)
            return Result(reply, ctx.effects, "success")
        except CommandError as exc:
            return await self._refused(spec.type, principal, meta, exc, now)

    @staticmethod
    def _auth(spec: Spec, command: CommandBody | None, invalid: _InvalidData | None) -> Any:
        if command is not None:
            return command.auth
        assert invalid is not None
        if any(len(e["loc"]) > 1 and e["loc"][1] == "auth" for e in invalid.errors):
            raise AuthenticationError()
        # `auth` is fine, only `data` is not: who asked decides the event and idempotency scope.
        return COMMANDS[spec.type][0].model_validate(invalid.auth)

    async def _record(
        self,
        conn: Any,
        principal: Principal,
        meta: Meta,
        type_: str,
        reply: bytes,
        effects: list[Effect],
        now: datetime,
    ) -> None:
        if meta.message_id is None:
            return
        await idempotency.record(
            conn,
            owner_id=principal.owner_id,
            message_id=meta.message_id,
            type_=type_,
            reply=reply,
            effects=effects,
            now=now,
            ttl=self.settings.idempotency_ttl,
        )

    async def _refused(
        self, type_: str, principal: Principal | None, meta: Meta, exc: CommandError, now: datetime
    ) -> Result:
        structlog.contextvars.bind_contextvars(error=exc.name)
        reply = error_reply(type_, meta.message_id, exc.name, exc.message, exc.details)
        owner_id = principal.owner_id if principal else None
        failed = {
            "type": type_,
            "command_id": meta.message_id,
            "error": {"name": exc.name, "message": exc.message, "details": exc.details},
        }
        effects = [
            Effect("event", "command.failed", event_body("command.failed", owner_id, now, failed))
        ]
        if principal is not None and meta.message_id is not None:
            async with self.store.transaction() as conn:
                await self._record(conn, principal, meta, type_, reply, effects, now)
        return Result(reply, effects, "refused", "error")


def _returned(message: AbstractIncomingMessage) -> bool:
    """Whether the message's channel has closed, which gives every unacked message back."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except ChannelInvalidStateError:
        return True
    return False


def _status(reply: bytes) -> str:
    return "error" if reply.startswith(b'{"status":"error"') else "success"
