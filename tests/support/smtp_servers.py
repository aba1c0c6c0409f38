"""Real SMTP servers for the tests: aiosmtpd on 127.0.0.1, on free ports, in their own thread.

    async with SmtpServer(tls="starttls", auth=("relay-user", "s3cret")) as srv:
        ... send to srv.host, srv.port ...
        received = await srv.wait_for(1)
        assert received[0].message["Subject"] == "..."

`script` makes the server misbehave, command by command. It maps an SMTP command ("MAIL",
"RCPT", "DATA", "AUTH") to the answers for its successive uses, across all connections; once a
command's answers run out, the server answers normally. An answer is a reply line, `None`
(answer normally), `DROP` (close the connection without answering) or a callable taking the
command's argument and returning one of those. "DATA" scripts the final reply, after the content.

    script={"DATA": ["451 4.3.0 try again later"] * 2}    # the first two emails, then accept
    script={"DATA": itertools.repeat("550 5.7.1 rejected")}  # always
    script={"DATA": [DROP]}                                # hang up on the first email's DATA
    script={"MAIL": [None, DROP]}                          # the second MAIL of the run
    script={"RCPT": [None, "550 5.1.1 no such user"]}      # the second recipient of the run

The server runs in aiosmtpd's Controller, an event loop in a thread of its own, so a test's loop
never serves it; every counter is shared between the two threads under a lock.

`tcp_peer` is a TCP server that is not an SMTP server: silent, hanging up, resetting, or sending
another protocol's greeting (`NATS_BANNER`, `MARIADB_GREETING`, `HTTP_RESPONSE`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Final, Literal, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "DROP",
    "HTTP_RESPONSE",
    "MARIADB_GREETING",
    "NATS_BANNER",
    "Answer",
    "Received",
    "SmtpServer",
    "Tls",
    "closed_port",
    "echoing_answers",
    "multiline",
    "password_echoes",
    "password_leaks",
    "plain_auth_password",
    "server_tls_context",
    "silent_port",
    "tcp_peer",
]

DROP: Final = "DROP"
"""A scripted answer: close the connection instead of replying."""

Answer = str | None | Callable[[str], "str | None"]
Tls = Literal["none", "starttls", "implicit"]


@dataclass(frozen=True, slots=True)
class Received:
    """One email the server accepted: the envelope and the message parsed from its bytes."""

    sender: str
    recipients: list[str]
    message: EmailMessage
    raw: bytes


def server_tls_context(directory: Path | None = None) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 and localhost.

    The certificate and key are written to `directory` (a temporary one when None); no client
    trusts them, which is the point of the "rejectUnauthorized" tests.
    """
    if directory is None:
        with tempfile.TemporaryDirectory() as tmp:
            return server_tls_context(Path(tmp))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on: for "connection refused", or a free port to listen on."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def silent_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port that accepts TCP connections (the kernel does) and never says a word: timeouts."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen(64)
        yield sock.getsockname()[1]


NATS_BANNER: Final = (
    b'INFO {"server_id":"NDJWE4SHUJOFKEMNZHDGRZBWH7MN3ZHCZ4LUFSQBVTE3NV2PQG5CVVNA",'
    b'"server_name":"nats-internal-1","version":"2.10.7","proto":1,"host":"0.0.0.0",'
    b'"port":4222,"headers":true,"auth_required":true,"max_payload":1048576}\r\n'
)
"""What a NATS server says first; it names the server and its version."""

MARIADB_GREETING: Final = (
    b"\x5b\x00\x00\x00\x0a5.5.5-10.11.6-MariaDB-0+deb12u1\x00\x2a\x00\x00\x00"
    b"\x3f\x7a\x50\x2b\x4c\x36\x27\x5e\x00\xfe\xf7\x2d\x02\x00\xff\x81\x15"
    b"\x00\x00\x00\x00\x00\x00\x1d\x00\x00\x00mysql_native_password\x00"
)
"""A MariaDB handshake packet: binary, with the version and an auth plugin name."""

HTTP_RESPONSE: Final = (
    b"HTTP/1.1 400 Bad Request\r\nServer: nginx/1.25.3\r\nContent-Length: 0\r\n\r\n"
)

Behaviour = Literal["silent", "close", "reset"] | bytes


@contextlib.asynccontextmanager
async def tcp_peer(behaviour: Behaviour, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """A TCP server on the test's own loop that is no SMTP server; yields its port.

    Each accepted connection is held open in silence ("silent"), closed at once ("close"),
    reset at once with an RST ("reset"), or sent the given bytes and then held open.
    """
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "close":
            writer.close()
            return
        if behaviour == "reset":
            # SO_LINGER with a zero timeout turns close() into an RST.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if isinstance(behaviour, bytes):
            writer.write(behaviour)
        held.append(writer)

    server = await asyncio.start_server(serve, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


def password_echoes(user: str, password: str) -> dict[str, str]:
    """Reply texts of a relay that quotes `password`, in every form a relay might: plain, in
    another case, base64 at each alignment (as inside AUTH PLAIN) and of the password in another
    case, hex (with colons too), URL-encoded once or twice, and split by spaces, a NUL, a line
    break (`multiline` makes it a multi-line reply) or punctuation."""
    secret = password.encode()
    cut = len(password) // 2

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    plain = b"\0" + user.encode() + b"\0" + secret
    return {
        "plain": f"5.7.8 got {password}",
        "upper": f"5.7.8 got {password.upper()}",
        "lower": f"5.7.8 got {password.lower()}",
        "base64": f"5.7.8 got {b64(secret)}",
        "auth-plain": f"5.7.8 got {b64(plain)}",
        "base64-offset-1": f"5.7.8 got {b64(b'x' + secret)}",
        "base64-offset-2": f"5.7.8 got {b64(b'xy' + secret)}",
        "base64-url": f"5.7.8 got {base64.urlsafe_b64encode(b'xy' + secret).decode()}",
        "hex": f"5.7.8 got {secret.hex()}",
        "HEX": f"5.7.8 got {secret.hex().upper()}",
        "url": f"5.7.8 got {urllib.parse.quote(password, safe='')}",
        "url-every-byte": "5.7.8 got " + "".join(f"%{byte:02X}" for byte in secret),
        "split-by-spaces": f"5.7.8 got {password[:cut]}  {password[cut:]}",
        "split-by-nul": f"5.7.8 got {password[:cut]}\x00{password[cut:]}",
        "split-by-tab-mixed-case": f"5.7.8 got {password[:cut].upper()}\t{password[cut:]}",
        "split-across-lines": f"5.7.8 got {password[:cut]}\n{password[cut:]} ok",
        "base64-of-upper": f"5.7.8 got {b64(password.upper().encode())}",
        "hex-of-upper": f"5.7.8 got {password.upper().encode().hex()}",
        "hex-with-colons": "5.7.8 got " + ":".join(f"{byte:02x}" for byte in secret),
        "url-twice": "5.7.8 got "
        + urllib.parse.quote(urllib.parse.quote(password, safe=""), safe=""),
        "split-by-punctuation": f"5.7.8 got {password[:cut]}, {password[cut:]}",
    }


def password_leaks(text: str, user: str, password: str) -> list[str]:
    """The names of the forms of `password_echoes` that `text` still holds, whatever spaces,
    line breaks or control characters were put in or taken out, in any case."""

    def squashed(value: str) -> str:
        return "".join(ch for ch in value if ch.isprintable() and not ch.isspace()).casefold()

    forms = {
        name: echo.split(maxsplit=2)[-1] for name, echo in password_echoes(user, password).items()
    }
    forms["password"] = password
    return [name for name, form in forms.items() if squashed(form) in squashed(text)]


def echoing_answers(command: str, code: int, user: str, password: str) -> list[Answer]:
    """A script's answers to `command` quoting `password`: one multi-line reply with `code` per
    form of `password_echoes`, and for AUTH one more quoting AUTH PLAIN's argument."""
    answers: list[Answer] = [
        multiline(code, echo) for echo in password_echoes(user, password).values()
    ]
    if command == "AUTH":
        answers.append(lambda argument: f"535 5.7.8 you sent {argument}")
    return answers


def multiline(code: int, text: str) -> str:
    """A scripted answer with `code` on each line of `text`: a multi-line reply."""
    *first, last = text.split("\n")
    return "".join(f"{code}-{line}\r\n" for line in first) + f"{code} {last}"


def plain_auth_password(argument: str) -> str:
    """The password inside the argument of `AUTH PLAIN <base64>`, for scripts that echo it."""
    _, _, password = base64.b64decode(argument.rsplit(maxsplit=1)[-1]).split(b"\0")
    return password.decode()


class SmtpServer:
    """A real SMTP server on 127.0.0.1 that records what it receives.

    `tls`: "none", "starttls" (offered, with AUTH only after it, as real relays do) or
    "implicit" (TLS from the first byte). `auth`: a (user, password) the server requires, with
    one of `auth_mechanisms`, before MAIL. `script`: see the module docstring.
    """

    def __init__(
        self,
        *,
        tls: Tls = "none",
        auth: tuple[str, str] | None = None,
        auth_mechanisms: Iterable[str] = ("LOGIN", "PLAIN"),
        script: Mapping[str, Iterable[Answer]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.tls: Tls = tls
        self.auth = auth
        self.messages: list[Received] = []
        self._script = {
            command.upper(): iter(answers) for command, answers in (script or {}).items()
        }
        self._lock = threading.Lock()
        self._connections = 0
        self._peak = 0
        self._open: set[_RecordingSMTP] = set()
        self._server_names: list[str | None] = []
        tls_context = server_tls_context() if tls != "none" else None
        if tls_context is not None:
            tls_context.sni_callback = self._sni
        self._controller = _Controller(
            self,
            hostname=host,
            port=0,
            ssl_context=tls_context if tls == "implicit" else None,
            tls_context=tls_context if tls == "starttls" else None,
            # With implicit TLS aiosmtpd does not know the socket is encrypted, and it would
            # refuse AUTH; with no TLS at all the plain tests must still log in.
            auth_require_tls=tls == "starttls",
            authenticator=self._authenticate,
            auth_exclude_mechanism={"LOGIN", "PLAIN"} - set(auth_mechanisms),
            server_hostname="smtp.test",
            ready_timeout=5.0,
        )
        self._started = False

    @property
    def port(self) -> int:
        return self._controller.port

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Connections currently open."""
        with self._lock:
            return len(self._open)

    @property
    def peak_connections(self) -> int:
        """The most connections that were open at once."""
        with self._lock:
            return self._peak

    @property
    def server_names(self) -> list[str | None]:
        """The name (SNI) each TLS client asked for, in order; None for a client that sent none."""
        with self._lock:
            return list(self._server_names)

    def start(self) -> Self:
        self._controller.start()
        with self._lock:
            # Controller.start() connects once itself to check the server is up; not ours.
            self._connections = 0
            self._peak = 0
            self._server_names.clear()
        self._started = True
        return self

    def stop(self) -> None:
        """Close every client connection, then the server and its thread."""
        if not self._started:
            return
        self._started = False
        # Stop listening first, and hang up until none is left: Controller.stop() closes its
        # loop without closing the connections still open, and a client that connected after
        # a single hang-up round (a worker retrying) would leak its transport (ResourceWarning).
        self._controller.loop.call_soon_threadsafe(self._controller.server.close)
        # A connection accepted just before the close registers a moment later: wait until
        # none has been open for 50 ms.
        deadline = time.monotonic() + 2.0
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            if self.open_connections:
                self.drop_connections()
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.05:
                break
            time.sleep(0.01)
        self._controller.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    def drop_connections(self) -> None:
        """Hang up on every client, as a relay does to connections idle too long."""
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            self._controller.loop.call_soon_threadsafe(session.hang_up)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """The received emails, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.messages)} emails arrived, expected {count}")
            await asyncio.sleep(0.01)
        return list(self.messages)

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until no client connection is open."""
        deadline = time.monotonic() + timeout
        while self.open_connections:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.open_connections} connections still open")
            await asyncio.sleep(0.01)

    # Called from the server's thread.

    def _accepted(self) -> None:
        with self._lock:
            self._connections += 1

    def _opened(self, session: _RecordingSMTP) -> None:
        with self._lock:
            self._open.add(session)
            self._peak = max(self._peak, len(self._open))

    def _sni(self, _connection: object, server_name: str | None, _context: object) -> None:
        with self._lock:
            self._server_names.append(server_name)

    def _closed(self, session: _RecordingSMTP) -> None:
        with self._lock:
            self._open.discard(session)

    def _next_answer(self, command: str, argument: str) -> str | None:
        with self._lock:
            answers = self._script.get(command)
            answer = next(answers, None) if answers is not None else None
        return answer(argument) if callable(answer) else answer

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        expected = (
            LoginPassword(self.auth[0].encode(), self.auth[1].encode()) if self.auth else None
        )
        return AuthResult(success=auth_data == expected, handled=False)

    def _record(self, envelope: Envelope) -> None:
        raw = envelope.original_content or b""
        message = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        received = Received(
            sender=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            message=message,
            raw=raw,
        )
        with self._lock:
            self.messages.append(received)


class _Handler:
    """aiosmtpd hooks: the script, the AUTH requirement, and recording."""

    def __init__(self, owner: SmtpServer) -> None:
        self.owner = owner

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        answer = self.owner._next_answer("AUTH", " ".join(args))
        if answer is None:
            return MISSING  # aiosmtpd's own AUTH handling
        return await _answer(server, answer)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.owner.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        answer = self.owner._next_answer("MAIL", address)
        if answer is not None:
            return await _answer(server, answer)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        answer = self.owner._next_answer("RCPT", address)
        if answer is not None:
            return await _answer(server, answer)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        answer = self.owner._next_answer("DATA", "")
        if answer is not None:
            return await _answer(server, answer)
        self.owner._record(envelope)
        return "250 OK"


async def _answer(server: SMTP, answer: str) -> str:
    if answer != DROP:
        return answer
    assert server.transport is not None
    server.transport.close()
    # Never reply: closing the transport cancels this session's task (connection_lost).
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class _RecordingSMTP(SMTP):
    """aiosmtpd's server session, telling its SmtpServer when a connection opens and closes."""

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = handler.owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again, on the same session, with the TLS transport after STARTTLS.
        fresh = self._original_transport is None
        super().connection_made(transport)
        if fresh:
            self.owner._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._closed(self)
        super().connection_lost(error)

    def hang_up(self) -> None:
        if self.transport is None:
            return
        self.transport.close()
        if self._original_transport is not None and self.session and self.session.ssl is None:
            # Closed amid a STARTTLS handshake: asyncio never tells the protocol this connection
            # is lost (it was not connected to the TLS layer yet), so count it closed here.
            self.owner._closed(self)


class _Controller(Controller):
    def __init__(self, owner: SmtpServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)

    def factory(self) -> SMTP:
        # One session per accepted TCP connection, before any TLS handshake.
        self.handler.owner._accepted()
        return _RecordingSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the real port before Controller connects to it.
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]
