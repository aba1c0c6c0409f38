"""Emails to send: one row per email a ticket or hit causes; claimed under a lease to send."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store import hot, tickets
from worker.store.tables import UtcDateTime, channels, email_settings, emails, hits
from worker.store.tables import tickets as tickets_table

# Built once, with bound parameters: one per ticket.new or emailed hit.new.
_NEW_EMAIL = emails.insert()
# PostgreSQL: a new ticket and its first email in one statement, the ticket's INSERT a
# data-modifying CTE: a round trip less for each ticket.new.
_NEW_TICKET_AND_EMAIL = (
    emails.insert()
    .values({c.name: bindparam(f"email_{c.name}", type_=c.type) for c in emails.c})
    .add_cte(
        tickets_table.insert()
        .values({c.name: bindparam(f"ticket_{c.name}", type_=c.type) for c in tickets_table.c})
        .cte("new_ticket")
    )
)
_TICKET_COLUMNS = frozenset(tickets_table.c.keys())
_BY_IDS = select(emails).where(emails.c.id.in_(bindparam("ids", expanding=True)))
# Everything an email's send needs, in one round trip: the email; its ticket; the email settings
# of its domain (None when they are gone: `settings_id`); its channel's subject prefix (None
# when the channel is gone); and its hit (None for a ticket's email, or a hit pruned since).
_TO_SEND = (
    select(
        emails,
        tickets_table.c.channel,
        tickets_table.c.title,
        tickets_table.c.body.label("ticket_body"),
        tickets_table.c.severity,
        tickets_table.c.created_at.label("ticket_created_at"),
        tickets_table.c.thread_domain,
        email_settings.c.id.label("settings_id"),
        email_settings.c.sender,
        email_settings.c.options,
        email_settings.c.auth_pass_enc,
        channels.c.subject_prefix,
        hits.c.seq.label("hit_seq"),
        hits.c.summary.label("hit_summary"),
        hits.c.body.label("hit_body"),
        hits.c.created_at.label("hit_created_at"),
    )
    .select_from(emails)
    .join(tickets_table, tickets_table.c.sid == emails.c.sid)
    .outerjoin(
        email_settings,
        and_(
            email_settings.c.domain == emails.c.domain,
            email_settings.c.owner_id == emails.c.owner_id,
        ),
    )
    .outerjoin(
        channels,
        and_(channels.c.owner_id == emails.c.owner_id, channels.c.name == tickets_table.c.channel),
    )
    .outerjoin(hits, and_(hits.c.sid == emails.c.sid, hits.c.seq == emails.c.seq))
    .where(emails.c.id.in_(bindparam("ids", expanding=True)))
)
_CLAIM = (
    update(emails)
    .where(
        emails.c.id.in_(bindparam("ids", expanding=True)),
        # Read by the UPDATE itself: another job for the same email (a parked copy and its
        # redelivered original) may have sent it since it was read, and a sent email's lease
        # is free.
        emails.c.status == "pending",
        or_(
            emails.c.lease_until.is_(None),
            emails.c.lease_until < bindparam("now"),
            # A lease the claim's earlier tries took, their answers lost (a NULL holder is
            # in no list).
            emails.c.lease_holder.in_(bindparam("earlier", expanding=True)),
        ),
    )
    .values(lease_until=bindparam("lease_until"), lease_holder=bindparam("holder"))
    # The email as taken: a record by another worker may have come since it was read.
    .returning(emails.c.id, emails.c.attempts, emails.c.last_error)
)
# PostgreSQL: the emails' states and their tickets' `delivery` in one statement, which commits on
# its own (Store.statements): one round trip, where a transaction of the two statements is four.
_RECORD_ALL = text(
    """
    WITH recorded AS (
        UPDATE emails
        SET status = state.status, attempts = state.attempts, last_error = state.last_error,
            lease_until = NULL, lease_holder = NULL, updated_at = :now
        FROM unnest(
            CAST(:ids AS VARCHAR[]), CAST(:statuses AS VARCHAR[]),
            CAST(:attempts AS INTEGER[]), CAST(:errors AS TEXT[])
        ) AS state (id, status, attempts, last_error)
        WHERE emails.id = state.id
    )
    UPDATE tickets
    SET delivery_status = state.status, delivery_attempts = state.attempts,
        delivery_last_error = state.last_error
    FROM unnest(
        CAST(:sids AS VARCHAR[]), CAST(:sid_statuses AS VARCHAR[]),
        CAST(:sid_attempts AS INTEGER[]), CAST(:sid_errors AS TEXT[])
    ) AS state (sid, status, attempts, last_error)
    WHERE tickets.sid = state.sid
    """
).bindparams(bindparam("now", type_=UtcDateTime))
_RECORD = (
    update(emails)
    .where(emails.c.id == bindparam("email_id"))
    .values(
        {key: bindparam(f"new_{key}") for key in ("status", "attempts", "last_error")}
        | {"lease_until": None, "lease_holder": None, "updated_at": bindparam("now")}
    )
)


async def add(
    conn: AsyncConnection,
    *,
    email_id: str,
    owner_id: str,
    sid: str,
    seq: int | None,
    domain: str,
    recipients: list[str],
    now: datetime,
    ticket: dict[str, Any] | None = None,
) -> None:
    """A pending email of a ticket (`seq` None) or of one of its hits; with `ticket` (its values,
    as `tickets.add` takes them), the new ticket it is the first email of, stored with it: in
    one statement on PostgreSQL when every column's value is given."""
    values = {
        "id": email_id,
        "owner_id": owner_id,
        "sid": sid,
        "seq": seq,
        "domain": domain,
        "recipients": recipients,
        "status": "pending",
        "attempts": 0,
        "lease_until": None,
        "lease_holder": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
    }
    if (
        ticket is not None
        and conn.dialect.name == "postgresql"
        and ticket.keys() >= _TICKET_COLUMNS
    ):
        params = {f"email_{key}": value for key, value in values.items()}
        params |= {f"ticket_{column.name}": ticket[column.name] for column in tickets_table.c}
        await hot.rowcount(conn, _NEW_TICKET_AND_EMAIL, params)
        return
    if ticket is not None:
        await tickets.add(conn, ticket)
    await hot.rowcount(conn, _NEW_EMAIL, values)
    if seq is None:
        return
    await tickets.delivery_pending(conn, sid)


async def get_many(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The emails among `ids`, by id (the missing ones are not in it)."""
    return {row.id: row for row in await hot.rows(conn, _BY_IDS, {"ids": sorted(ids)})}


async def claim(
    conn: AsyncConnection,
    ids: Collection[str],
    now: datetime,
    lease: timedelta,
    holder: str | None = None,
    earlier: Collection[str] = (),
) -> dict[str, Row[Any]]:
    """Takes a lease of `lease`, in the name `holder`, on every email among `ids` that is
    pending and not leased, or leased in one of the names of `earlier`: the claim's own tries
    whose answers were lost (names no other claim knows); returns those it took, by id, as
    they are now (`attempts`, `last_error`)."""
    if not ids:
        return {}
    params = {
        "ids": sorted(ids),
        "now": now,
        "lease_until": now + lease,
        "holder": holder,
        # Never an empty list: no lease is in the name "".
        "earlier": sorted(earlier) or [""],
    }
    return {row.id: row for row in await hot.rows(conn, _CLAIM, params)}


def as_taken(email: Row[Any], taken: Row[Any]) -> Row[Any]:
    """The email as read (by `to_send`), with its state as `claim` took it."""
    return hot.replaced(email, attempts=taken.attempts, last_error=taken.last_error)  # type: ignore[no-any-return]


async def to_send(conn: AsyncConnection, ids: Collection[str]) -> dict[str, Row[Any]]:
    """The emails among `ids` with all their send needs, by id, in one statement: their
    columns, and the ticket's (`channel`, `title`, `ticket_body`, `severity`,
    `ticket_created_at`, `thread_domain`), the domain's settings (`settings_id`, `sender`,
    `options`, `auth_pass_enc`; None when gone), the channel's `subject_prefix` (None when gone)
    and the hit's (`hit_seq`, `hit_summary`, `hit_body`, `hit_created_at`; None for a ticket's
    email or a pruned hit)."""
    if not ids:
        return {}
    return {row.id: row for row in await hot.rows(conn, _TO_SEND, {"ids": sorted(ids)})}


@dataclass(frozen=True, slots=True)
class State:
    """An email's state to record."""

    email: Row[Any]
    status: str
    attempts: int
    error: str | None


async def record(conn: AsyncConnection, states: Sequence[State], now: datetime) -> None:
    """Writes the emails' states, mirrored on their tickets' `delivery`, and frees their leases,
    in the order given (a ticket mirrors the last of its emails given): on PostgreSQL in one
    statement, atomic on its own; on SQLite a statement for the emails and one for the tickets,
    to run in a transaction."""
    if not states:
        return
    if conn.dialect.name == "postgresql":
        # An UPDATE … FROM writes a row once, whichever of its matches: the last state of each.
        # It locks the rows in the order of its plan, not of `states`: two records of the same
        # tickets in opposite orders may deadlock, and are written again (ConcurrentWrite).
        by_email = {state.email.id: state for state in states}
        by_ticket = {state.email.sid: state for state in states}
        await hot.rowcount(
            conn,
            _RECORD_ALL,
            {
                "now": now,
                "ids": list(by_email),
                "statuses": [state.status for state in by_email.values()],
                "attempts": [state.attempts for state in by_email.values()],
                "errors": [state.error for state in by_email.values()],
                "sids": list(by_ticket),
                "sid_statuses": [state.status for state in by_ticket.values()],
                "sid_attempts": [state.attempts for state in by_ticket.values()],
                "sid_errors": [state.error for state in by_ticket.values()],
            },
        )
        return
    await hot.execute_many(
        conn,
        _RECORD,
        [
            {
                "email_id": state.email.id,
                "new_status": state.status,
                "new_attempts": state.attempts,
                "new_last_error": state.error,
                "now": now,
            }
            for state in states
        ],
    )
    await tickets.set_delivery(
        conn, [(state.email.sid, state.status, state.attempts, state.error) for state in states]
    )
