"""Talking to SMTP relays: the settings probe and the connection pool.

Every connection starts the same way (`_open`): resolve the host with the loop's getaddrinfo,
check every address against the relay address policy (`worker.mail.policy`), connect a socket to
an address that passed, and hand that socket to aiosmtplib, which verifies the TLS certificate
(and sends SNI) against the host name. Nothing resolves the name a second time, so a DNS answer
that changes between the check and the connection cannot sneak a denied address in.

Every aiosmtplib, socket and TLS error is translated here, at the boundary, into the worker's
tree (`worker.errors`):

    4xx reply, refused / dropped / reset connection, DNS failure, timeout ... SmtpTransientError
    5xx reply (MAIL, any RCPT, DATA), rejected login, STARTTLS required but
    not offered, certificate or other TLS failure, no AUTH on the server,
    a denied address, a peer that is not an SMTP server .................... SmtpPermanentError

Messages are short and human ("could not connect to an SMTP server", "535 5.7.8 authentication
failed"). What a relay says is quoted only as the text of its SMTP replies, with control
characters removed and its length bounded; a reply that holds the relay password in any form
is withheld whole. Failures to connect say one thing whatever the cause (refused, reset, silent),
so a probe does not tell open ports from closed ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parseaddr
from ipaddress import ip_address
from typing import Any, Literal, Self, TypeVar
from urllib.parse import unquote, unquote_plus

import aiosmtplib
from aiosmtplib.email import flatten_message

from schemas.settings import TIMEOUT_MAX, TIMEOUT_MIN
from worker.errors import SmtpPermanentError, SmtpTransientError
from worker.mail.policy import Network, is_allowed, unwrap

__all__ = [
    "DENIED",
    "NOT_SMTP",
    "NO_CONNECTION",
    "WITHHELD",
    "ProbeResult",
    "Relay",
    "SmtpPool",
    "Stage",
    "StartTLS",
    "probe",
]

StartTLS = Literal["auto", "always", "never"]
Stage = Literal["connect", "tls", "auth", "sender", "done"]

NO_CONNECTION = "could not connect to an SMTP server"
NOT_SMTP = "not an SMTP server"
DENIED = "the relay's address is not allowed: it is not a public address"
WITHHELD = "the relay's reply was withheld: it quoted the password"

# What the relay, the network or TLS can throw at us. ssl.SSLError and TimeoutError are OSErrors;
# ValueError is aiosmtplib refusing an address or host name it cannot put on a command line.
_RELAY_ERRORS = (aiosmtplib.SMTPException, OSError, ValueError)
# Longest message we pass on: server replies can be long, multi-line banners.
_MAX_MESSAGE = 300
_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]+")
# Other control, format and bidirectional characters, and lone surrogates (undecodable bytes):
# none belongs in a message, and a NUL is more than PostgreSQL's text type will store.
_INVISIBLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff\ud800-\udfff]"
)

_E = TypeVar("_E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class Relay:
    """How to reach and log in to one relay; hashable, it is the pool's key.

    `secure` is TLS from the first byte (port 465). Otherwise `starttls` decides: "auto" upgrades
    when the server offers STARTTLS, "always" fails without it, "never" stays in clear text.
    `reject_unauthorized=False` accepts any certificate. `timeout` bounds each network operation.
    `allow` lists the non-public addresses the relay may be at (SMTP_WORKER_RELAY_ALLOW).
    `sender` is the address `probe` offers at MAIL FROM and RCPT TO; it is not part of the key.
    """

    host: str
    port: int
    secure: bool = False
    starttls: StartTLS = "auto"
    reject_unauthorized: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    allow: tuple[Network, ...] = ()
    sender: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """How far `probe` got: `stage` is where it failed, or "done" with `ok`."""

    ok: bool
    stage: Stage
    message: str


async def probe(relay: Relay) -> ProbeResult:
    """Connect, upgrade to TLS and log in as `relay` says, offer its sender, send no mail, QUIT.

    With `relay.sender`, the "sender" stage offers `MAIL FROM:<sender>` and `RCPT TO:<sender>`,
    then RSET: a relay that will not relay for these settings fails there, not on the first
    email. Never raises for a relay problem: the result names the stage that failed and why.
    """
    try:
        smtp = await _open(relay)
    except _HandshakeError as exc:
        return ProbeResult(ok=False, stage=exc.stage, message=exc.message)
    try:
        tls = smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
        parts = ["connected", "over TLS" if tls else "without TLS"]
        if relay.username:
            parts.append("logged in")
        if relay.sender:
            try:
                await smtp.mail(relay.sender)
                await smtp.rcpt(relay.sender)
            except _RELAY_ERRORS as exc:
                return ProbeResult(ok=False, stage="sender", message=_describe(exc, relay)[0])
            parts.append("sender accepted")
            with contextlib.suppress(*_RELAY_ERRORS):  # QUIT ends the transaction all the same
                await smtp.rset()
        return ProbeResult(ok=True, stage="done", message=", ".join(parts))
    finally:
        await _quit(smtp)


class SmtpPool:
    """Sends emails over a few reused, logged-in connections per relay.

    At most `max_per_relay` connections to one relay exist at a time; more concurrent sends wait
    for one of them (a semaphore per relay), so a burst of emails opens only a handful. At most
    `max_connections` exist in all: a send that needs one more closes the connection idle the
    longest, whatever its relay, or waits for one to be returned. A timer closes connections
    idle for `idle_timeout` seconds, and a connection is retired after
    `max_messages_per_connection` emails, since many relays cap emails per connection (100 is
    nodemailer's pool default, which relays are used to). A connection the relay dropped while
    idle is replaced once, transparently.
    """

    def __init__(
        self,
        *,
        max_per_relay: int = 4,
        max_connections: int = 100,
        idle_timeout: float = 30.0,
        max_messages_per_connection: int = 100,
    ) -> None:
        if min(max_per_relay, max_connections, max_messages_per_connection) < 1:
            raise ValueError(
                "max_per_relay, max_connections and max_messages_per_connection must be at least 1"
            )
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self._max_per_relay = max_per_relay
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._max_messages = max_messages_per_connection
        self._slots: dict[Relay, _Slot] = {}
        self._open = 0  # connections open or being opened, idle or in use
        self._room: deque[asyncio.Future[None]] = deque()  # sends waiting under the cap
        self._idle_added = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def idle_timeout(self) -> float:
        return self._idle_timeout

    @property
    def connections(self) -> int:
        """Connections open (or being opened) now, idle or in use."""
        return self._open

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(
        self,
        relay: Relay,
        message: EmailMessage | bytes,
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
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="smtp-pool-reaper")
        slot = self._slots.get(relay)
        if slot is None:
            slot = self._slots[relay] = _Slot(asyncio.Semaphore(self._max_per_relay))
        slot.users += 1
        try:
            async with slot.semaphore:
                await self._send_in_slot(slot, relay, message, sender, recipients)
        finally:
            slot.users -= 1
            if slot.users == 0 and not slot.idle and self._slots.get(relay) is slot:
                del self._slots[relay]

    def has_free_connection(self, relay: Relay) -> bool:
        """Whether a send to `relay` would get a connection now, without waiting for one."""
        slot = self._slots.get(relay)
        return slot is None or not slot.semaphore.locked()

    async def close(self) -> None:
        """Stop the idle timer and QUIT every idle connection; sends still running close theirs
        when they end."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        idle = [conn for slot in self._slots.values() for conn in slot.idle]
        for slot in self._slots.values():
            slot.idle.clear()
        await asyncio.gather(*self._quitting, *(self._quit(conn) for conn in idle))

    async def _send_in_slot(
        self,
        slot: _Slot,
        relay: Relay,
        message: EmailMessage | bytes,
        sender: str,
        recipients: list[str],
    ) -> None:
        conn = self._checkout(slot)
        if conn is not None:
            try:
                await _transact(conn, relay, message, sender, recipients, reused=True)
            except _StaleConnection:
                self._drop(conn)  # dropped while idle: fall through to a fresh one, once
            except BaseException:
                self._drop(conn)
                raise
            else:
                await self._checkin(slot, conn)
                return
        await self._reserve()
        try:
            smtp = await _open(relay)
        except BaseException as exc:
            self._release()
            if isinstance(exc, _HandshakeError):
                raise exc.as_worker_error() from exc.__cause__
            raise
        conn = _Connection(smtp)
        try:
            await _transact(conn, relay, message, sender, recipients, reused=False)
        except BaseException:
            self._drop(conn)
            raise
        await self._checkin(slot, conn)

    def _checkout(self, slot: _Slot) -> _Connection | None:
        # Most recently used first, so that under light load the others age out.
        now = time.monotonic()
        while slot.idle:
            conn = slot.idle.pop()
            if conn.smtp.is_connected and now - conn.idle_since < self._idle_timeout:
                return conn
            self._drop(conn)
        return None

    async def _checkin(self, slot: _Slot, conn: _Connection) -> None:
        if not conn.smtp.is_connected:
            self._drop(conn)
        elif self._closed or conn.sent >= self._max_messages or self._room:
            # (A send waiting for room under the cap gets this connection's.)
            await self._quit(conn)
        else:
            conn.idle_since = time.monotonic()
            slot.idle.append(conn)
            self._idle_added.set()

    async def _reserve(self) -> None:
        """Count one more connection, once the cap allows it."""
        loop = asyncio.get_running_loop()
        while self._open >= self._max_connections and not self._evict_one():
            waiter: asyncio.Future[None] = loop.create_future()
            self._room.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: pass the room on
                raise
            finally:
                if waiter in self._room:
                    self._room.remove(waiter)
        self._open += 1

    def _release(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._room:
            waiter = self._room.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _evict_one(self) -> bool:
        """Close the connection idle the longest, of any relay; False when none is idle."""
        oldest: tuple[_Slot, _Connection] | None = None
        for slot in self._slots.values():
            for conn in slot.idle:
                if oldest is None or conn.idle_since < oldest[1].idle_since:
                    oldest = slot, conn
        if oldest is None:
            return False
        slot, conn = oldest
        slot.idle.remove(conn)
        # A plain close, not QUIT: this send must not wait on another relay. Its room is taken
        # at once by the caller, so no waiter is woken for it.
        conn.smtp.close()
        self._open -= 1
        return True

    def _drop(self, conn: _Connection) -> None:
        """Close `conn` at once, without QUIT, and free its room."""
        conn.smtp.close()
        self._release()

    async def _quit(self, conn: _Connection) -> None:
        """QUIT `conn`, then free its room."""
        try:
            await _quit(conn.smtp)
        finally:
            self._release()

    async def _reap_forever(self) -> None:
        """The idle timer: closes each idle connection once its idle time is up."""
        while True:
            idle_since = [conn.idle_since for slot in self._slots.values() for conn in slot.idle]
            if not idle_since:
                self._idle_added.clear()
                await self._idle_added.wait()
                continue
            # Connections go idle in time order: no deadline earlier than this one can appear.
            await asyncio.sleep(max(0.0, min(idle_since) + self._idle_timeout - time.monotonic()))
            self._reap_idle()

    def _reap_idle(self) -> None:
        """Close connections idle too long (QUIT, in the background), and forget relays nobody
        uses any more."""
        now = time.monotonic()
        for relay, slot in list(self._slots.items()):
            keep = []
            for conn in slot.idle:
                if conn.smtp.is_connected and now - conn.idle_since < self._idle_timeout:
                    keep.append(conn)
                elif conn.smtp.is_connected:
                    task = asyncio.create_task(self._quit(conn))
                    self._quitting.add(task)
                    task.add_done_callback(self._quitting.discard)
                else:
                    self._drop(conn)
            slot.idle = keep
            if not keep and slot.users == 0:
                del self._slots[relay]


@dataclass(slots=True, eq=False)
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
    """Opening a connection failed at `stage`; `message` is safe to show (see `_describe`)."""

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


async def _connect(relay: Relay) -> socket.socket:
    """A TCP socket connected to an address of `relay.host` that the policy allows.

    Every address the name resolves to is checked, and only those allowed are tried, in the
    resolver's order; a name with none is refused without a connection.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(relay.timeout):
            try:
                found = await _resolve(_bare(relay.host), relay.port)
            except (socket.gaierror, UnicodeError) as exc:
                raise _HandshakeError("connect", "host not found", permanent=False) from exc
            targets: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
            for family, sockaddr in found:
                address = unwrap(ip_address(sockaddr[0]))
                if not is_allowed(address, relay.allow):
                    continue
                target = (family, sockaddr)
                if address.version == 4:  # an IPv4-mapped address goes out as IPv4
                    target = (socket.AF_INET, (str(address), relay.port))
                if target not in targets:
                    targets.append(target)
            if not targets:
                raise _HandshakeError("connect", DENIED, permanent=True)
            failure: OSError | None = None
            for family, sockaddr in targets:
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except OSError as exc:  # no IPv6 on this machine, say
                    failure = exc
                    continue
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, sockaddr)
                except OSError as exc:
                    sock.close()
                    failure = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return sock
            raise _HandshakeError("connect", NO_CONNECTION, permanent=False) from failure
    except TimeoutError as exc:
        raise _HandshakeError("connect", NO_CONNECTION, permanent=False) from exc


async def _resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    """The family and socket address of each address of `host`, by the loop's getaddrinfo;
    an IPv4 address written out in full needs no trip to its thread pool."""
    try:
        if ip_address(host).version == 4:
            return [(socket.AF_INET, (host, port))]
    except ValueError:
        pass
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, tuple(sockaddr)) for family, _, _, _, sockaddr in found]


async def _open(relay: Relay) -> aiosmtplib.SMTP:
    """A connected, upgraded and logged-in client for `relay`, or _HandshakeError."""
    sock = await _connect(relay)
    try:
        smtp = aiosmtplib.SMTP(
            hostname=_bare(relay.host),  # for SNI and the certificate check: `sock` is connected
            sock=sock,
            use_tls=relay.secure,
            # aiosmtplib's default (None) upgrades silently when offered and goes on in clear
            # text otherwise; we decide per `relay.starttls` below, so that "always" can fail.
            start_tls=False,
            validate_certs=relay.reject_unauthorized,
            timeout=relay.timeout,
        )
    except _RELAY_ERRORS as exc:  # a host name aiosmtplib will not take
        sock.close()
        raise _HandshakeError("connect", _describe(exc, relay)[0], permanent=True) from exc
    stage: Stage = "connect"
    try:
        try:
            await smtp.connect()
        except _RELAY_ERRORS as exc:
            raise _greeting_failure(exc, relay) from _cause(exc)
        try:
            await _hello(smtp)
        except aiosmtplib.SMTPResponseException as exc:
            if not _is_reply(exc.code):
                raise _HandshakeError("connect", NOT_SMTP, permanent=True) from None
            raise
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
        message, permanent = _describe(exc, relay)
        raise _HandshakeError(stage, message, permanent=permanent) from _cause(exc)
    except BaseException:
        smtp.close()
        raise
    return smtp


def _greeting_failure(exc: BaseException, relay: Relay) -> _HandshakeError:
    """Why `connect()` failed: the socket is connected, so this is TLS or the greeting."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if 400 <= exc.code < 600:
            # An SMTP server turning us away (421 busy, 554 no service): its reply is SMTP.
            return _HandshakeError(
                "connect", _reply_text(exc.code, exc.message, relay), permanent=exc.code >= 500
            )
        # No "220" greeting, or no SMTP reply at all (a database's or a broker's banner).
        return _HandshakeError("connect", NOT_SMTP, permanent=True)
    tls = _tls_error(exc)
    if relay.secure and tls is not None and not isinstance(tls, _TLS_CLOSED):
        message, permanent = _describe(exc, relay)
        return _HandshakeError("tls", message, permanent=permanent)
    # Silent, reset or closed at once: one message for all, so that nobody maps ports with it.
    return _HandshakeError("connect", NO_CONNECTION, permanent=False)


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()  # a server without ESMTP


async def _transact(
    conn: _Connection,
    relay: Relay,
    message: EmailMessage | bytes,
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
            text, permanent = _describe(exc, relay)
            error_type = SmtpPermanentError if permanent else SmtpTransientError
            raise error_type(text) from _cause(exc)
        raise
    conn.sent += 1


def _prepare(
    smtp: aiosmtplib.SMTP,
    message: EmailMessage | bytes,
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
    if isinstance(message, bytes):
        payload = message  # composed by worker.mail.compose: 7-bit, CRLF, sent as it is
    else:
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


_TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


def _describe(exc: BaseException, relay: Relay) -> tuple[str, bool]:
    """A short message for a relay problem, safe to show anyone, and whether it is permanent."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if not _is_reply(exc.code):
            # -1 is aiosmtplib's code for a reply it could not parse; its text is not SMTP.
            return "the server's reply is not SMTP", False
        return _reply_text(exc.code, exc.message, relay), exc.code >= 500
    cert = _find(exc, ssl.SSLCertVerificationError)
    if cert is not None:
        return f"certificate verify failed: {_clean(cert.verify_message or cert.reason)}", True
    if _find(exc, TimeoutError) is not None:  # asyncio.TimeoutError is TimeoutError since 3.11
        return "timed out", False
    tls = _tls_error(exc)
    if tls is not None:
        if isinstance(tls, _TLS_CLOSED):
            return "connection closed during the TLS handshake", False
        return f"TLS failed: {_clean(tls.reason or 'handshake failed')}", True
    if isinstance(exc, ConnectionError) or _find(exc, ConnectionError) is not None:
        return "connection closed by the server", False
    if isinstance(exc, OSError):
        return _clean(exc.strerror or "network error"), False
    # aiosmtplib's own words (no AUTH or no SMTPUTF8 on this server, an address it will not
    # send); they may quote what the server said, as a CRAM-MD5 challenge, so they are relay text.
    return _relay_text(str(exc), relay), True


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind `exc`, if any. "Want read" and "want write" are no failures: the
    TLS layer leaves them in the context of whatever interrupted it (a reset, a timeout)."""
    tls = _find(exc, ssl.SSLError)
    return None if isinstance(tls, ssl.SSLWantReadError | ssl.SSLWantWriteError) else tls


def _is_reply(code: int) -> bool:
    return 200 <= code < 600


def _reply_text(code: int, text: str, relay: Relay) -> str:
    return _clean(f"{code} {_relay_text(text, relay)}")


def _relay_text(text: str, relay: Relay) -> str:
    """What the relay said, fit to quote: one clean, bounded line, or withheld whole when it
    holds the password in any form."""
    if relay.password and _quotes(text, relay.password):
        return WITHHELD
    return _clean(text)


def _clean(text: str) -> str:
    """`text` on one line, without control characters, shortened."""
    text = " ".join(_INVISIBLE.sub("", _BREAKS.sub(" ", text)).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def _quotes(text: str, password: str) -> bool:
    """True when `text` holds `password` plain, base64-encoded (at any alignment, as inside
    AUTH PLAIN), hex-encoded or URL-encoded (once or twice), in any case (of the password, or of
    its encoding), whatever whitespace, line breaks, control characters or punctuation split
    it."""
    forms = _password_forms(password)
    once = unquote(text)
    raw = {text, once, unquote(once), unquote_plus(text)}
    views = {_squash(view) for view in raw}
    if any(form in view for form in forms for view in views):
        return True
    # Split by punctuation (`ab, cd`, hex as `de:ad:be:ef`): the letters and digits alone, for
    # the forms long enough that finding them so is no accident.
    letters = {_alnum(view) for view in raw}
    return any(
        form in view for form in map(_alnum, forms) if len(form) >= _ALNUM_MIN for view in letters
    )


# Letters and digits a form must keep, once its punctuation is gone, to be looked for so.
_ALNUM_MIN = 8


def _password_forms(password: str) -> set[str]:
    forms: set[str] = set()
    for variant in {password, password.upper(), password.lower()}:
        secret = variant.encode()
        forms |= {_squash(variant), secret.hex()}
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            for offset in range(3):
                # The characters that encode the password's bits alone, whatever comes before.
                encoded = encode(b"\0" * offset + secret + b"\0\0").decode()
                first, end = (8 * offset + 5) // 6, (8 * (offset + len(secret))) // 6
                forms.add(encoded[first:end].casefold())
    forms.discard("")
    return forms


def _squash(text: str) -> str:
    return "".join(_INVISIBLE.sub("", text).split()).casefold()


def _alnum(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _cause(exc: BaseException) -> BaseException | None:
    """`exc` to chain to the worker's error, or None when its chain holds what the relay said:
    a traceback of the worker's error must not quote the relay."""
    return None if _find(exc, aiosmtplib.SMTPResponseException) is not None else exc


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


def _bare(host: str) -> str:
    """`[::1]` as `::1`: brackets are how URLs spell IPv6 addresses, not part of them."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say goodbye if the relay still listens; close regardless."""
    try:
        if smtp.is_connected:
            await smtp.quit()
    except _RELAY_ERRORS:
        pass  # the connection is going away either way
    finally:
        smtp.close()


def relay_of(settings: Any, password: str | None, allow: Iterable[Network] = ()) -> Relay:
    """The relay of stored email settings (a row with `options` and `sender`); `password` is
    their relay password, decrypted; `allow` is SMTP_WORKER_RELAY_ALLOW."""
    options = settings.options
    return Relay(
        host=options["host"],
        port=options["port"],
        secure=options["secure"],
        starttls=options["starttls"],
        reject_unauthorized=options["rejectUnauthorized"],
        username=options.get("auth_user"),
        password=password,
        # Settings stored before the contract bounded the timeout may hold more.
        timeout=min(max(float(options["timeout"]), TIMEOUT_MIN), TIMEOUT_MAX),
        allow=tuple(allow),
        sender=parseaddr(settings.sender)[1] or settings.sender,
    )
