"""Hostile text for the tests of contract section 5: text never changes an email's structure.

Each list holds (text, id) pairs for `pytest.mark.parametrize`. `HEADER_SAFE` and `BODY_SAFE` are
allowed in every field they are meant for; `REFUSED_IN_HEADERS` and `REFUSED_IN_BODIES` must be
refused with ValidationError wherever they appear.
"""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage
from typing import Any

# Encoded words the `email` package would decode into line breaks and headers (it did, once),
# MIME boundaries and headers, quotes and addresses, and characters of every width.
HEADER_SAFE = [
    ("=?utf-8?q?=0D=0ABcc:_x@evil.example?=", "q-bcc"),
    ("=?utf-8?b?DQpCY2M6IHhAZXZpbC5leGFtcGxl?=", "b-bcc"),
    ("=?UTF-8?Q?=0AReply-To:_x@evil.example?=", "q-reply-to"),
    ("=?utf-8?B?DQpYLUluamVjdGVkOiAx?=", "b-x-injected"),
    ("a =?iso-8859-1?q?=0D=0AX-Injected:_1?= b", "latin1-mid-text"),
    (
        "=?utf-8?q?=0D=0AContent-Type:_text/html=0D=0A=0D=0A<b>pwned</b>?=",
        "q-html-body",
    ),
    ('"=?utf-8?q?=0D=0ABcc:_x@evil.example?="', "quoted-encoded-word"),
    ("=?utf-8?b?", "unterminated"),
    ("--boundary", "boundary"),
    ("Content-Type: multipart/mixed; boundary=x", "content-type"),
    ('"Boss" <boss@evil.example>, x@evil.example', "addresses"),
    ("Disque plein ✗ 磁盘已满 💥", "non-ascii"),
    ("  two  spaces  ", "spaces"),
    ("x" * 200, "one-long-word"),
    (" ".join(["word"] * 40), "many-words"),
    ("é" * 200, "long-non-ascii"),
]
# Bodies hold line breaks too: headers after a blank line, a MIME part, the end of SMTP DATA.
BODY_SAFE = [
    *HEADER_SAFE,
    ("line\r\n\r\nContent-Type: text/html\r\n\r\n<b>pwned</b>", "headers-after-a-blank-line"),
    ("--x\r\nContent-Type: text/html\r\n\r\n<b>pwned</b>\r\n--x--", "mime-part"),
    ("first\r\n.\r\nMAIL FROM:<x@evil.example>\r\n", "smtp-end-of-data"),
    ("tab\there\rcr\nlf\r\ncrlf", "tab-and-line-ends"),
    ("line\u2028separator\u2029paragraph", "unicode-line-and-paragraph-separators"),
]
# Contract section 5: control characters and bidirectional controls.
REFUSED_IN_BODIES = [
    ("\x00", "NUL"),
    ("\x07", "BEL"),
    ("\x1b", "ESC"),
    ("\x0b", "VT"),
    ("\x0c", "FF"),
    ("\x1c", "FS"),
    ("\x7f", "DEL"),
    ("\x85", "NEL"),
    ("\x9f", "APC"),
    ("\u202a", "LRE"),
    ("\u202e", "RLO"),
    ("\u2066", "LRI"),
    ("\u2069", "PDI"),
]
# What a body keeps, and a header refuses: TAB and line breaks. U+2028 and U+2029 are no control
# characters, but a header value may not hold a line break of any kind.
BODY_ONLY = [
    ("\t", "TAB"),
    ("\n", "LF"),
    ("\r", "CR"),
    ("\r\n", "CRLF"),
    ("\u2028", "LINE-SEPARATOR"),
    ("\u2029", "PARAGRAPH-SEPARATOR"),
]
REFUSED_IN_HEADERS = [*REFUSED_IN_BODIES, *BODY_ONLY]

TICKET_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "X-Ticket-SID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]
HIT_HEADERS = [
    *TICKET_HEADERS[:5],
    "In-Reply-To",
    "References",
    *TICKET_HEADERS[5:7],
    "X-Ticket-Hit-Seq",
    *TICKET_HEADERS[7:],
]


def read(raw: bytes) -> EmailMessage:
    """The email as a mail client reads it."""
    message = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(message: EmailMessage) -> str:
    """The text body, as a reader shows it."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def defects(message: EmailMessage) -> list[Any]:
    """Every defect the reader found, in the message and in each of its headers."""
    found = list(message.defects)
    for _, value in message.items():
        found += value.defects
    return found


def quoted(name: str) -> str:
    """`name` as an RFC 5322 quoted string, for a `from` with that display name."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
