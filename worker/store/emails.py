"""Emails to send: one row per email a ticket or hit causes; claimed under a lease to send."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store import tickets
from worker.store.tables import channels, email_settings, emails, hits
from worker.store.tables import tickets as tickets_table

# Built once, with bound parameters: one per ticket.new or emailed hit.new.
_NEW_EMAIL = emails.insert()
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
    .where(emails.c.id == bindparam("email_id"))
)
_CLAIM = (
    update(emails)
    .where(
        emails.c.id == bindparam("email_id"),
        # Read by the UPDATE itself: another job for the same email (a parked copy and its
        # redelivered original) may have sent it since it was read, and a sent email's lease
        # is free.
        emails.c.status == "pending",
        or_(emails.c.lease_until.is_(None), emails.c.lease_until < bindparam("now")),
    )
    .values(lease_until=bindparam("lease_until"))
)
_RECORD = (
    update(emails)
    .where(emails.c.id == bindparam("email_id"))
    .values(
        {key: bindparam(f"new_{key}") for key in ("status", "attempts", "last_error")}
        | {"lease_until": None, "updated_at": bindparam("now")}
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
) -> None:
    """A pending email of a ticket (`seq` None) or of one of its hits."""
    await conn.execute(
        _NEW_EMAIL,
        {
            "id": email_id,
            "owner_id": owner_id,
            "sid": sid,
            "seq": seq,
            "domain": domain,
            "recipients": recipients,
            "status": "pending",
            "attempts": 0,
            "lease_until": None,
            "last_error": None,
            "created_at": now,
            "updated_at": now,
        },
    )
    if seq is None:
        return
    await tickets.delivery_pending(conn, sid)


async def get_many(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The emails among `ids`, by id (the missing ones are not in it)."""
    return {row.id: row for row in await conn.execute(_BY_IDS, {"ids": list(ids)})}


async def claim(
    conn: AsyncConnection, ids: Sequence[str], now: datetime, lease: timedelta
) -> set[str]:
    """Takes a lease of `lease` on every email among `ids` that is pending and not leased;
    returns the ids it took."""
    query = (
        update(emails)
        .where(
            emails.c.id.in_(list(ids)),
            # Read by the UPDATE itself: another job for the same email (a parked copy and its
            # redelivered original) may have sent it since it was read, and a sent email's lease
            # is free.
            emails.c.status == "pending",
            or_(emails.c.lease_until.is_(None), emails.c.lease_until < now),
        )
        .values(lease_until=now + lease)
        .returning(emails.c.id)
    )
    return set(await conn.scalars(query))


async def to_send(conn: AsyncConnection, email_id: str) -> Row[Any] | None:
    """The email with all its send needs, in one statement: its columns, and the ticket's
    (`channel`, `title`, `ticket_body`, `severity`, `ticket_created_at`, `thread_domain`), the
    domain's settings (`settings_id`, `sender`, `options`, `auth_pass_enc`; None when gone), the
    channel's `subject_prefix` (None when gone) and the hit's (`hit_seq`, `hit_summary`,
    `hit_body`, `hit_created_at`; None for a ticket's email or a pruned hit)."""
    return (await conn.execute(_TO_SEND, {"email_id": email_id})).first()


async def claim_one(conn: AsyncConnection, email_id: str, now: datetime, lease: timedelta) -> bool:
    """Takes a lease of `lease` on the email if it is pending and not leased."""
    params = {"email_id": email_id, "now": now, "lease_until": now + lease}
    return (await conn.execute(_CLAIM, params)).rowcount == 1


async def statuses(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.execute(select(emails.c.id, emails.c.status).where(emails.c.id.in_(ids)))
    return {row.id: row.status for row in rows}


async def record(
    conn: AsyncConnection,
    email: Row[Any],
    status: str,
    attempts: int,
    error: str | None,
    now: datetime,
) -> None:
    """Writes the email's state, mirrored on its ticket's `delivery`, and frees its lease."""
    params = {"new_status": status, "new_attempts": attempts, "new_last_error": error, "now": now}
    await conn.execute(_RECORD, {"email_id": email.id, **params})
    await tickets.set_delivery(conn, email.sid, status, attempts, error)
