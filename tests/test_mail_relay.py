"""The SMTP layer against real SMTP servers (aiosmtpd on 127.0.0.1): the probe and the pool."""

from __future__ import annotations

import asyncio
import itertools
import traceback
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from ipaddress import ip_network
from typing import Any

import pytest

from tests.support.smtp_servers import (
    DROP,
    HTTP_RESPONSE,
    MARIADB_GREETING,
    NATS_BANNER,
    Answer,
    SmtpServer,
    Tls,
    closed_port,
    multiline,
    password_echoes,
    password_leaks,
    plain_auth_password,
    silent_port,
    tcp_peer,
)
from worker.errors import SmtpPermanentError, SmtpTransientError
from worker.mail import ProbeResult, Relay, SmtpPool, probe, ticket_email
from worker.mail.relay import NO_CONNECTION, NOT_SMTP, WITHHELD

USER, PASSWORD = "relay-user", "correct horse battery staple"
# The test servers listen on loopback, which the relay address policy denies unless allowed.
LOCAL = (ip_network("127.0.0.0/8"),)
SENDER = "alerts@example.com"
RECIPIENTS = ["ops@example.com", "oncall@example.org"]


def relay_to(srv: SmtpServer, **options: Any) -> Relay:
    """Settings for `srv`; TLS certificates are self-signed, so not verified unless asked."""
    fields: dict[str, Any] = {"reject_unauthorized": False, "timeout": 5.0, "allow": LOCAL}
    if srv.auth is not None:
        fields |= {"username": srv.auth[0], "password": srv.auth[1]}
    if srv.tls == "implicit":
        fields["secure"] = True
    return Relay(host=srv.host, port=srv.port, **(fields | options))


def local(port: int, **options: Any) -> Relay:
    """A relay on this machine that is no test SMTP server."""
    return Relay("127.0.0.1", port, **({"timeout": 5.0, "allow": LOCAL} | options))


def an_email(n: int = 0) -> bytes:
    return ticket_email(
        sid=f"sid{n:04d}aaaaaaaaaaaaaaaa",
        domain="example.com",
        sender=SENDER,
        recipients=RECIPIENTS,
        subject_prefix="[ops]",
        title=f"Disk full #{n}",
        body="/var is at 99%",
        severity="high",
        created_at=datetime(2024, 5, 17, 8, 30, tzinfo=UTC),
    )


async def send(pool: SmtpPool, relay: Relay, n: int = 0) -> None:
    await pool.send(relay, an_email(n), SENDER, RECIPIENTS)


def test_relay_repr_hides_the_password() -> None:
    relay = Relay(host="smtp.example.com", port=587, username=USER, password=PASSWORD)

    assert PASSWORD not in repr(relay)


def test_relay_is_hashable_by_value() -> None:
    assert len({Relay("smtp.example.com", 25), Relay("smtp.example.com", 25)}) == 1


class TestProbe:
    @pytest.mark.parametrize(
        ("tls", "auth", "options"),
        [
            ("none", None, {}),
            ("none", (USER, PASSWORD), {}),
            ("starttls", (USER, PASSWORD), {"starttls": "auto"}),
            ("starttls", (USER, PASSWORD), {"starttls": "always"}),
            ("starttls", None, {"starttls": "never"}),
            ("implicit", (USER, PASSWORD), {}),
        ],
        ids=[
            "plain",
            "plain-login",
            "starttls-auto-login",
            "starttls-always-login",
            "starttls-never",
            "implicit-tls-login",
        ],
    )
    async def test_reaches_done(
        self, tls: Tls, auth: tuple[str, str] | None, options: dict[str, Any]
    ) -> None:
        async with SmtpServer(tls=tls, auth=auth) as srv:
            result = await probe(relay_to(srv, **options))

        assert (result.ok, result.stage) == (True, "done"), result.message

    @pytest.mark.parametrize(
        ("tls", "options", "expected"),
        [
            ("none", {}, "connected, without TLS"),
            ("starttls", {"starttls": "auto"}, "connected, over TLS, logged in"),
            ("implicit", {}, "connected, over TLS, logged in"),
        ],
        ids=["plain", "starttls", "implicit-tls"],
    )
    async def test_done_says_whether_the_connection_is_encrypted(
        self, tls: Tls, options: dict[str, Any], expected: str
    ) -> None:
        async with SmtpServer(tls=tls, auth=None if tls == "none" else (USER, PASSWORD)) as srv:
            result = await probe(relay_to(srv, **options))

        assert expected == result.message

    async def test_sends_no_mail_and_quits(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv:
            await probe(relay_to(srv))
            await srv.wait_closed()

            assert (srv.messages, srv.connections) == ([], 1)

    async def test_fails_at_tls_when_starttls_is_required_but_not_offered(self) -> None:
        async with SmtpServer(tls="none") as srv:
            result = await probe(relay_to(srv, starttls="always"))

        assert ProbeResult(False, "tls", "the server does not offer STARTTLS") == result

    @pytest.mark.parametrize("tls", ["starttls", "implicit"], ids=str)
    async def test_fails_at_tls_on_an_untrusted_certificate(self, tls: Tls) -> None:
        async with SmtpServer(tls=tls) as srv:
            result = await probe(relay_to(srv, reject_unauthorized=True))

        assert (result.ok, result.stage) == (False, "tls")
        assert result.message.startswith("certificate verify failed"), result.message

    async def test_fails_at_tls_when_the_server_does_not_speak_tls(self) -> None:
        async with SmtpServer(tls="none") as srv:
            result = await probe(relay_to(srv, secure=True))

        assert (result.ok, result.stage) == (False, "tls"), result.message

    async def test_fails_at_auth_with_a_wrong_password(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv:
            result = await probe(relay_to(srv, password="wrong password"))

        assert (result.ok, result.stage) == (False, "auth")
        assert result.message.startswith("535"), result.message
        assert "wrong password" not in result.message

    async def test_auth_failure_never_shows_the_password_even_if_the_server_echoes_it(
        self,
    ) -> None:
        echo = {"AUTH": itertools.repeat(lambda arg: f"535 no: {plain_auth_password(arg)}")}
        server = SmtpServer(auth=(USER, PASSWORD), auth_mechanisms=["PLAIN"], script=echo)
        async with server as srv:
            result = await probe(relay_to(srv))

        assert ProbeResult(False, "auth", f"535 {WITHHELD}") == result

    async def test_fails_at_auth_when_the_server_offers_auth_only_over_tls(self) -> None:
        async with SmtpServer(tls="starttls", auth=(USER, PASSWORD)) as srv:
            result = await probe(relay_to(srv, starttls="never"))

        assert (result.ok, result.stage) == (False, "auth"), result.message

    async def test_fails_at_connect_on_a_closed_port(self) -> None:
        result = await probe(Relay("127.0.0.1", closed_port(), timeout=5.0, allow=LOCAL))

        assert ProbeResult(False, "connect", NO_CONNECTION) == result

    async def test_fails_at_connect_when_the_server_never_answers(self) -> None:
        with silent_port() as port:
            result = await probe(Relay("127.0.0.1", port, timeout=0.2, allow=LOCAL))

        assert ProbeResult(False, "connect", NO_CONNECTION) == result

    @pytest.mark.parametrize("secure", [False, True], ids=["plain", "implicit-tls"])
    async def test_every_way_of_not_connecting_says_the_same(self, secure: bool) -> None:
        # Refused, reset, closed at once, accepted and silent, never accepted: a probe must not
        # tell them apart, or it maps the ports of whatever host it is pointed at.
        results = {}
        results["refused"] = await probe(local(closed_port(), secure=secure))
        for behaviour in ("close", "reset", "silent"):
            async with tcp_peer(behaviour) as port:
                results[behaviour] = await probe(local(port, secure=secure, timeout=0.3))
        with silent_port() as port:
            results["backlog"] = await probe(local(port, secure=secure, timeout=0.3))

        assert {cause: ProbeResult(False, "connect", NO_CONNECTION) for cause in results} == results

    @pytest.mark.parametrize(
        "greeting",
        [NATS_BANNER, MARIADB_GREETING, HTTP_RESPONSE, b"\x00\x01\x02\xff\xfe\n", b"200 hi\r\n"],
        ids=["nats", "mariadb", "http", "binary", "not-220"],
    )
    async def test_a_peer_that_is_not_an_smtp_server_fails_at_connect_unquoted(
        self, greeting: bytes
    ) -> None:
        async with tcp_peer(greeting) as port:
            result = await probe(local(port))

        assert ProbeResult(False, "connect", NOT_SMTP) == result

    async def test_an_smtp_server_turning_us_away_is_quoted(self) -> None:
        async with tcp_peer(b"554 5.3.2 no service\x00 for you\r\n") as port:
            result = await probe(local(port))

        assert ProbeResult(False, "connect", "554 5.3.2 no service for you") == result


class TestProbeSender:
    """The "sender" stage: MAIL FROM and RCPT TO the settings' own address, then RSET."""

    @pytest.mark.parametrize(
        ("tls", "auth"),
        [("none", None), ("starttls", (USER, PASSWORD)), ("implicit", (USER, PASSWORD))],
        ids=["plain", "starttls-login", "implicit-tls-login"],
    )
    async def test_reaches_done_when_the_relay_takes_the_sender(
        self, tls: Tls, auth: tuple[str, str] | None
    ) -> None:
        async with SmtpServer(tls=tls, auth=auth) as srv:
            result = await probe(relay_to(srv, sender=SENDER))
            await srv.wait_closed()

            assert (result.ok, result.stage) == (True, "done"), result.message
            assert result.message.endswith("sender accepted")
            assert [] == srv.messages

    @pytest.mark.parametrize(
        ("command", "reply"),
        [
            ("RCPT", "550 5.7.1 relaying denied"),
            ("MAIL", "553 5.7.1 sender not owned by this login"),
        ],
        ids=["will-not-relay", "refuses-the-sender"],
    )
    async def test_fails_at_sender_when_the_relay_says_no(self, command: str, reply: str) -> None:
        async with SmtpServer(script={command: [reply]}) as srv:
            result = await probe(relay_to(srv, sender=SENDER))

        assert ProbeResult(False, "sender", reply) == result

    async def test_fails_at_sender_when_the_relay_wants_a_login_we_do_not_give(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv:
            result = await probe(relay_to(srv, username=None, password=None, sender=SENDER))

        assert ProbeResult(False, "sender", "530 5.7.0 Authentication required") == result

    async def test_the_relay_can_take_an_email_after_a_probe_on_it(self) -> None:
        # RSET then QUIT: the probe leaves no transaction open behind it.
        async with SmtpServer() as srv, SmtpPool() as pool:
            assert (await probe(relay_to(srv, sender=SENDER))).ok
            await send(pool, relay_to(srv))

            assert 1 == len(await srv.wait_for(1))


class TestPoolDelivery:
    @pytest.mark.parametrize(
        ("tls", "options"),
        [
            ("none", {}),
            ("starttls", {"starttls": "always"}),
            ("implicit", {}),
        ],
        ids=["plain", "starttls", "implicit-tls"],
    )
    async def test_delivers_after_login(self, tls: Tls, options: dict[str, Any]) -> None:
        async with SmtpServer(tls=tls, auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv, **options))
            [received] = await srv.wait_for(1)

        assert (received.sender, received.recipients) == (SENDER, RECIPIENTS)

    async def test_delivered_email_is_the_composed_bytes(self) -> None:
        sent = an_email(7)
        async with SmtpServer(tls="starttls", auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            await pool.send(relay_to(srv), sent, SENDER, RECIPIENTS)
            [received] = await srv.wait_for(1)

        assert received.raw == sent

    async def test_envelope_not_headers_decides_the_recipients(self) -> None:
        async with SmtpServer() as srv, SmtpPool() as pool:
            await pool.send(relay_to(srv), an_email(), SENDER, ["only@example.net"])
            [received] = await srv.wait_for(1)

        assert received.recipients == ["only@example.net"]

    async def test_reuses_one_connection_for_sequential_emails(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            for n in range(5):
                await send(pool, relay_to(srv), n)

            assert srv.connections == 1

    async def test_a_burst_of_500_opens_only_a_handful_of_connections(self) -> None:
        pool = SmtpPool(max_per_relay=4, max_messages_per_connection=1000)
        async with SmtpServer(auth=(USER, PASSWORD)) as srv, pool:
            relay = relay_to(srv)
            # Composed first: composing 500 emails inside the burst holds the loop for seconds
            # on a busy machine, and the first connections' timeouts run meanwhile.
            emails = [an_email(n) for n in range(500)]
            await asyncio.gather(*(pool.send(relay, email, SENDER, RECIPIENTS) for email in emails))
            received = await srv.wait_for(500)

            assert len(received) == 500
            assert srv.connections <= 4

    async def test_concurrent_sends_beyond_the_limit_wait_for_a_connection(self) -> None:
        async with SmtpServer() as srv, SmtpPool(max_per_relay=2) as pool:
            relay = relay_to(srv)
            await asyncio.gather(*(send(pool, relay, n) for n in range(20)))

            assert srv.connections <= 2

    async def test_each_relay_gets_its_own_connections(self) -> None:
        async with SmtpServer() as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv))
            await send(pool, relay_to(srv, timeout=6.0))

            assert srv.connections == 2

    async def test_retires_a_connection_after_its_message_quota(self) -> None:
        async with SmtpServer() as srv, SmtpPool(max_messages_per_connection=2) as pool:
            for n in range(5):
                await send(pool, relay_to(srv), n)

            assert srv.connections == 3

    async def test_close_quits_idle_connections(self) -> None:
        async with SmtpServer() as srv:
            pool = SmtpPool()
            await send(pool, relay_to(srv))

            await pool.close()

            await srv.wait_closed()

    async def test_a_closed_pool_refuses_to_send(self) -> None:
        pool = SmtpPool()
        await pool.close()

        with pytest.raises(RuntimeError, match="closed"):
            await send(pool, Relay("127.0.0.1", closed_port()))


class TestPoolConnectionLoss:
    async def test_survives_the_server_dropping_an_idle_connection(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv), 1)
            srv.drop_connections()
            await srv.wait_closed()

            await send(pool, relay_to(srv), 2)

            assert (len(await srv.wait_for(2)), srv.connections) == (2, 2)

    async def test_survives_a_reused_connection_dying_on_first_use(self) -> None:
        # The second MAIL of the run hangs up: the idle connection looked alive but was not.
        async with SmtpServer(script={"MAIL": [None, DROP]}) as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv), 1)

            await send(pool, relay_to(srv), 2)

            assert (len(await srv.wait_for(2)), srv.connections) == (2, 2)

    async def test_survives_a_421_on_a_reused_connection(self) -> None:
        script = {"MAIL": [None, "421 4.4.2 idle too long, closing"]}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv), 1)

            await send(pool, relay_to(srv), 2)

            assert len(await srv.wait_for(2)) == 2

    async def test_replaces_a_dead_connection_only_once(self) -> None:
        script = {"MAIL": [None, DROP, DROP]}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            await send(pool, relay_to(srv), 1)

            with pytest.raises(SmtpTransientError, match="connection closed by the server"):
                await send(pool, relay_to(srv), 2)

    async def test_closes_connections_idle_longer_than_the_idle_timeout(self) -> None:
        async with SmtpServer() as srv, SmtpPool(idle_timeout=0.05) as pool:
            await send(pool, relay_to(srv), 1)
            await asyncio.sleep(0.1)

            await send(pool, relay_to(srv), 2)

            assert srv.connections == 2

    async def test_does_not_reuse_a_connection_after_an_error(self) -> None:
        async with SmtpServer(script={"DATA": ["451 4.3.0 try again later"]}) as srv:
            async with SmtpPool() as pool:
                with pytest.raises(SmtpTransientError):
                    await send(pool, relay_to(srv), 1)

                await send(pool, relay_to(srv), 2)

            assert (len(await srv.wait_for(1)), srv.connections) == (1, 2)


TRANSIENT_SCRIPTS: list[tuple[Mapping[str, Iterable[Answer]], str]] = [
    ({"DATA": ["451 4.3.0 try again later"]}, "451 4.3.0 try again later"),
    ({"MAIL": ["452 4.3.1 insufficient storage"]}, "452 4.3.1 insufficient storage"),
    ({"RCPT": [None, "450 4.2.0 mailbox busy"]}, "450 recipient refused"),
    ({"DATA": [DROP]}, "connection closed by the server"),
    ({"RCPT": [DROP]}, "connection closed by the server"),
]
PERMANENT_SCRIPTS: list[tuple[Mapping[str, Iterable[Answer]], str]] = [
    ({"DATA": itertools.repeat("550 5.7.1 rejected as spam")}, "550 5.7.1 rejected as spam"),
    ({"MAIL": ["553 5.1.8 sender address rejected"]}, "553 5.1.8 sender address rejected"),
    ({"RCPT": [None, "550 5.1.1 no such user"]}, "550 recipient refused"),
    (
        {"RCPT": ["450 4.2.0 mailbox busy", "550 5.1.1 no such user"]},
        "550 recipient refused",
    ),
]


class TestPoolErrors:
    @pytest.mark.parametrize(
        ("script", "expected"),
        TRANSIENT_SCRIPTS,
        ids=["451-data", "452-mail", "450-one-rcpt", "drop-in-data", "drop-in-rcpt"],
    )
    async def test_transient(self, script: Mapping[str, Iterable[Answer]], expected: str) -> None:
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpTransientError) as caught:
                await send(pool, relay_to(srv))

        assert str(caught.value).startswith(expected), caught.value

    @pytest.mark.parametrize(
        ("script", "expected"),
        PERMANENT_SCRIPTS,
        ids=["550-data", "553-mail", "550-one-rcpt", "550-and-450-rcpt"],
    )
    async def test_permanent(self, script: Mapping[str, Iterable[Answer]], expected: str) -> None:
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError) as caught:
                await send(pool, relay_to(srv))

        assert str(caught.value).startswith(expected), caught.value

    async def test_refused_recipient_names_it(self) -> None:
        script = {"RCPT": [None, "550 5.1.1 no such user"]}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError, match=r"oncall@example\.org: 550 5\.1\.1"):
                await send(pool, relay_to(srv))

    async def test_a_refused_recipient_means_nobody_gets_the_email(self) -> None:
        async with SmtpServer(script={"RCPT": [None, "550 5.1.1 no such user"]}) as srv:
            async with SmtpPool() as pool:
                with pytest.raises(SmtpPermanentError):
                    await send(pool, relay_to(srv))
                await send(pool, relay_to(srv), 2)  # the server is fine otherwise

            assert [r.message["Subject"][6:] for r in srv.messages] == ["Disk full #2"]

    async def test_451_then_accepted_on_retry(self) -> None:
        script = {"DATA": ["451 4.3.0 try again later"] * 2}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            outcomes = []
            for _ in range(3):
                try:
                    await send(pool, relay_to(srv))
                    outcomes.append("sent")
                except SmtpTransientError:
                    outcomes.append("transient")

        assert outcomes == ["transient", "transient", "sent"]

    async def test_wrong_login_is_permanent_and_hides_the_password(self) -> None:
        async with SmtpServer(auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError, match=r"^535") as caught:
                await send(pool, relay_to(srv, password="wrong password"))

        assert "wrong password" not in str(caught.value)

    async def test_login_error_never_shows_the_password_even_if_the_server_echoes_it(
        self,
    ) -> None:
        echo = {"AUTH": itertools.repeat(lambda arg: f"535 no: {plain_auth_password(arg)}")}
        server = SmtpServer(auth=(USER, PASSWORD), auth_mechanisms=["PLAIN"], script=echo)
        async with server as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError) as caught:
                await send(pool, relay_to(srv))

        assert str(caught.value) == f"535 {WITHHELD}"

    async def test_454_on_login_is_transient(self) -> None:
        script = {"AUTH": itertools.repeat("454 4.7.0 temporary authentication failure")}
        async with SmtpServer(auth=(USER, PASSWORD), script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpTransientError, match=r"^454"):
                await send(pool, relay_to(srv))

    async def test_starttls_required_but_not_offered_is_permanent(self) -> None:
        async with SmtpServer(tls="none") as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError, match="does not offer STARTTLS"):
                await send(pool, relay_to(srv, starttls="always"))

    @pytest.mark.parametrize("tls", ["starttls", "implicit"], ids=str)
    async def test_untrusted_certificate_is_permanent(self, tls: Tls) -> None:
        async with SmtpServer(tls=tls) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError, match=r"^certificate verify failed"):
                await send(pool, relay_to(srv, reject_unauthorized=True))

    async def test_connection_refused_is_transient(self) -> None:
        async with SmtpPool() as pool:
            with pytest.raises(SmtpTransientError) as caught:
                await send(pool, Relay("127.0.0.1", closed_port(), timeout=5.0, allow=LOCAL))

        assert NO_CONNECTION == str(caught.value)

    async def test_timeout_is_transient(self) -> None:
        with silent_port() as port:
            async with SmtpPool() as pool:
                with pytest.raises(SmtpTransientError) as caught:
                    await send(pool, Relay("127.0.0.1", port, timeout=0.2, allow=LOCAL))

        assert NO_CONNECTION == str(caught.value)

    async def test_errors_chain_the_library_error(self) -> None:
        async with SmtpPool() as pool:
            with pytest.raises(SmtpTransientError) as caught:
                await send(pool, Relay("127.0.0.1", closed_port(), timeout=5.0, allow=LOCAL))

        assert isinstance(caught.value.__cause__, OSError)


ECHOED = "r3lay?>Pa55~w0rd/+="  # base64 of it holds "+" and "/" at every alignment
ECHOES = password_echoes(USER, ECHOED)


def leaked(text: str) -> list[str]:
    return password_leaks(text, USER, ECHOED)


class TestRelayTexts:
    """What the relay says is quoted as clean, bounded SMTP reply text, and never the password."""

    @pytest.mark.parametrize("stage", ["AUTH", "RCPT"])
    async def test_probe_withholds_a_reply_quoting_the_password(self, stage: str) -> None:
        script = {stage: [multiline(535 if stage == "AUTH" else 550, e) for e in ECHOES.values()]}
        server = SmtpServer(auth=(USER, ECHOED), auth_mechanisms=["PLAIN"], script=script)
        async with server as srv:
            results = {name: await probe(relay_to(srv, sender=SENDER)) for name in ECHOES}

        expected = ProbeResult(False, "auth", f"535 {WITHHELD}")
        if stage == "RCPT":
            expected = ProbeResult(False, "sender", f"550 {WITHHELD}")
        assert {name: expected for name in ECHOES} == results

    async def test_probe_withholds_an_auth_failure_echoing_the_auth_plain_argument(self) -> None:
        echo = {"AUTH": itertools.repeat(lambda argument: f"535 5.7.8 no: {argument}")}
        server = SmtpServer(auth=(USER, ECHOED), auth_mechanisms=["PLAIN"], script=echo)
        async with server as srv:
            result = await probe(relay_to(srv))

        assert ProbeResult(False, "auth", f"535 {WITHHELD}") == result

    @pytest.mark.parametrize("stage", ["AUTH", "RCPT", "DATA"])
    async def test_pool_withholds_a_reply_quoting_the_password(self, stage: str) -> None:
        script = {stage: [multiline(554, echo) for echo in ECHOES.values()]}
        server = SmtpServer(auth=(USER, ECHOED), auth_mechanisms=["PLAIN"], script=script)
        messages = {}
        async with server as srv, SmtpPool() as pool:
            for name in ECHOES:
                with pytest.raises(SmtpPermanentError) as caught:
                    await pool.send(relay_to(srv), an_email(), SENDER, ["ops@example.com"])
                messages[name] = str(caught.value)
                # Nothing of the reply rides along in the error's traceback either.
                rendered = "".join(traceback.format_exception(caught.value))
                assert [] == leaked(rendered), name

        assert {name: f"554 {WITHHELD}" for name in ECHOES} == messages

    def test_the_leak_check_sees_every_echo(self) -> None:
        # The checks above would pass vacuously if `leaked` could not find the echoes.
        assert all(leaked(echo) for echo in ECHOES.values())

    async def test_a_reply_without_the_password_is_quoted(self) -> None:
        script = {"RCPT": ["550 5.1.1 <ops@example.com>: no such user here"]}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError) as caught:
                await pool.send(relay_to(srv), an_email(), SENDER, ["ops@example.com"])

        reason = "550 5.1.1 <ops@example.com>: no such user here"
        assert f"550 recipient refused (ops@example.com: {reason})" == str(caught.value)

    @pytest.mark.parametrize(
        ("reply", "quoted"),
        [
            ("550 d\x00\x00\x00", "550 d"),
            ("550 5.7.1 \x1b[31mred\x1b[0m alert\x07", "550 5.7.1 [31mred[0m alert"),
            ("550 5.7.1 left\u202eright\u2066", "550 5.7.1 leftright"),
            ("550-first line\r\n550-second\tline\r\n550 third", "550 first line second line third"),
        ],
        ids=["nul", "escape-and-bell", "bidi", "multi-line"],
    )
    async def test_control_characters_are_removed(self, reply: str, quoted: str) -> None:
        async with SmtpServer(script={"DATA": [reply]}) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError) as caught:
                await send(pool, relay_to(srv))

        assert quoted == str(caught.value)

    async def test_undecodable_bytes_are_removed(self) -> None:
        async with tcp_peer(b"554 5.3.2 caf\xe9 \xff\xfe closed\r\n") as port:
            result = await probe(local(port))

        assert ProbeResult(False, "connect", "554 5.3.2 caf closed") == result

    async def test_a_long_reply_is_cut_short(self) -> None:
        script = {"DATA": ["550 5.7.1 " + "spam " * 1000]}
        async with SmtpServer(script=script) as srv, SmtpPool() as pool:
            with pytest.raises(SmtpPermanentError) as caught:
                await send(pool, relay_to(srv))

        message = str(caught.value)
        assert (len(message), message[:14], message[-1]) == (300, "550 5.7.1 spam", "…")


class TestPoolIdleConnections:
    def test_idle_connections_close_after_30_seconds_by_default(self) -> None:
        assert 30 == SmtpPool().idle_timeout

    async def test_the_timer_closes_an_idle_connection_without_another_send(self) -> None:
        async with SmtpServer() as srv, SmtpPool(idle_timeout=0.3) as pool:
            await send(pool, relay_to(srv))
            assert 1 == srv.open_connections

            await srv.wait_closed(timeout=5)

            assert 0 == pool.connections

    async def test_a_connection_used_again_in_time_stays_open(self) -> None:
        async with SmtpServer() as srv, SmtpPool(idle_timeout=3.0) as pool:
            for n in range(4):
                await send(pool, relay_to(srv), n)
                await asyncio.sleep(1.0)

            assert (srv.connections, srv.open_connections) == (1, 1)
            await srv.wait_closed(timeout=5)

    async def test_each_idle_connection_closes_on_its_own_time(self) -> None:
        async with SmtpServer() as old, SmtpServer() as new, SmtpPool(idle_timeout=2.0) as pool:
            await send(pool, relay_to(old))
            await asyncio.sleep(1.0)
            await send(pool, relay_to(new))

            await old.wait_closed(timeout=5)
            still_open = new.open_connections
            await new.wait_closed(timeout=5)

        assert 1 == still_open

    async def test_closing_the_pool_stops_the_timer(self) -> None:
        async with SmtpServer() as srv:
            pool = SmtpPool()
            await send(pool, relay_to(srv))
            assert reapers()

            await pool.close()

            assert [] == reapers()
            await srv.wait_closed()


def reapers() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "smtp-pool-reaper"]


class TestPoolCap:
    async def test_a_send_to_another_relay_closes_the_longest_idle_connection(self) -> None:
        async with SmtpServer() as srv, SmtpPool(max_connections=2) as pool:
            relays = [relay_to(srv, timeout=5.0 + n) for n in range(3)]  # three relays, one server
            for relay in relays:
                await send(pool, relay)
            await eventually(lambda: srv.open_connections <= 2)
            open_after_three = srv.open_connections

            await send(pool, relays[0])  # its connection was the one closed

            assert (open_after_three, srv.connections, pool.connections) == (2, 4, 2)

    async def test_concurrent_sends_to_many_relays_stay_under_the_cap(self) -> None:
        peak = 0

        async def watch(pool: SmtpPool) -> None:
            nonlocal peak
            while True:
                peak = max(peak, pool.connections)
                await asyncio.sleep(0)

        async with SmtpServer() as srv, SmtpPool(max_connections=3, max_per_relay=2) as pool:
            relays = [relay_to(srv, timeout=5.0 + n) for n in range(5)]
            watcher = asyncio.create_task(watch(pool))
            try:
                await asyncio.gather(
                    *(send(pool, relays[n % 5], n) for n in range(60)),
                )
            finally:
                watcher.cancel()
            received = await srv.wait_for(60)

        assert (len(received), peak) == (60, 3)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "still not true"
        await asyncio.sleep(0.01)
