"""The SMTP layer against real SMTP servers (aiosmtpd on 127.0.0.1): the probe and the pool."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from tests.smtp_servers import (
    DROP,
    Answer,
    SmtpServer,
    Tls,
    closed_port,
    plain_auth_password,
    silent_port,
)
from worker.errors import SmtpPermanentError, SmtpTransientError
from worker.mail import ProbeResult, Relay, SmtpPool, probe, ticket_email

USER, PASSWORD = "relay-user", "correct horse battery staple"
SENDER = "alerts@example.com"
RECIPIENTS = ["ops@example.com", "oncall@example.org"]


def relay_to(srv: SmtpServer, **options: Any) -> Relay:
    """Settings for `srv`; TLS certificates are self-signed, so not verified unless asked."""
    fields: dict[str, Any] = {"reject_unauthorized": False, "timeout": 5.0}
    if srv.auth is not None:
        fields |= {"username": srv.auth[0], "password": srv.auth[1]}
    if srv.tls == "implicit":
        fields["secure"] = True
    return Relay(host=srv.host, port=srv.port, **(fields | options))


def an_email(n: int = 0) -> EmailMessage:
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

        assert ProbeResult(False, "auth", "535 no: ********") == result

    async def test_fails_at_auth_when_the_server_offers_auth_only_over_tls(self) -> None:
        async with SmtpServer(tls="starttls", auth=(USER, PASSWORD)) as srv:
            result = await probe(relay_to(srv, starttls="never"))

        assert (result.ok, result.stage) == (False, "auth"), result.message

    async def test_fails_at_connect_on_a_closed_port(self) -> None:
        result = await probe(Relay("127.0.0.1", closed_port(), timeout=5.0))

        assert ProbeResult(False, "connect", "connection refused") == result

    async def test_fails_at_connect_when_the_server_never_answers(self) -> None:
        with silent_port() as port:
            result = await probe(Relay("127.0.0.1", port, timeout=0.2))

        assert ProbeResult(False, "connect", "timed out") == result


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

    async def test_delivered_email_keeps_its_headers(self) -> None:
        sent = an_email(7)
        async with SmtpServer(tls="starttls", auth=(USER, PASSWORD)) as srv, SmtpPool() as pool:
            await pool.send(relay_to(srv), sent, SENDER, RECIPIENTS)
            [received] = await srv.wait_for(1)

        headers = ["From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "X-Ticket-SID"]
        assert {h: received.message[h] for h in headers} == {h: sent[h] for h in headers}

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
            await asyncio.gather(*(send(pool, relay, n) for n in range(500)))
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

        assert str(caught.value) == "535 no: ********"

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
            with pytest.raises(SmtpTransientError, match=r"^connection refused$"):
                await send(pool, Relay("127.0.0.1", closed_port(), timeout=5.0))

    async def test_timeout_is_transient(self) -> None:
        with silent_port() as port:
            async with SmtpPool() as pool:
                with pytest.raises(SmtpTransientError, match=r"^timed out$"):
                    await send(pool, Relay("127.0.0.1", port, timeout=0.2))

    async def test_errors_chain_the_library_error(self) -> None:
        async with SmtpPool() as pool:
            with pytest.raises(SmtpTransientError) as caught:
                await send(pool, Relay("127.0.0.1", closed_port(), timeout=5.0))

        assert isinstance(caught.value.__cause__, OSError)
