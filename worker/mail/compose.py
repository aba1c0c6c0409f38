"""The emails of the contract (section 7), written byte for byte.

Pure functions, no I/O: the delivery consumer sends the bytes these return. Every email has
exactly these headers, in this order (the bracketed ones on a hit's email only):

    From, To, Subject, Date, Message-ID, [In-Reply-To, References,] Auto-Submitted,
    X-Ticket-SID, [X-Ticket-Hit-Seq,] MIME-Version, Content-Type, Content-Transfer-Encoding

and one text/plain UTF-8 body in base64. A ticket's email has the Message-ID `<SID@DOMAIN>`; each
hit's email has its own and points `In-Reply-To` and `References` at the ticket's.

Text a tenant controls never changes an email's structure (contract section 5). The `email`
package does not write these: given a header value, it decodes the RFC 2047 encoded words in it,
so a title `=?utf-8?q?=0D=0ABcc:_x@evil.example?=` came out as a real Bcc header. Here a value
goes out as written only when it is plain printable ASCII without `=?`; anything else becomes
encoded words of our own (base64 of UTF-8), which a reader decodes once, into text. The body is
base64 too, so no line of it can be read as a header or a MIME boundary.
"""

from __future__ import annotations

import base64
import email.utils
import re
from datetime import UTC, datetime

from schemas._types import split_mailbox

__all__ = [
    "has_line_break",
    "hit_email",
    "hit_message_id",
    "ticket_email",
    "ticket_message_id",
]

# Every character `str.splitlines()` splits on. No header value may hold one, even encoded: a
# reader would show a header of two lines.
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
# RFC 5322 2.1.1: lines SHOULD stay within 78 characters, and MUST within 998.
_FOLD_AT = 78
_MAX_LINE = 998
# 39 bytes of UTF-8 are 52 base64 characters, a 64-character encoded word (RFC 2047 allows 75):
# `Subject: ` and one of them fit in 78.
_EW_BYTES = 39
# Printable ASCII words separated by single spaces: what every reader shows exactly as written.
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")
# A display name that needs no quotes: RFC 5322 atext words separated by single spaces.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# What we write ourselves (SIDs, Message-IDs, addresses): printable ASCII without spaces.
_TOKEN = re.compile(r"[!-~]+")
_MIME = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
)


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
) -> bytes:
    """The email announcing a new ticket: its Message-ID is `<SID@DOMAIN>`."""
    head = _head(
        sender=sender,
        recipients=recipients,
        subject=_subject(subject_prefix, title),
        created_at=created_at,
        message_id=ticket_message_id(sid, domain),
    )
    head += _ticket_headers(sid)
    return _email(head, f"{body}\n\nSeverity: {severity}\nTicket: {sid}\n")


def hit_email(
    *,
    sid: str,
    seq: int,
    domain: str,
    thread_domain: str,
    sender: str,
    recipients: list[str],
    subject_prefix: str,
    title: str,
    summary: str,
    body: str | None,
    created_at: datetime,
) -> bytes:
    """The email for a new occurrence (hit) of a ticket, threaded under the ticket's email.

    `domain` is the channel's domain now, `thread_domain` the one of the ticket's Message-ID,
    fixed when the ticket was created.
    """
    parent = ticket_message_id(sid, thread_domain)
    head = _head(
        sender=sender,
        recipients=recipients,
        subject="Re: " + _subject(subject_prefix, title),
        created_at=created_at,
        message_id=hit_message_id(sid, seq, domain),
    )
    head += [f"In-Reply-To: {parent}", f"References: {parent}"]
    head += _ticket_headers(sid, seq)
    text = f"{summary}\n\n"
    if body:
        text += f"{body}\n\n"
    text += f"Ticket: {sid}\nHit: {seq}\n"
    return _email(head, text)


# --- the parts ----------------------------------------------------------------------------------


def _head(
    *,
    sender: str,
    recipients: list[str],
    subject: str,
    created_at: datetime,
    message_id: str,
) -> list[str]:
    if not recipients:
        raise ValueError("an email needs at least one recipient")
    return [
        _from(sender),
        _address_list("To", recipients),
        _unstructured("Subject", subject),
        "Date: " + email.utils.format_datetime(_aware(created_at)),
        "Message-ID: " + _token(message_id),
    ]


def _ticket_headers(sid: str, seq: int | None = None) -> list[str]:
    # RFC 3834: tells auto-responders (vacation replies) not to answer.
    head = ["Auto-Submitted: auto-generated", "X-Ticket-SID: " + _token(sid)]
    if seq is not None:
        head.append(f"X-Ticket-Hit-Seq: {int(seq)}")
    return head


def _email(head: list[str], text: str) -> bytes:
    # base64 keeps the text's bytes exactly (its line ends too); encodebytes wraps at 76.
    body = base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n")
    return "\r\n".join(head).encode("ascii") + b"\r\n" + _MIME + body


def _subject(prefix: str, title: str) -> str:
    return f"{prefix} {title}" if prefix else title


def _from(sender: str) -> str:
    """The From header: exactly the domain's `from`, the display name encoded when need be."""
    _refuse_line_breaks(sender)
    name, address, quoted = split_mailbox(sender)
    address = _token(address)
    if name is None:
        return f"From: {address}"
    if not name:
        return f"From: <{address}>"
    if "=?" not in name and not quoted and _ATOMS.fullmatch(name):
        phrase = name
    elif "=?" not in name and name.isascii() and name.isprintable():
        # Python's reader decodes encoded words even inside quotes, hence the "=?" test.
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        # One encoded word, longer than RFC 2047's 75 if it must: Python's reader keeps the
        # space between two encoded words of a display name, other readers drop it (as RFC 2047
        # says), so only a single word reads the same everywhere. Display names are short.
        size = (_MAX_LINE - len("From: =?utf-8?b??=")) // 4 * 3
        phrase = "\r\n ".join(_encoded_words(name, size))
    line = f"From: {phrase} <{address}>"
    if len(line) <= _FOLD_AT:
        return line
    return f"From: {phrase}\r\n <{address}>"


def _address_list(name: str, addresses: list[str]) -> str:
    lines = [f"{name}:"]
    for index, address in enumerate(addresses):
        item = " " + _token(address) + ("," if index < len(addresses) - 1 else "")
        if len(lines[-1]) + len(item) > _FOLD_AT and lines[-1] != f"{name}:":
            lines.append("")
        lines[-1] += item
    return "\r\n".join(lines)


def _unstructured(name: str, text: str) -> str:
    """`name: text`, folded, and in encoded words unless every reader shows it as written."""
    _refuse_line_breaks(text)
    if "=?" not in text and _PLAIN.fullmatch(text):
        lines = [f"{name}:"]
        for word in text.split(" "):
            if len(lines[-1]) + 1 + len(word) > _FOLD_AT and lines[-1] != f"{name}:":
                lines.append("")
            lines[-1] += " " + word
        if all(len(line) <= _FOLD_AT for line in lines):
            return "\r\n".join(lines)
    # Readers drop the folding whitespace between encoded words: the text comes back whole.
    return f"{name}: " + "\r\n ".join(_encoded_words(text, _EW_BYTES))


def _encoded_words(text: str, size: int) -> list[str]:
    """`text` as RFC 2047 encoded words of at most `size` bytes of UTF-8 each, cut between
    characters (each word must decode on its own)."""
    data = text.encode("utf-8")
    words = []
    start = 0
    while start < len(data):
        end = min(start + size, len(data))
        while end < len(data) and 0x80 <= data[end] < 0xC0:  # a UTF-8 continuation byte
            end -= 1
        words.append(f"=?utf-8?b?{base64.b64encode(data[start:end]).decode('ascii')}?=")
        start = end
    return words


def _id_domain(domain: str) -> str:
    # A Message-ID is ASCII (RFC 5322 msg-id); an internationalised domain goes in as its A-label.
    _refuse_line_breaks(domain)
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def _aware(moment: datetime) -> datetime:
    # The store may hand back naive datetimes (SQLite keeps no offset); they are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _token(value: str) -> str:
    """A value we write as is (a SID, a Message-ID, an address): printable ASCII, no spaces."""
    _refuse_line_breaks(value)
    if not _TOKEN.fullmatch(value):
        raise ValueError("a SID, Message-ID or address must be printable ASCII without spaces")
    return value


def _refuse_line_breaks(value: str) -> None:
    # Second line of defence: the schemas refuse these first, and no reader may ever see a
    # header value of two lines, however it was written.
    if has_line_break(value):
        raise ValueError("a header value holds a line break")
