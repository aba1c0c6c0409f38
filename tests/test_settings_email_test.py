"""settings.email.test through the broker against real SMTP servers (aiosmtpd) and TCP servers
of the tests' own that are not SMTP servers.

The probe connects with the domain's settings, upgrades to TLS and logs in as they say, offers
the settings' `from` as sender and recipient, reports the stage it reached, and sends no mail.
"""

from __future__ import annotations

import itertools
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.support.environment import Env
from tests.support.logs import log_lines
from tests.support.payloads import email_settings, relay_options
from tests.support.smtp_servers import (
    HTTP_RESPONSE,
    MARIADB_GREETING,
    NATS_BANNER,
    SmtpServer,
    Tls,
    closed_port,
    echoing_answers,
    password_leaks,
    silent_port,
    tcp_peer,
)
from tests.support.tenants import unique_domain
from worker.handlers.settings import relay_of
from worker.store.tables import email_settings as email_settings_table

RELAY_USER, RELAY_PASS = "relay-user", "probe-pass-51c0de"


async def probe(
    env: Env, owner: dict[str, str], domain: str, options: dict[str, Any]
) -> dict[str, Any]:
    """Configures `domain` with `options` and returns the reply data of settings.email.test."""
    await env.client.ok("settings.email.create", owner, email_settings(domain, **options))
    return await env.client.ok("settings.email.test", owner, {"domain": domain})


@pytest.mark.parametrize(
    ("tls", "auth"),
    [
        ("none", None),
        ("none", (RELAY_USER, RELAY_PASS)),
        ("starttls", None),
        ("starttls", (RELAY_USER, RELAY_PASS)),
        ("implicit", None),
        ("implicit", (RELAY_USER, RELAY_PASS)),
    ],
    ids=["plain", "plain-login", "starttls", "starttls-login", "implicit-tls", "implicit-login"],
)
async def test_reachable_relay_is_ok_and_done(
    env: Env, owner: dict[str, str], domain: str, tls: Tls, auth: tuple[str, str] | None
):
    async with SmtpServer(tls=tls, auth=auth) as srv:
        result = await probe(env, owner, domain, relay_options(srv))

    assert (result["ok"], result["stage"]) == (True, "done")


@pytest.mark.parametrize(
    ("tls", "said"),
    [("none", "without TLS"), ("starttls", "over TLS"), ("implicit", "over TLS")],
    ids=["plain", "starttls", "implicit-tls"],
)
async def test_done_message_says_whether_tls_was_used(
    env: Env, owner: dict[str, str], domain: str, tls: Tls, said: str
):
    async with SmtpServer(tls=tls) as srv:
        result = await probe(env, owner, domain, relay_options(srv))

    assert said in result["message"]


async def test_starttls_never_stays_in_clear_text(env: Env, owner: dict[str, str], domain: str):
    async with SmtpServer(tls="starttls") as srv:
        result = await probe(env, owner, domain, relay_options(srv, starttls="never"))

    assert (result["ok"], result["stage"]) == (True, "done")
    assert "without TLS" in result["message"]


async def test_starttls_always_fails_at_tls_without_the_offer(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer(tls="none") as srv:
        result = await probe(env, owner, domain, relay_options(srv, starttls="always"))

    assert (result["ok"], result["stage"]) == (False, "tls")


@pytest.mark.parametrize("tls", ["starttls", "implicit"], ids=["starttls", "implicit-tls"])
async def test_self_signed_certificate_fails_at_tls_when_verified(
    env: Env, owner: dict[str, str], domain: str, tls: Tls
):
    async with SmtpServer(tls=tls) as srv:
        options = relay_options(srv, tls={"rejectUnauthorized": True})
        result = await probe(env, owner, domain, options)

    assert (result["ok"], result["stage"]) == (False, "tls")
    assert "certificate" in result["message"]


@pytest.mark.parametrize("tls", ["none", "starttls"], ids=["plain", "starttls"])
async def test_wrong_login_fails_at_auth(env: Env, owner: dict[str, str], domain: str, tls: Tls):
    wrong = "wrong-relay-pass-9d2e"
    async with SmtpServer(tls=tls, auth=(RELAY_USER, RELAY_PASS)) as srv:
        options = relay_options(srv, auth={"user": RELAY_USER, "pass": wrong})
        result = await probe(env, owner, domain, options)

    assert (result["ok"], result["stage"]) == (False, "auth")
    assert wrong not in result["message"]


async def test_closed_port_fails_at_connect(env: Env, owner: dict[str, str], domain: str):
    options = {"host": "127.0.0.1", "port": closed_port(), "timeout": 5}

    result = await probe(env, owner, domain, options)

    assert (result["ok"], result["stage"]) == (False, "connect")
    assert result["message"]


async def test_probe_sends_no_mail(env: Env, owner: dict[str, str], domain: str):
    async with SmtpServer(auth=(RELAY_USER, RELAY_PASS)) as srv:
        result = await probe(env, owner, domain, relay_options(srv))

        assert result["ok"]
        assert srv.connections == 1
        assert srv.messages == []


async def test_probe_reply_has_exactly_ok_stage_and_message(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer() as srv:
        result = await probe(env, owner, domain, relay_options(srv))

    assert set(result) == {"ok", "stage", "message"}


async def test_failed_probe_is_a_successful_command(env: Env, owner: dict[str, str], domain: str):
    await env.client.ok(
        "settings.email.create",
        owner,
        email_settings(domain, host="127.0.0.1", port=closed_port(), timeout=5),
    )

    reply = await env.client.call("settings.email.test", owner, {"domain": domain})

    assert (reply["status"], reply["data"]["ok"]) == ("success", False)


async def test_probe_of_a_domain_without_settings_is_not_found(
    env: Env, owner: dict[str, str], domain: str
):
    reply = await env.client.call("settings.email.test", owner, {"domain": domain})

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [domain]}


# --- the sender stage ---------------------------------------------------------------------------


async def test_probe_offers_the_from_address_then_resets(
    env: Env, owner: dict[str, str], domain: str
):
    offered: list[tuple[str, str]] = []

    def record(command: str) -> Any:
        def answer(address: str) -> None:
            offered.append((command, address))

        return itertools.repeat(answer)

    async with SmtpServer(script={"MAIL": record("MAIL"), "RCPT": record("RCPT")}) as srv:
        result = await probe(env, owner, domain, relay_options(srv))

        assert [] == srv.messages
    assert {"ok": True, "stage": "done", "message": "connected, without TLS, sender accepted"} == (
        result
    )
    assert [("MAIL", f"alerts@{domain}"), ("RCPT", f"alerts@{domain}")] == offered


async def test_relay_refusing_to_relay_fails_at_sender(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer(script={"RCPT": ["550 5.7.1 Relaying denied"]}) as srv:
        result = await probe(env, owner, domain, relay_options(srv))

    assert {"ok": False, "stage": "sender", "message": "550 5.7.1 Relaying denied"} == result


async def test_relay_wanting_a_login_the_settings_lack_fails_at_sender(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer(auth=(RELAY_USER, RELAY_PASS)) as srv:
        options = relay_options(srv)
        del options["auth"]
        result = await probe(env, owner, domain, options)

    assert (result["ok"], result["stage"]) == (False, "sender")
    assert result["message"].startswith("530")


# --- peers that are not SMTP servers, and ports that do not answer ------------------------------


@pytest.mark.parametrize(
    ("greeting", "said"),
    [
        (NATS_BANNER, ["INFO", "nats", "2.10.7", "server_id"]),
        (MARIADB_GREETING, ["MariaDB", "10.11.6", "mysql_native_password"]),
        (HTTP_RESPONSE, ["HTTP", "400", "nginx"]),
    ],
    ids=["nats", "mariadb", "http"],
)
async def test_peer_that_is_not_an_smtp_server_fails_at_connect_unquoted(
    env: Env, owner: dict[str, str], domain: str, greeting: bytes, said: list[str]
):
    async with tcp_peer(greeting) as port:
        result = await probe(env, owner, domain, {"host": "127.0.0.1", "port": port})

    assert {"ok": False, "stage": "connect", "message": "not an SMTP server"} == result
    assert [] == [word for word in said if word.lower() in json.dumps(result).lower()]


async def test_refused_reset_closed_and_silent_ports_look_the_same(env: Env, owner: dict[str, str]):
    results = {}
    results["refused"] = await probe(
        env, owner, unique_domain(), {"host": "127.0.0.1", "port": closed_port(), "timeout": 1}
    )
    for behaviour in ("reset", "close", "silent"):
        async with tcp_peer(behaviour) as port:
            options = {"host": "127.0.0.1", "port": port, "timeout": 1}
            results[behaviour] = await probe(env, owner, unique_domain(), options)

    expected = {"ok": False, "stage": "connect", "message": "could not connect to an SMTP server"}
    assert {cause: expected for cause in results} == results


# --- the relay password in what the relay says --------------------------------------------------

ECHOED = "r3lay?>Pa55~w0rd/+="
WITHHELD = "the relay's reply was withheld: it quoted the password"


@pytest.mark.parametrize(
    ("command", "code", "stage"), [("AUTH", 535, "auth"), ("RCPT", 550, "sender")]
)
async def test_probe_never_quotes_the_relay_password(
    env: Env, owner: dict[str, str], domain: str, command: str, code: int, stage: str
):
    answers = echoing_answers(command, code, RELAY_USER, ECHOED)
    logged = len(log_lines())
    server = SmtpServer(
        auth=(RELAY_USER, ECHOED), auth_mechanisms=["PLAIN"], script={command: answers}
    )
    async with server as srv:
        await env.client.ok(
            "settings.email.create", owner, email_settings(domain, **relay_options(srv))
        )
        results = [
            await env.client.ok("settings.email.test", owner, {"domain": domain}) for _ in answers
        ]

    expected = {"ok": False, "stage": stage, "message": f"{code} {WITHHELD}"}
    assert [expected] * len(answers) == results
    seen = "\n".join([*log_lines(logged), *map(json.dumps, env.client.events)])
    assert [] == password_leaks(seen, RELAY_USER, ECHOED)


# --- options.timeout ----------------------------------------------------------------------------


async def test_stored_timeout_below_one_second_is_raised_to_one_at_use(
    env: Env, owner: dict[str, str], domain: str
):
    with silent_port() as port:
        await env.client.ok(
            "settings.email.create", owner, email_settings(domain, host="127.0.0.1", port=port)
        )
        # As stored before the contract bounded it.
        await store_timeout(env, domain, 0.01)
        started = time.monotonic()

        result = await env.client.ok("settings.email.test", owner, {"domain": domain})

    assert (result["stage"], result["ok"]) == ("connect", False)
    assert time.monotonic() - started >= 0.9


def test_stored_timeout_beyond_120_seconds_is_clamped_at_use():
    row = SimpleNamespace(
        sender="alerts@example.com",
        options={
            "host": "smtp.example.com",
            "port": 587,
            "secure": False,
            "starttls": "auto",
            "rejectUnauthorized": True,
            "auth_user": None,
            "timeout": 600,
        },
    )

    assert 120 == relay_of(row, None).timeout  # type: ignore[arg-type]


async def store_timeout(env: Env, domain: str, timeout: float) -> None:
    async with env.store.transaction() as conn:
        row = (
            await conn.execute(
                select(email_settings_table).where(email_settings_table.c.domain == domain)
            )
        ).one()
        await conn.execute(
            update(email_settings_table)
            .where(email_settings_table.c.id == row.id)
            .values(options={**row.options, "timeout": timeout})
        )
