"""The emails of the contract (section 7), built with the standard library.

Pure functions, no I/O: the delivery consumer stores nothing here and sends what these return.

Every email carries `From` (exactly the domain's `from`), `To`, `Date`, a unique `Message-ID`,
`Auto-Submitted: auto-generated` and `X-Ticket-SID`. A ticket's email has the Message-ID
`<SID@DOMAIN>`; each hit's email has its own Message-ID and points `In-Reply-To` and `References`
at the ticket's, so mail clients thread them.
"""

from __future__ import annotations

import email.policy
import email.utils
from datetime import UTC, datetime
from email.message import EmailMessage

__all__ = [
    "has_line_break",
    "hit_email",
    "hit_message_id",
    "ticket_email",
    "ticket_message_id",
]

# Every character `str.splitlines()` splits on. A header value holding any of them could end the
# header early in some reader along the way, so none may reach a header (header injection).
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def has_line_break(text: str) -> bool:
    """True when `text` holds a character that `str.splitlines()` treats as a line boundary."""
    return not _LINE_BREAKS.isdisjoint(text)


def ticket_message_id(sid: str, domain: str) -> str:
    """The Message-ID of a ticket's email, `<SID@DOMAIN>`; its hits' emails refer to it."""
    return f"<{sid}@{_id_domain(domain)}>"


def hit_message_id(sid: str, seq: int, domain: str) -> str:
    """The Message-ID of the email for hit `seq` of a ticket, unique per hit."""
    return f"<{sid}.h{seq}@{_id_domain(domain)}>"


def ticket_email(
    *,
    sid: str,
    domain: str,
    sender: str,
    recipients: list[str],
    subject_prefix: str,
    title: str,
    body: str,
    severity: str,
    created_at: datetime,
) -> EmailMessage:
    """The email announcing a new ticket."""
    message = _common(
        sid=sid,
        sender=sender,
        recipients=recipients,
        subject=_subject(subject_prefix, title),
        message_id=ticket_message_id(sid, domain),
        created_at=created_at,
    )
    message.set_content(
        f"{body}\n\nSeverity: {severity}\nTicket: {sid}\n",
        charset="utf-8",
    )
    return message


def hit_email(
    *,
    sid: str,
    seq: int,
    domain: str,
    sender: str,
    recipients: list[str],
    subject_prefix: str,
    title: str,
    summary: str,
    body: str | None,
    created_at: datetime,
) -> EmailMessage:
    """The email for a new occurrence (hit) of a ticket, threaded under the ticket's email."""
    parent = ticket_message_id(sid, domain)
    message = _common(
        sid=sid,
        sender=sender,
        recipients=recipients,
        subject="Re: " + _subject(subject_prefix, title),
        message_id=hit_message_id(sid, seq, domain),
        created_at=created_at,
    )
    message["In-Reply-To"] = parent
    message["References"] = parent
    message["X-Ticket-Hit-Seq"] = str(seq)
    text = f"{summary}\n\n"
    if body:
        text += f"{body}\n\n"
    text += f"Ticket: {sid}\nHit: {seq}\n"
    message.set_content(text, charset="utf-8")
    return message


def _common(
    *,
    sid: str,
    sender: str,
    recipients: list[str],
    subject: str,
    message_id: str,
    created_at: datetime,
) -> EmailMessage:
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    _refuse_line_breaks(sid, sender, subject, message_id, *recipients)
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = email.utils.format_datetime(_aware(created_at))
    message["Message-ID"] = message_id
    # RFC 3834: tells auto-responders (vacation replies) not to answer.
    message["Auto-Submitted"] = "auto-generated"
    # Exchange and Outlook ignore Auto-Submitted and read this one instead.
    message["X-Auto-Response-Suppress"] = "All"
    message["X-Ticket-SID"] = sid
    return message


def _subject(prefix: str, title: str) -> str:
    return f"{prefix} {title}" if prefix else title


def _id_domain(domain: str) -> str:
    # A Message-ID is ASCII (RFC 5322 msg-id); an internationalised domain goes in as its A-label.
    _refuse_line_breaks(domain)
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def _aware(moment: datetime) -> datetime:
    # The store may hand back naive datetimes (SQLite keeps no offset); they are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _refuse_line_breaks(*values: str) -> None:
    # Second line of defence: the schemas refuse these first, this keeps a header from ever
    # being split in two should a value slip past them.
    for value in values:
        if has_line_break(value):
            raise ValueError(f"header value contains a line break: {value!r}")
