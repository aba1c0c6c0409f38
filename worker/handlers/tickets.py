"""Ticket and hit commands (contract section 7): the status machine, dedup, quotas, email jobs.

    unacknowledged <--ack/unack--> acknowledged
           \\                          /
            `------- close -------> closed  (final: refuses hits, acks and unacks)

Every email a command causes is counted against its SMTP user's limits, once per recipient,
in the same transaction that stores the ticket or hit and its email job; the check and the count
are one conditional UPDATE, so concurrent workers can never pass a limit together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_json

from schemas import tickets as t
from schemas._types import distinct_addresses
from worker.errors import Conflict, NotFound, QuotaExceeded
from worker.handlers.base import Context, Router
from worker.security import new_id
from worker.store import Row, channels, emails, tickets, users

router = Router()

# --- shared steps -------------------------------------------------------------------------------


def ticket_out(row: Any) -> t.Ticket:
    """The ticket object of a stored ticket: its columns by name (the model ignores the others),
    and its latest email's state as `delivery`."""
    delivery = t.Delivery(
        status=row.delivery_status,
        attempts=row.delivery_attempts,
        last_error=row.delivery_last_error,
    )
    return t.Ticket.model_validate({**row._mapping, "delivery": delivery})


async def _own_tickets(ctx: Context, sids: list[str]) -> dict[str, Row[Any]]:
    """The owner's tickets among `sids`; NotFound naming every one that is missing."""
    wanted = list(dict.fromkeys(sids))
    found = await tickets.own(ctx.conn, ctx.owner_id, wanted)
    missing = [sid for sid in wanted if sid not in found]
    if missing:
        raise NotFound("ticket", missing)
    return found


async def _consume_quota(ctx: Context, count: int) -> None:
    """Counts `count` emails against the sender's limits, or refuses with QuotaExceeded."""
    name = ctx.principal.user
    assert name is not None
    hour = int(ctx.now.timestamp()) // 3600
    if await users.count_emails(ctx.conn, name, count, hour):
        return
    user = await users.get(ctx.conn, name)
    if user.total_sent + count > user.total_limit:
        details = {
            "limit": "total",
            "max": user.total_limit,
            "used": user.total_sent,
            "resets_at": None,
        }
    else:
        used = user.hourly_sent if user.sent_hour == hour else 0
        resets_at = datetime.fromtimestamp((hour + 1) * 3600, UTC)
        details = {
            "limit": "hourly",
            "max": user.hourly_limit,
            "used": used,
            "resets_at": resets_at.isoformat().replace("+00:00", "Z"),
        }
    raise QuotaExceeded(
        f"sending {count} emails would pass the {details['limit']} limit of {details['max']}",
        details,
    )


async def _queue_email(
    ctx: Context,
    sid: str,
    seq: int | None,
    domain: str,
    recipients: list[str],
    *,
    new_ticket: dict[str, Any] | None = None,
) -> None:
    """Stores the email's job (published after commit) and counts it against the quota; with
    `new_ticket`, the ticket it is the first email of, stored with it."""
    # Channels put before recipients were de-duplicated may still list one address twice.
    recipients = distinct_addresses(recipients)

    async def count() -> None:
        await _consume_quota(ctx, len(recipients))

    ctx.run_last(count)
    email_id = new_id()
    await emails.add(
        ctx.conn,
        email_id=email_id,
        owner_id=ctx.owner_id,
        sid=sid,
        seq=seq,
        domain=domain,
        recipients=recipients,
        now=ctx.now,
        ticket=new_ticket,
    )
    ctx.deliver(email_id, domain)


async def _channel_with_settings(ctx: Context, name: str) -> Row[Any]:
    """The owner's channel, whose domain must still have the owner's email settings."""
    channel = await channels.with_settings(ctx.conn, ctx.owner_id, name)
    if channel is None:
        raise NotFound("channel", [name])
    if channel.settings_id is None:
        raise NotFound("email settings", [channel.domain])
    return channel


async def _append_hit(ctx: Context, ticket: Row[Any], summary: str, body: str | None) -> int:
    """Appends a hit to an open ticket, and emails it unless the ticket is acknowledged."""
    seq = await tickets.add_hit(ctx.conn, ticket.sid, summary, body, ctx.now)
    if ticket.status != "acknowledged":
        channel = await _channel_with_settings(ctx, ticket.channel)
        await _queue_email(ctx, ticket.sid, seq, channel.domain, channel.recipients)
    ctx.emit("hit.created", {"sid": ticket.sid, "seq": seq, "summary": summary})
    return seq


# --- tickets ------------------------------------------------------------------------------------


@router.command("ticket.new", "user")
async def new_ticket(ctx: Context, data: t.TicketNew) -> t.TicketCreated:
    channel = await _channel_with_settings(ctx, data.channel)
    new = data.ticket
    if new.dedup_key is not None:
        open_ticket = await tickets.open_by_dedup_key(
            ctx.conn, ctx.owner_id, data.channel, new.dedup_key
        )
        if open_ticket is not None:
            await _append_hit(ctx, open_ticket, new.title, new.body)
            return t.TicketCreated(sid=open_ticket.sid, created=False)
    sid = new_id()
    values = {
        "sid": sid,
        "owner_id": ctx.owner_id,
        "channel": data.channel,
        "title": new.title,
        "body": new.body,
        "severity": new.severity,
        "dedup_key": new.dedup_key,
        "status": "unacknowledged",
        "created_at": ctx.now,
        "updated_at": ctx.now,
        "closed_at": None,
        "comment": None,
        "hit_count": 0,
        "last_hit_at": None,
        "created_by": ctx.principal.user,
        "delivery_status": "pending",
        "delivery_attempts": 0,
        "delivery_last_error": None,
        # The domain of the ticket's Message-ID: its hits thread under it wherever they are sent.
        "thread_domain": channel.domain,
    }
    # The unique index on open dedup keys turns a concurrent twin into a retry that folds.
    await _queue_email(ctx, sid, None, channel.domain, channel.recipients, new_ticket=values)
    ctx.emit(
        "ticket.created",
        {"sid": sid, "channel": data.channel, "title": new.title, "severity": new.severity},
    )
    return t.TicketCreated(sid=sid, created=True)


@router.command("ticket.get", "user")
async def get_ticket(ctx: Context, data: t.TicketRef) -> t.TicketOne:
    found = await _own_tickets(ctx, [data.sid])
    return t.TicketOne(ticket=ticket_out(found[data.sid]))


@router.command("ticket.get_many", "user")
async def get_tickets(ctx: Context, data: t.TicketRefs) -> t.TicketMany:
    found = await _own_tickets(ctx, data.sids)
    return t.TicketMany(tickets=[ticket_out(found[sid]) for sid in data.sids])


async def _close(ctx: Context, sids: list[str], comment: str | None) -> t.Done:
    found = await _own_tickets(ctx, sids)
    closing = [sid for sid, row in found.items() if row.status != "closed"]
    if closing:
        await tickets.close(ctx.conn, closing, comment, ctx.now)
    for sid in closing:
        ctx.emit("ticket.closed", {"sid": sid, "comment": comment})
    return t.Done()


async def _set_ack(ctx: Context, sids: list[str], status: str, event: str) -> t.Done:
    found = await _own_tickets(ctx, sids)
    closed = [sid for sid, row in found.items() if row.status == "closed"]
    if closed:
        raise Conflict("closed tickets cannot change status", {"closed": closed})
    changing = [sid for sid, row in found.items() if row.status != status]
    if changing:
        await tickets.set_status(ctx.conn, changing, status, ctx.now)
    for sid in changing:
        ctx.emit(event, {"sid": sid})
    return t.Done()


def _sids(data: t.TicketRef | t.TicketClose | t.TicketRefs | t.TicketCloseMany) -> list[str]:
    """The tickets a command names: one (`sid`), or a batch (`sids`)."""
    return [data.sid] if isinstance(data, t.TicketRef | t.TicketClose) else data.sids


@router.command("ticket.close", "user")
@router.command("ticket.close_many", "user")
async def close_tickets(ctx: Context, data: t.TicketClose | t.TicketCloseMany) -> t.Done:
    return await _close(ctx, _sids(data), data.comment)


@router.command("ticket.ack", "user")
@router.command("ticket.ack_many", "user")
async def ack_tickets(ctx: Context, data: t.TicketRef | t.TicketRefs) -> t.Done:
    return await _set_ack(ctx, _sids(data), "acknowledged", "ticket.acked")


@router.command("ticket.unack", "user")
@router.command("ticket.unack_many", "user")
async def unack_tickets(ctx: Context, data: t.TicketRef | t.TicketRefs) -> t.Done:
    return await _set_ack(ctx, _sids(data), "unacknowledged", "ticket.unacked")


# --- hits ---------------------------------------------------------------------------------------


@router.command("hit.new", "user")
async def new_hit(ctx: Context, data: t.HitNew) -> t.HitCreated:
    ticket = (await _own_tickets(ctx, [data.sid]))[data.sid]
    if ticket.status == "closed":
        raise Conflict("the ticket is closed")
    seq = await _append_hit(ctx, ticket, data.hit.summary, data.hit.body)
    return t.HitCreated(seq=seq)


# A hit.list reply is at most 1 MiB: its hits, and room for the envelope around them (status,
# type, a command_id of up to 255 bytes escaped six-fold, next_after_seq).
PAGE_BYTES = 1024 * 1024
_ENVELOPE_BYTES = 4096
# Bytes of a hit's JSON besides its summary and body, at least: `{"seq":1,"summary":"",
# "body":"","created_at":"2024-01-01T00:00:00Z"}` and a comma.
_HIT_OVERHEAD = 64


@router.command("hit.list", "user")
async def list_hits(ctx: Context, data: t.HitList) -> t.HitPage:
    """One page of hits: at most `limit` of them, and at most PAGE_BYTES of reply.

    The sizes come first (two integers a row; PostgreSQL knows a stored text's length without
    reading it), so only the rows that can fit are read. Their bytes in the page's JSON are at
    least their UTF-8 bytes (escapes only add), so the rows read are measured and the page ends
    where the real size would pass the budget; it always holds one hit when any remain.
    """
    await _own_tickets(ctx, [data.sid])
    sizes = await tickets.hit_sizes(ctx.conn, data.sid, data.after_seq, data.limit + 1)
    budget = PAGE_BYTES - _ENVELOPE_BYTES - len("[]")
    fitting, estimate = 0, 0
    for row in sizes[: data.limit]:
        estimate += row.size + _HIT_OVERHEAD
        if fitting and estimate > budget:
            break
        fitting += 1
    if not fitting:
        return t.HitPage(hits=[], next_after_seq=None)
    last = sizes[fitting - 1].seq
    page: list[t.Hit] = []
    used = 0
    for row in await tickets.hits_between(ctx.conn, data.sid, data.after_seq, last):
        hit = t.Hit(seq=row.seq, summary=row.summary, body=row.body, created_at=row.created_at)
        used += len(to_json(hit)) + (1 if page else 0)
        if page and used > budget:
            break
        page.append(hit)
    more = len(page) < len(sizes)
    # `last`, should concurrent pruning have taken every hit this page was to hold.
    return t.HitPage(hits=page, next_after_seq=(page[-1].seq if page else last) if more else None)
