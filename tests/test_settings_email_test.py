"""settings.email.test through the broker against real SMTP servers (aiosmtpd).

The probe connects with the domain's settings, upgrades to TLS and logs in as they say, reports
the stage it reached, and sends no mail.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Env
from tests.payloads import email_settings, relay_options
from tests.smtp_servers import SmtpServer, Tls, closed_port

RELAY_USER, RELAY_PASS = "relay-user", "probe-pass-51c0de"


@pytest.fixture
async def owner(env: Env) -> dict[str, str]:
    return await env.new_owner()


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
