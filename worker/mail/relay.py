"""Talking to SMTP relays: the settings probe and the connection pool.

Every aiosmtplib, socket and TLS error is translated here, at the boundary, into the worker's
tree (`worker.errors`):

    4xx reply, refused / dropped / reset connection, DNS failure, timeout ... SmtpTransientError
    5xx reply (MAIL, any RCPT, DATA), rejected login, STARTTLS required but
    not offered, certificate or other TLS failure, no AUTH on the server .... SmtpPermanentError

Messages are short and human ("connection refused", "535 5.7.8 authentication failed") and never
hold the relay password: it is scrubbed, raw and base64-encoded, from anything the server says.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal, Self, TypeVar

import aiosmtplib
from aiosmtplib.email import flatten_message

from worker.errors import SmtpPermanentError, SmtpTransientError

__all__ = ["ProbeResult", "Relay", "SmtpPool", "Stage", "StartTLS", "probe"]

StartTLS = Literal["auto", "always", "never"]
Stage = Literal["connect", "tls", "auth", "done"]

# What the relay, the network or TLS can throw at us. ssl.SSLError and TimeoutError are OSErrors;
# ValueError is aiosmtplib refusing an address or host name it cannot put on a command line.
_RELAY_ERRORS = (aiosmtplib.SMTPException, OSError, ValueError)
# Longest message we pass on: server replies can be long, multi-line banners.
_MAX_MESSAGE = 300

_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class Relay:
    """How to reach and log in to one relay; hashable, it is the pool's key.

    `secure` is TLS from the first byte (port 465). Otherwise `starttls` decides: "auto" upgrades
    when the server offers STARTTLS, "always" fails without it, "never" stays in clear text.
    `reject_unauthorized=False` accepts any certificate. `timeout` bounds each network operation.
    """

    host: str
    port: int
    secure: bool = False
    starttls: StartTLS = "auto"
    reject_unauthorized: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """How far `probe` got: `stage` is where it failed, or "done" with `ok`."""

    ok: bool
    stage: Stage
    message: str


async def probe(relay: Relay) -> ProbeResult:
    """Connect, upgrade to TLS and log in as `relay` says, send no mail, and QUIT.

    Never raises for a relay problem: the result names the stage that failed and why.
    """
    try:
        smtp = await _open(relay)
    except _HandshakeError as exc:
        return ProbeResult(ok=False, stage=exc.stage, message=exc.message)
    # Read before QUIT: the transport is gone afterwards.
    tls = smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
    await _quit(smtp)
    parts = ["connected", "over TLS" if tls else "without TLS"]
    if relay.username:
        parts.append("logged in")
    return ProbeResult(ok=True, stage="done", message=", ".join(parts))


class SmtpPool:
    """Sends emails over a few reused, logged-in connections per relay.

    At most `max_per_relay` connections to one relay exist at a time; more concurrent sends wait
    for one of them (a semaphore per relay), so a burst of emails opens only a handful. Idle
    connections are closed lazily once idle for `idle_timeout` seconds, and a connection is
    retired after `max_messages_per_connection` emails, since many relays cap emails per
    connection (100 is nodemailer's pool default, which relays are used to). A connection
    the relay dropped while idle is replaced once, transparently.
    """

    def __init__(
        self,
        *,
        max_per_relay: int = 4,
        idle_timeout: float = 30.0,
        max_messages_per_connection: int = 100,
    ) -> None:
        if max_per_relay < 1 or max_messages_per_connection < 1:
            raise ValueError("max_per_relay and max_messages_per_connection must be at least 1")
        self._max_per_relay = max_per_relay
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages_per_connection
        self._slots: dict[Relay, _Slot] = {}
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(
        self,
        relay: Relay,
        message: EmailMessage,
        sender: str,
        recipients: list[str],
    ) -> None:
        """Send `message` to `recipients` (the envelope; its headers are not consulted).

        All or nothing: should the relay refuse any recipient, DATA is not sent.
        Raises SmtpTransientError or SmtpPermanentError.
        """
        if self._closed:
            raise RuntimeError("the SMTP pool is closed")
        if not recipients:
            raise ValueError("an email needs at least one recipient")
        self._reap_idle()
        slot = self._slots.get(relay)
        if slot is None:
            slot = self._slots[relay] = _Slot(asyncio.Semaphore(self._max_per_relay))
        slot.users += 1
        try:
            async with slot.semaphore:
                await self._send_in_slot(slot, relay, message, sender, recipients)
        finally:
            slot.users -= 1

    async def close(self) -> None:
        """QUIT every idle connection; sends still running close theirs when they end."""
        self._closed = True
        idle = [conn for slot in self._slots.values() for conn in slot.idle]
        self._slots.clear()
        await asyncio.gather(*(_quit(conn.smtp) for conn in idle))

    async def _send_in_slot(
        self,
        slot: _Slot,
        relay: Relay,
        message: EmailMessage,
        sender: str,
        recipients: list[str],
    ) -> None:
        conn = self._checkout(slot)
        if conn is not None:
            try:
                await _transact(conn, relay, message, sender, recipients, reused=True)
            except _StaleConnection:
                pass  # dropped while idle: fall through to a fresh connection, once
            else:
                await self._checkin(slot, conn)
                return
        try:
            smtp = await _open(relay)
        except _HandshakeError as exc:
            raise exc.as_worker_error() from exc.__cause__
        conn = _Connection(smtp)
        await _transact(conn, relay, message, sender, recipients, reused=False)
        await self._checkin(slot, conn)

    def _checkout(self, slot: _Slot) -> _Connection | None:
        # Most recently used first, so that under light load the others age out.
        now = time.monotonic()
        while slot.idle:
            conn = slot.idle.pop()
            if conn.smtp.is_connected and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.smtp.close()
        return None

    async def _checkin(self, slot: _Slot, conn: _Connection) -> None:
        if not conn.smtp.is_connected:
            conn.smtp.close()
        elif self._closed or conn.sent >= self._max_messages:
            await _quit(conn.smtp)
        else:
            conn.idle_since = time.monotonic()
            slot.idle.append(conn)

    def _reap_idle(self) -> None:
        """Close connections idle too long, and forget relays nobody uses any more."""
        now = time.monotonic()
        for relay, slot in list(self._slots.items()):
            keep = []
            for conn in slot.idle:
                if conn.smtp.is_connected and now - conn.idle_since < self._idle_timeout:
                    keep.append(conn)
                else:
                    # A plain close, not QUIT: it must not make this send wait on that relay.
                    conn.smtp.close()
            slot.idle = keep
            if not keep and slot.users == 0:
                del self._slots[relay]


@dataclass(slots=True)
class _Connection:
    smtp: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = 0.0


@dataclass(slots=True)
class _Slot:
    semaphore: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)
    users: int = 0  # sends waiting for or holding the semaphore


class _HandshakeError(Exception):
    """Opening a connection failed at `stage`; `message` is already scrubbed of the password."""

    def __init__(self, stage: Stage, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.stage: Stage = stage
        self.message = message
        self.permanent = permanent

    def as_worker_error(self) -> SmtpTransientError | SmtpPermanentError:
        if self.permanent:
            return SmtpPermanentError(self.message)
        return SmtpTransientError(self.message)


class _StaleConnection(Exception):
    """A reused connection turned out dead before the relay accepted anything."""


async def _open(relay: Relay) -> aiosmtplib.SMTP:
    """A connected, upgraded and logged-in client for `relay`, or _HandshakeError."""
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        use_tls=relay.secure,
        # aiosmtplib's default (None) upgrades silently when offered and goes on in clear text
        # otherwise; we decide per `relay.starttls` below, so that "always" can fail.
        start_tls=False,
        validate_certs=relay.reject_unauthorized,
        timeout=relay.timeout,
    )
    stage: Stage = "connect"
    try:
        try:
            await smtp.connect()
        except _RELAY_ERRORS as exc:
            # Implicit TLS handshakes inside connect(); a TLS error there is the "tls" stage.
            if relay.secure and _find(exc, ssl.SSLError) is not None:
                stage = "tls"
            raise
        await _hello(smtp)
        if not relay.secure and relay.starttls != "never":
            if smtp.supports_extension("starttls"):
                stage = "tls"
                await smtp.starttls()
                await _hello(smtp)  # RFC 3207 4.2: forget what was said before TLS
            elif relay.starttls == "always":
                raise _HandshakeError("tls", "the server does not offer STARTTLS", permanent=True)
        if relay.username:
            stage = "auth"
            await smtp.login(relay.username, relay.password or "")
    except _HandshakeError:
        smtp.close()
        raise
    except _RELAY_ERRORS as exc:
        smtp.close()
        message, permanent = _describe(exc)
        raise _HandshakeError(stage, _scrub(message, relay), permanent=permanent) from exc
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()  # a server without ESMTP


async def _transact(
    conn: _Connection,
    relay: Relay,
    message: EmailMessage,
    sender: str,
    recipients: list[str],
    *,
    reused: bool,
) -> None:
    """One MAIL / RCPT... / DATA transaction; on any failure the connection is closed."""
    smtp = conn.smtp
    accepted_anything = False
    try:
        if not smtp.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("connection lost while idle")
        options, payload = _prepare(smtp, message, sender, recipients)
        encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
        await smtp.mail(sender, options=options, encoding=encoding)
        accepted_anything = True
        refused: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append(exc)
        if refused:
            raise _refusal(refused)
        await smtp.data(payload)
    except BaseException as exc:
        smtp.close()
        if reused and not accepted_anything and _is_stale(exc):
            raise _StaleConnection from exc
        if isinstance(exc, _RELAY_ERRORS):
            text, permanent = _describe(exc)
            error_type = SmtpPermanentError if permanent else SmtpTransientError
            raise error_type(_scrub(text, relay)) from exc
        raise
    conn.sent += 1


def _prepare(
    smtp: aiosmtplib.SMTP,
    message: EmailMessage,
    sender: str,
    recipients: list[str],
) -> tuple[list[str], bytes]:
    """MAIL options and the bytes to send, as aiosmtplib's own send_message would choose them."""
    options: list[str] = []
    utf8 = not (sender.isascii() and all(address.isascii() for address in recipients))
    if utf8:
        if not smtp.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported(
                "an address is not ASCII and the server does not support SMTPUTF8"
            )
        options.append("SMTPUTF8")
    if smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    cte_type = "8bit" if smtp.supports_extension("8bitmime") else "7bit"
    payload = flatten_message(message, utf8=utf8, cte_type=cte_type)
    if smtp.supports_extension("size"):
        # RFC 1870: lets the relay refuse an oversized email before we send it.
        options.insert(0, f"SIZE={len(payload)}")
    return options, payload


def _refusal(refused: list[aiosmtplib.SMTPRecipientRefused]) -> aiosmtplib.SMTPResponseException:
    """One error for the refused recipients: permanent if any refusal is."""
    worst = max(refused, key=lambda exc: exc.code)
    reasons = "; ".join(f"{exc.recipient}: {exc.code} {exc.message}" for exc in refused)
    return aiosmtplib.SMTPResponseException(worst.code, f"recipient refused ({reasons})")


def _is_stale(exc: BaseException) -> bool:
    # 421 is how a relay says "closing this connection" (RFC 5321 3.8), e.g. after its idle timer.
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421
    return isinstance(exc, ConnectionError)  # SMTPServerDisconnected is one


def _describe(exc: BaseException) -> tuple[str, bool]:
    """A short human message for a relay problem, and whether it is permanent."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # -1 is aiosmtplib's code for a reply it could not parse; treat it as a passing fault.
        return _reply_text(exc.code, exc.message), exc.code >= 500
    cert = _find(exc, ssl.SSLCertVerificationError)
    if cert is not None:
        return f"certificate verify failed: {cert.verify_message or cert.reason}", True
    if _find(exc, TimeoutError) is not None:  # asyncio.TimeoutError is TimeoutError since 3.11
        return "timed out", False
    if _find(exc, ConnectionRefusedError) is not None:
        return "connection refused", False
    tls = _find(exc, ssl.SSLError)
    if tls is not None:
        if isinstance(tls, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "connection closed during the TLS handshake", False
        return f"TLS failed: {tls.reason or tls}", True
    dns = _find(exc, socket.gaierror)
    if dns is not None:
        return f"host not found: {dns.strerror or dns}", False
    if isinstance(exc, ConnectionError) or _find(exc, ConnectionError) is not None:
        return "connection closed by the server", False
    if isinstance(exc, OSError):
        return exc.strerror or str(exc), False
    if isinstance(exc, aiosmtplib.SMTPException):
        return str(exc), True  # e.g. no AUTH or no SMTPUTF8 on this server
    return str(exc), True  # ValueError: an address or host aiosmtplib will not send


def _reply_text(code: int, text: str) -> str:
    return f"{code} {text}" if code > 0 else text


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of `kind` along the cause / context chain of `exc`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _scrub(text: str, relay: Relay) -> str:
    """`text` on one line, shortened, without the password in any form the server could echo."""
    if relay.password:
        secret = relay.password.encode()
        user = (relay.username or "").encode()
        forms = {
            relay.password,
            base64.b64encode(secret).decode(),  # AUTH LOGIN
            base64.b64encode(b"\0" + user + b"\0" + secret).decode(),  # AUTH PLAIN
        }
        for form in sorted(forms, key=len, reverse=True):
            text = text.replace(form, "********")
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say goodbye if the relay still listens; close regardless."""
    try:
        if smtp.is_connected:
            await smtp.quit()
    except _RELAY_ERRORS:
        pass  # the connection is going away either way
    finally:
        smtp.close()
