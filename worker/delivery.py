"""The delivery consumer: one message on `P.deliveries` per email to send.

    {"email_id", "owner_id", "domain"} --a turn at its relay and owner (worker.gate)-->
        no turn soon: parked (republished to a short delay queue, acked; no attempt spent)
    --claim the email (a lease), once its relay has a free connection--> compose --SmtpPool.send-->
        sent:      mark sent, `email.sent`, ack
        transient: count the attempt, republish to the delay queue of RETRY_DELAYS[n], ack;
                   past the last delay: mark failed, `email.failed` (permanent: false)
        permanent: mark failed, `email.failed` (permanent: true), ack

Retries wait in delay queues (a TTL that dead-letters back to P.deliveries), never in a sleeping
consumer. So do emails whose relay is saturated: a relay that is slow or never answers holds only
its own few turns (one per pooled connection), never the prefetch slots other relays' emails
need, and an owner holds at most SENDS_PER_OWNER turns across its relays (contract 5).

An email already sent or failed is not sent again when its job comes back (a redelivery after a
crash); its outcome event is published again instead, since the crash may have lost it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pydantic
import structlog
from aio_pika.abc import AbstractIncomingMessage

from schemas._types import split_mailbox
from worker.batching import Batches
from worker.broker import PARK_DELAYS
from worker.errors import (
    ConcurrentWrite,
    SmtpPermanentError,
    SmtpTransientError,
    TransientError,
)
from worker.events import event_body
from worker.gate import Gate, Park, Turn
from worker.jobs import DeliveryJob
from worker.mail.compose import hit_email, hit_message_id, ticket_email, ticket_message_id
from worker.mail.relay import Relay, SmtpPool, relay_of
from worker.outcomes import (
    Consumer,
    EmailOutcome,
    Parts,
    Settlement,
    StoreRetry,
    Unclaimed,
    processing,
    settle_as,
)
from worker.store import Row, emails

log = structlog.get_logger("worker.delivery")

STORE_RETRY = StoreRetry((0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0))
# Long enough for one send through a slow relay; a worker killed while sending holds the email
# this long before another may send it.
LEASE = timedelta(seconds=60)
# Turns per relay: one per pooled connection, so that a send never waits for one while it holds
# its email's lease. And per owner, across its relays, so that many dead relays of one owner
# cannot hold every slot either.
CONNECTIONS_PER_RELAY = 4
SENDS_PER_OWNER = 16
# A relay where no send started or ended for this long is taken for one that does not answer:
# its emails do not wait in-process for it, they are parked. Other owners' emails never wait
# on it (the caps below see to that), so it only needs to outlast a busy worker's slowest
# healthy sends.
PATIENCE = 5.0
# Emails waiting in-process for a turn: per relay (or owner), and in all at most half the
# prefetch (app.py), so that the other half always takes the next emails in the queue, if only
# to park them, and a healthy relay's email behind them finds its turn.
MAX_WAITING = 64
MAX_WAITING_TOTAL = 128
# Emails that came meanwhile are claimed together, and the outcomes of those sent meanwhile are
# recorded together, up to this many: on PostgreSQL a claim is two statements and a record one,
# each committing on its own; on SQLite each is one transaction.
CLAIMS_BATCH = 64
RECORDS_BATCH = 64
RECORD_RETRIES = 5


@dataclass(frozen=True, slots=True)
class Job:
    """An email claimed for sending, with everything needed to compose and send it."""

    email: Row[Any]
    relay: Relay
    sender: str
    message_id: str
    message: bytes


@dataclass(frozen=True, slots=True)
class _Claim:
    """An email to claim for sending; `holders`, the names of its earlier tries, which failed,
    and may have taken their leases all the same (their answers lost)."""

    email_id: str
    now: datetime
    holders: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Taken:
    """A claimed email, and its relay (None when its domain lost its settings)."""

    email: Row[Any]
    relay: Relay | None


# What a claim found: the email taken, else why not (see DeliveryConsumer._claim).
_Claimed = _Taken | Unclaimed | Row[Any]


class DeliveryConsumer(Consumer):
    def __init__(self, parts: Parts) -> None:
        super().__init__(parts)
        writers = self.store.writers
        self._records: Batches[emails.State, None] = Batches(
            self._record_all, size=RECORDS_BATCH, runners=writers
        )
        self._claims: Batches[_Claim, _Claimed] = Batches(
            self._claim_all, size=CLAIMS_BATCH, runners=writers
        )
        self.pool = SmtpPool(max_per_relay=CONNECTIONS_PER_RELAY)
        self.gate = Gate(
            PARK_DELAYS,
            max_waiting=MAX_WAITING,
            max_waiting_total=MAX_WAITING_TOTAL,
            patience=PATIENCE,
        )

    async def close(self) -> None:
        await self.pool.close()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        try:
            job = DeliveryJob.load(message.body)
        except pydantic.ValidationError:
            log.error("delivery.unreadable")
            await settle_as(message, "dead", "delivery.settle_failed")
            return
        structlog.contextvars.bind_contextvars(email_id=job.email_id)
        async with processing(
            message, log, "delivery", EmailOutcome, processed="email.processed"
        ) as run:
            settlement: Settlement = "ack"
            try:
                run.outcome = await self._process(job, bool(message.redelivered))
            except TransientError as exc:
                run.outcome, settlement = EmailOutcome.REQUEUED, "requeue"
                log.warning("delivery.requeued", error=type(exc).__name__)
            await settle_as(message, settlement, "delivery.settle_failed")

    async def _process(self, job: DeliveryJob, redelivered: bool) -> EmailOutcome:
        if job.owner_id is None or job.domain is None:
            # Queued by an older release: the email says whose it is and which relay it takes.
            found = await STORE_RETRY.run(self._complete, job)
            if found is None:
                return EmailOutcome.MISSING
            job = found
        turn = await self.gate.enter(
            [
                (("owner", job.owner_id), SENDS_PER_OWNER),
                (("relay", job.domain), CONNECTIONS_PER_RELAY),
            ]
        )
        if isinstance(turn, Park):
            return await self._park(job, turn.delay)
        with turn:
            outcome = await self._deliver(job, redelivered, turn)
        if outcome is EmailOutcome.SATURATED:
            return await self._park(job, PARK_DELAYS[0])
        return outcome

    async def _complete(self, job: DeliveryJob) -> DeliveryJob | None:
        async with self.store.transaction() as conn:
            email = (await emails.get_many(conn, [job.email_id])).get(job.email_id)
        if email is None:
            return None
        return job.model_copy(update={"owner_id": email.owner_id, "domain": email.domain})

    async def _park(self, job: DeliveryJob, delay: float) -> EmailOutcome:
        """No turn at its relay soon: back in the queue for later, with no attempt spent."""
        await self.broker.publish_delivery(job.parked_again().dump(), delay=delay)
        return EmailOutcome.PARKED

    async def _deliver(self, delivery: DeliveryJob, redelivered: bool, turn: Turn) -> EmailOutcome:
        email_id = delivery.email_id
        # The names of the claim's tries that failed: what they took (their answers lost), its
        # next tries may take again.
        holders: list[str] = []
        job = await STORE_RETRY.run(self._claim, email_id, holders)
        if isinstance(job, EmailOutcome):  # failed for good before it could be sent
            return job
        if isinstance(job, str):
            if job == "busy":
                # Another worker is sending it (or died doing so): look again after a delay,
                # the first retry's, or a park's when RETRY_DELAYS is empty (no retries).
                delay = (self.settings.retry_delays or PARK_DELAYS)[0]
                await self.broker.publish_delivery(delivery.dump(), delay=delay)
            return EmailOutcome(job)
        if not isinstance(job, Job):
            # The email's row: sent or failed already. A redelivery may follow a crash that
            # lost its outcome event: published again, after the claim's transaction.
            if redelivered:
                await self._republish_outcome(job)
            return EmailOutcome.DONE
        try:
            try:
                await self.pool.send(job.relay, job.message, job.sender, job.email.recipients)
            finally:
                # The relay is done with it: its bookkeeping (the store, the event) must not
                # hold the relay's turn, which another email can use at once.
                turn.release()
        except SmtpPermanentError as exc:
            return await self._finish(job, "failed", str(exc), permanent=True)
        except SmtpTransientError as exc:
            attempts = job.email.attempts + 1
            if attempts > len(self.settings.retry_delays):
                return await self._finish(job, "failed", str(exc), permanent=False)
            await self._record(job.email, "pending", attempts, str(exc))
            self.metrics.email_processed("retried")
            retry = DeliveryJob(
                email_id=job.email.id, owner_id=job.email.owner_id, domain=job.email.domain
            )
            await self.broker.publish_delivery(
                retry.dump(), delay=self.settings.retry_delays[attempts - 1]
            )
            return EmailOutcome.RETRY
        return await self._finish(job, "sent", None, permanent=False)

    async def _claim(
        self, email_id: str, holders: list[str]
    ) -> Job | Unclaimed | EmailOutcome | Row[Any]:
        """Takes the email for sending, or says why not (`done`, `busy`, `missing`, or
        `saturated`: its relay, shared with another domain, has no free connection); the
        email's row when it was sent or failed before; FAILED when it cannot be composed."""
        # Each try leases from its own start: a retry's lease is as long as the first one's.
        claimed = await self._claims.submit(_Claim(email_id, datetime.now(UTC), holders))
        if not isinstance(claimed, _Taken):
            return claimed
        email, relay = claimed.email, claimed.relay
        if relay is None:
            return await self._finish_without_job(email, f"no email settings for {email.domain}")
        if email.seq is not None and email.hit_seq is None:
            return await self._finish_without_job(email, "the hit was pruned before it was sent")
        # The ticket's Message-ID is fixed when it is created (NULL only on a ticket older than the
        # column whose first email is gone); its channel may have moved to another domain since.
        thread_domain = email.thread_domain or email.domain
        prefix = email.subject_prefix
        common = {
            "sid": email.sid,
            "sender": email.sender,
            "recipients": email.recipients,
            "subject_prefix": prefix if prefix is not None else f"[{email.channel}]",
            "title": email.title,
        }
        try:
            if email.seq is None:
                message_id = ticket_message_id(email.sid, thread_domain)
                message = ticket_email(
                    **common,
                    domain=thread_domain,
                    body=email.ticket_body,
                    severity=email.severity,
                    created_at=email.ticket_created_at,
                )
            else:
                message_id = hit_message_id(email.sid, email.hit_seq, email.domain)
                message = hit_email(
                    **common,
                    domain=email.domain,
                    thread_domain=thread_domain,
                    seq=email.hit_seq,
                    summary=email.hit_summary,
                    body=email.hit_body,
                    created_at=email.hit_created_at,
                )
            envelope_sender = split_mailbox(email.sender).address
        except ValueError as exc:
            # Text stored before today's rules (a `from` they refuse, a line break in a title):
            # sending it could not be right, and retrying would not change it.
            return await self._finish_without_job(email, f"the email cannot be composed: {exc}")
        return Job(email, relay, envelope_sender, message_id, message)

    async def _claim_all(self, claims: list[_Claim]) -> list[_Claimed | Exception]:
        """Claims these emails (see _claim): a statement to read them all, one to take the leases
        of those to send now. They need no transaction together: the lease is taken by the second
        one's own reading of the emails (pending, not leased), which also gives their attempts
        as they are then (another worker may have recorded one since the first one read).

        The leases are taken in a name of this try's own. When the try fails, its UPDATE may have
        committed all the same (its answer lost): the name goes to each of its claims, whose next
        try takes its email again in it, rather than leaving it, leased by no one it knows, for a
        minute. No other claim, in this worker or another, knows the name, and the name of a try
        that did not fail goes to none: its emails are being sent."""
        now = max(claim.now for claim in claims)
        holder = secrets.token_urlsafe(12)
        # Names of failed tries only, whose claims all failed with them: an email leased in one
        # of them has no sender, and whichever claim takes it first renames it.
        earlier = {name for claim in claims for name in claim.holders}
        found: list[_Claimed | Exception] = []
        try:
            async with self.store.statements(urgent=True) as conn:
                rows = await emails.to_send(conn, {claim.email_id for claim in claims})
                wanted: set[str] = set()
                for claim in claims:
                    if claim.email_id in wanted:
                        # Twice in one batch (a parked copy and its redelivered original): the
                        # first one sends it.
                        found.append("busy")
                        continue
                    outcome = self._claimable(rows.get(claim.email_id))
                    if isinstance(outcome, _Taken):
                        wanted.add(claim.email_id)
                    found.append(outcome)
                taken = await emails.claim(conn, wanted, now, LEASE, holder, earlier)
        except BaseException:
            for claim in claims:
                claim.holders.append(holder)
            raise
        for index, outcome in enumerate(found):
            if not isinstance(outcome, _Taken):
                continue
            now_taken = taken.get(outcome.email.id)
            if now_taken is None:
                # Pending (a sent or failed one is not taken) but leased already by another
                # worker, which is sending it or died doing so.
                found[index] = "busy"
                continue
            found[index] = _Taken(emails.as_taken(outcome.email, now_taken), outcome.relay)
        return found

    def _claimable(self, email: Row[Any] | None) -> _Claimed | Exception:
        """What a claim of `email`, as read, finds: the email to take, else why not."""
        if email is None:
            return "missing"
        if email.status in ("sent", "failed"):
            return email
        relay = None
        if email.settings_id is not None:
            try:
                password = (
                    self.keyring.decrypt(email.auth_pass_enc) if email.auth_pass_enc else None
                )
                relay = relay_of(email, password, self.settings.relay_allow)
            except Exception as exc:  # noqa: BLE001 - this email's failure, not its batch's
                return exc
            # The lease is taken only once a connection is there to send it with.
            if not self.pool.has_free_connection(relay):
                return "saturated"
        return _Taken(email, relay)

    async def _record(self, email: Row[Any], status: str, attempts: int, error: str | None) -> None:
        """Writes the email's state, mirrored on its ticket's `delivery`, and frees its lease;
        with those of the other emails sent meanwhile, at once (emails.record)."""
        written = emails.State(email, status, attempts, error)

        async def write() -> None:
            # A batch that lost a race for a ticket's row (a deadlock) is written again.
            for tries_left in reversed(range(RECORD_RETRIES)):
                try:
                    return await self._records.submit(written)
                except ConcurrentWrite:
                    if not tries_left:
                        raise

        await STORE_RETRY.run(write)

    async def _record_all(self, writes: list[emails.State]) -> list[None]:
        # By ticket, each one's in the order they came: two batches never wait on each other's
        # tickets in opposite orders, and a ticket mirrors its latest email.
        ordered = sorted(writes, key=lambda written: written.email.sid)
        async with self.store.statements(urgent=True) as conn:
            await emails.record(conn, ordered, datetime.now(UTC))
        return [None] * len(writes)

    async def _finish(
        self, job: Job, status: Literal["sent", "failed"], error: str | None, *, permanent: bool
    ) -> EmailOutcome:
        email = job.email
        attempts = email.attempts + 1
        await self._record(email, status, attempts, error)
        self.metrics.email_processed(status, email.created_at)
        updated = email._asdict() | {"status": status, "attempts": attempts, "last_error": error}
        await self._publish_outcome(updated, job.message_id, permanent=permanent)
        return EmailOutcome(status)

    async def _finish_without_job(self, email: Row[Any], error: str) -> EmailOutcome:
        """An email that cannot be composed (its domain lost its settings, or text stored before
        today's rules breaks them): failed for good."""
        await self._record(email, "failed", email.attempts, error)
        self.metrics.email_processed("failed")
        updated = email._asdict() | {"status": "failed", "last_error": error}
        await self._publish_outcome(updated, None, permanent=True)
        return EmailOutcome.FAILED

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
