"""Constrained field types shared by the message models."""

from __future__ import annotations

import re
from email.utils import parseaddr
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints

# Every character `str.splitlines()` breaks on. A header value holding one of them could smuggle
# a second header into an email, so such text is refused wherever it can reach a header.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Pragmatic address syntax: dot-atom local part, and a domain of at least two DNS labels.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})+"
_ADDRESS = re.compile(rf"{_LOCAL}@{_DOMAIN}")
_DOMAIN_NAME = re.compile(_DOMAIN)


def _no_line_break(value: str) -> str:
    if any(ch in LINE_BREAKS for ch in value):
        raise ValueError("must not contain a line break")
    return value


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _email_address(value: str) -> str:
    if len(value) > 254 or not _ADDRESS.fullmatch(value) or len(value.partition("@")[0]) > 64:
        raise ValueError("value is not a valid email address")
    return value


def _mailbox(value: str) -> str:
    """An address, optionally with a display name: `Alerts <alerts@example.com>`."""
    _no_control(value)
    _, address = parseaddr(value)
    if not address:
        raise ValueError("value is not a valid email address")
    _email_address(address)
    return value


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
OneLine = Annotated[str, AfterValidator(_no_line_break)]
Title = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_control)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_no_control)]
Positive = Annotated[int, Field(ge=1, le=2**53)]
