"""The delivery consumer: one message on `P.deliveries` per email to send.

    {"email_id": ...} --claim the email (a lease)--> compose --SmtpPool.send-->
        sent:      mark sent, `email.sent`, ack
        transient: count the attempt, republish to the delay queue of RETRY_DELAYS[n], ack;
                   past the last delay: mark failed, `email.failed` (permanent: false)
        permanent: mark failed, `email.failed` (permanent: true), ack

Retries wait in delay queues (a TTL that dead-letters back to P.deliveries), never in a sleeping
consumer. An email already sent or failed is not sent again when its job comes back (a redelivery
after a crash); its outcome event is published again instead, since the crash may have lost it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import or_, select, update
from sqlalchemy.engine import Row

from worker.broker import Broker, settle
from worker.config import Settings
from worker.errors import (
    SmtpPermanentError,
    SmtpTransientError,
    StoreUnavailable,
    TransientError,
)
from worker.handlers.base import event_body
from worker.handlers.settings import relay_of
from worker.mail.compose import hit_email, hit_message_id, ticket_email, ticket_message_id
from worker.mail.relay import Relay, SmtpPool
from worker.security import Keyring
from worker.store import Store
from worker.store.tables import channels, email_settings, emails, hits, tickets

log = structlog.get_logger("worker.delivery")

STORE_BACKOFF = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)
# Long enough for one send through a slow relay; a worker killed while sending holds the email
# this long before another may send it.
LEASE = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Job:
    """An email claimed for sending, with everything needed to compose and send it."""

    email: Row[Any]
    relay: Relay
    sender: str
    message: EmailMessage


class DeliveryConsumer:
    def __init__(self, settings: Settings, store: Store, broker: Broker, keyring: Keyring) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.keyring = keyring
        self.pool = SmtpPool()

    async def close(self) -> None:
        await self.pool.close()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        outcome = "unknown"
        try:
            email_id = json.loads(message.body)["email_id"]
            if not isinstance(email_id, str):
                raise TypeError("email_id")
        except (ValueError, KeyError, TypeError):
            log.error("delivery.unreadable")
            await settle(message.reject(requeue=False), "delivery.settle_failed")
            return
        structlog.contextvars.bind_contextvars(email_id=email_id)
        try:
            outcome = await self._deliver(email_id, bool(message.redelivered))
            await settle(message.ack(), "delivery.settle_failed")
        except TransientError as exc:
            outcome = "requeued"
            log.warning("delivery.requeued", error=type(exc).__name__)
            await settle(message.reject(requeue=True), "delivery.settle_failed")
        except Exception:
            # A bug: requeued until the delivery limit dead-letters it into P.dead.
            outcome = "requeued"
            log.exception("delivery.crashed")
            await settle(message.reject(requeue=True), "delivery.settle_failed")
        finally:
            log.info(
                "email.processed",
                outcome=outcome,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.clear_contextvars()

    async def _with_store(self, operation: Any, *args: Any) -> Any:
        """Runs a store step, waiting out a short outage before giving the message back."""
        for delay in (*STORE_BACKOFF, None):
            try:
                return await operation(*args)
            except StoreUnavailable:
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _deliver(self, email_id: str, redelivered: bool) -> str:
        now = datetime.now(UTC)
        job: Job | str = await self._with_store(self._claim, email_id, now, redelivered)
        if isinstance(job, str):
            if job == "busy":
                # Another worker is sending it (or died doing so): look again after a delay.
                await self._publish_job(email_id, self.settings.retry_delays[0])
            return job
        try:
            await self.pool.send(job.relay, job.message, job.sender, job.email.recipients)
        except SmtpPermanentError as exc:
            return await self._finish(job, "failed", str(exc), permanent=True)
        except SmtpTransientError as exc:
            attempts = job.email.attempts + 1
            if attempts > len(self.settings.retry_delays):
                return await self._finish(job, "failed", str(exc), permanent=False)
            await self._record(job.email, "pending", attempts, str(exc))
            await self._publish_job(job.email.id, self.settings.retry_delays[attempts - 1])
            return "retry"
        return await self._finish(job, "sent", None, permanent=False)

    async def _publish_job(self, email_id: str, delay: float) -> None:
        await self.broker.publish_delivery(json.dumps({"email_id": email_id}).encode(), delay=delay)

    async def _claim(self, email_id: str, now: datetime, redelivered: bool) -> Job | str:
        """Takes the email for sending, or says why not (`done`, `busy`, `missing`)."""
        async with self.store.transaction() as conn:
            email = (await conn.execute(select(emails).where(emails.c.id == email_id))).first()
            if email is None:
                return "missing"
            if email.status in ("sent", "failed"):
                if redelivered:
                    await self._republish_outcome(email)
                return "done"
            claimed = await conn.execute(
                update(emails)
                .where(
                    emails.c.id == email_id,
                    or_(emails.c.lease_until.is_(None), emails.c.lease_until < now),
                )
                .values(lease_until=now + LEASE)
            )
            if claimed.rowcount != 1:
                return "busy"
            ticket = (await conn.execute(select(tickets).where(tickets.c.sid == email.sid))).one()
            settings = (
                await conn.execute(
                    select(email_settings).where(
                        email_settings.c.domain == email.domain,
                        email_settings.c.owner_id == email.owner_id,
                    )
                )
            ).first()
            prefix = await conn.scalar(
                select(channels.c.subject_prefix).where(
                    channels.c.owner_id == email.owner_id, channels.c.name == ticket.channel
                )
            )
            hit = None
            if email.seq is not None:
                hit = (
                    await conn.execute(
                        select(hits).where(hits.c.sid == email.sid, hits.c.seq == email.seq)
                    )
                ).one()
        if settings is None:
            return await self._finish_without_job(email, f"no email settings for {email.domain}")
        password = self.keyring.decrypt(settings.auth_pass_enc) if settings.auth_pass_enc else None
        common = {
            "sid": ticket.sid,
            "domain": email.domain,
            "sender": settings.sender,
            "recipients": email.recipients,
            "subject_prefix": prefix if prefix is not None else f"[{ticket.channel}]",
            "title": ticket.title,
        }
        if hit is None:
            message = ticket_email(
                **common, body=ticket.body, severity=ticket.severity, created_at=ticket.created_at
            )
        else:
            message = hit_email(
                **common, seq=hit.seq, summary=hit.summary, body=hit.body, created_at=hit.created_at
            )
        envelope_sender = parseaddr(settings.sender)[1] or settings.sender
        return Job(email, relay_of(settings, password), envelope_sender, message)

    async def _record(self, email: Row[Any], status: str, attempts: int, error: str | None) -> None:
        """Writes the email's state, mirrored on its ticket's `delivery`, and frees its lease."""
        now = datetime.now(UTC)

        async def write() -> None:
            async with self.store.transaction() as conn:
                await conn.execute(
                    update(emails)
                    .where(emails.c.id == email.id)
                    .values(
                        status=status,
                        attempts=attempts,
                        last_error=error,
                        lease_until=None,
                        updated_at=now,
                    )
                )
                await conn.execute(
                    update(tickets)
                    .where(tickets.c.sid == email.sid)
                    .values(
                        delivery_status=status,
                        delivery_attempts=attempts,
                        delivery_last_error=error,
                    )
                )

        await self._with_store(write)

    async def _finish(self, job: Job, status: str, error: str | None, *, permanent: bool) -> str:
        email = job.email
        attempts = email.attempts + 1
        await self._record(email, status, attempts, error)
        updated = email._asdict() | {"status": status, "attempts": attempts, "last_error": error}
        await self._publish_outcome(updated, job.message["Message-ID"], permanent=permanent)
        return status

    async def _finish_without_job(self, email: Row[Any], error: str) -> str:
        """An email that cannot be composed (its domain lost its settings): failed for good."""
        await self._record(email, "failed", email.attempts, error)
        updated = email._asdict() | {"status": "failed", "last_error": error}
        await self._publish_outcome(updated, None, permanent=True)
        return "failed"

    async def _republish_outcome(self, email: Row[Any]) -> None:
        message_id = (
            ticket_message_id(email.sid, email.domain)
            if email.seq is None
            else hit_message_id(email.sid, email.seq, email.domain)
        )
        permanent = email.attempts <= len(self.settings.retry_delays)
        await self._publish_outcome(email._asdict(), message_id, permanent=permanent)

    async def _publish_outcome(
        self, email: dict[str, Any], message_id: str | None, *, permanent: bool
    ) -> None:
        now = datetime.now(UTC)
        if email["status"] == "sent":
            data: dict[str, Any] = {
                "sid": email["sid"],
                "seq": email["seq"],
                "recipients": email["recipients"],
                "message_id": message_id,
                "attempts": email["attempts"],
            }
            type_ = "email.sent"
        else:
            data = {
                "sid": email["sid"],
                "seq": email["seq"],
                "error": email["last_error"],
                "permanent": permanent,
                "attempts": email["attempts"],
            }
            type_ = "email.failed"
        await self.broker.publish_event(type_, event_body(type_, email["owner_id"], now, data))
