"""Constrained field types shared by the message models."""

from __future__ import annotations

import re
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, Field, StringConstraints

# Contract section 5. Text that reaches a header refuses control characters (C0, DEL, C1), the
# Unicode line and paragraph separators, and the bidirectional embeddings, overrides and isolates,
# which make a subject or a sender's name read other than it is ("Trojan Source").
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Text that reaches only a body refuses the control characters and bidirectional controls, but
# for TAB, LF and CR; the line and paragraph separators (U+2028, U+2029), line breaks and no
# control characters, it keeps: the body goes out in base64, where no line break can do harm.
_BODY_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Pragmatic address syntax: dot-atom local part, and a domain of at least two DNS labels.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_ADDRESS = re.compile(rf"{_LOCAL}@{_DOMAIN}")
_DOMAIN_NAME = re.compile(_DOMAIN)

# `Name <address>` or `"Name" <address>`; the quoted name may hold quoted pairs (`\"`).
_NAME_ADDR = re.compile(
    r' *(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<phrase>[^"<>]*?)) *<(?P<address>[^<>]*)> *'
)
# An unquoted display name is words (RFC 5322 atext, and UTF-8 as RFC 6532 allows) and dots; any
# other special (`,` `;` `:` `(` `\` ...) would make a reader see a list, a group or a comment.
_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~. \x80-\U0010ffff-]*")


def _unsafe(pattern: re.Pattern[str], value: str) -> str:
    found = pattern.search(value)
    if found is not None:
        code = ord(found.group())
        raise ValueError(f"must not contain the control or bidirectional character U+{code:04X}")
    return value


def _header_text(value: str) -> str:
    return _unsafe(_HEADER_UNSAFE, value)


def _body_text(value: str) -> str:
    return _unsafe(_BODY_UNSAFE, value)


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _email_address(value: str) -> str:
    if len(value) > 254 or not _ADDRESS.fullmatch(value) or len(value.partition("@")[0]) > 64:
        raise ValueError("value is not a valid email address")
    return value


class MailboxParts(NamedTuple):
    """A `from` taken apart. `display_name` is None for a bare address, "" for `<address>`;
    `quoted` says it was written in quotes."""

    display_name: str | None
    address: str
    quoted: bool = False


def split_mailbox(value: str) -> MailboxParts:
    """One address, optionally with a display name that holds no `@`, `<` or `>` (contract 6).

    `alerts@example.com`, `Alerts <alerts@example.com>`, `"Alerts, Ops" <alerts@example.com>`.
    Raises ValueError for anything else: two addresses, a name that holds an address, controls.
    """
    _header_text(value)
    text = value.strip(" ")
    if not text.endswith(">"):
        try:
            return MailboxParts(None, _email_address(text))
        except ValueError:
            raise ValueError(
                "must be one email address, optionally with a display name: Name <address>"
            ) from None
    match = _NAME_ADDR.fullmatch(text)
    if match is None:
        raise ValueError(
            "must be one email address, optionally with a display name: Name <address>"
        )
    address = _email_address(match["address"])
    if match["quoted"] is not None:
        name = re.sub(r"\\(.)", r"\1", match["quoted"])
    else:
        name = match["phrase"]
    if any(char in name for char in "@<>"):
        raise ValueError("the display name must not hold @, < or >")
    if match["quoted"] is None and not _PHRASE.fullmatch(name):
        raise ValueError('a display name holding , ; : ( ) [ ] or \\ must be in "quotes"')
    if "  " in name and ("=?" in name or not name.isascii()):
        # Such a name goes in an RFC 2047 encoded word, and Python's reader, for one, shows a run
        # of spaces in a display name's encoded word as one space: it would not read as written.
        raise ValueError(
            "a display name with non-ASCII characters or =? must not hold two spaces in a row"
        )
    return MailboxParts(name, address, match["quoted"] is not None)


def _mailbox(value: str) -> str:
    split_mailbox(value)
    return value


def in_domain(address: str, domain: str) -> bool:
    """True when `address` is at `domain` or at a subdomain of it, in any case."""
    host = address.rpartition("@")[2].lower()
    domain = domain.lower()
    return host == domain or host.endswith("." + domain)


def distinct_addresses(addresses: list[str]) -> list[str]:
    """`addresses` without those that differ from an earlier one only in case (contract 6)."""
    first: dict[str, str] = {}
    for address in addresses:
        first.setdefault(address.lower(), address)
    return list(first.values())


def _domain_name(value: str) -> str:
    value = value.lower()
    if len(value) > 253 or not _DOMAIN_NAME.fullmatch(value):
        raise ValueError("value is not a valid domain name")
    return value


EmailAddress = Annotated[str, AfterValidator(_email_address)]
Mailbox = Annotated[str, StringConstraints(min_length=3, max_length=320), AfterValidator(_mailbox)]
DomainName = Annotated[str, AfterValidator(_domain_name)]
HostName = Annotated[
    str, StringConstraints(min_length=1, max_length=253), AfterValidator(_no_control)
]
# Text that reaches an email header: no control or bidirectional characters at all.
HeaderText = AfterValidator(_header_text)
# Text that reaches only an email body (or none): TAB and line breaks allowed.
BodyText = AfterValidator(_body_text)
Title = Annotated[
    str, StringConstraints(min_length=1, max_length=200), AfterValidator(_header_text)
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_control)]
# Every integer of a command lies in 0..2**53 - 1 unless its field says otherwise (contract
# section 3): the integers a JSON parser of any language reads exactly, and that every store
# column holds.
MAX_INT = 2**53 - 1
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Positive = Annotated[int, Field(ge=1, le=MAX_INT)]
