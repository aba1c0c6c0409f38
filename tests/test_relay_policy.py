"""The relay address policy (contract section 5): where a relay may be.

By default only public unicast addresses; loopback, private, link-local, CGNAT, multicast,
unspecified and reserved ones only when SMTP_WORKER_RELAY_ALLOW lists them. Literal addresses
are refused when the settings are written; host names when the worker connects, on every
address they resolve to, for a probe and a delivery alike.

The tests' relays listen on 127.0.0.1, which `make_settings` allows; the tests of the default
policy run a worker with `relay_allow` empty.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime
from email.message import EmailMessage
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest

from tests.support.environment import Env
from tests.support.payloads import email_settings, relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import configure
from worker.errors import SmtpPermanentError
from worker.mail import Relay, SmtpPool, probe, ticket_email
from worker.mail.policy import Network, is_allowed, literal_address
from worker.mail.relay import DENIED, NO_CONNECTION

LOCAL = (ip_network("127.0.0.0/8"),)

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "2a00:1450:4001:82a::200e",
    "::ffff:8.8.8.8",  # IPv4-mapped: judged as 8.8.8.8
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]
DENIED_ADDRESSES = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "100.127.255.254",
    "169.254.169.254",  # cloud metadata
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "::127.0.0.1",  # IPv4-compatible, deprecated
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::1",  # local-use NAT64
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001::1",  # Teredo
    "2001:db8::1",
    "3fff::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "100::1",
]


# --- the policy itself --------------------------------------------------------------------------


@pytest.mark.parametrize("address", PUBLIC)
def test_public_unicast_addresses_are_allowed(address: str) -> None:
    assert is_allowed(ip_address(address))


@pytest.mark.parametrize("address", DENIED_ADDRESSES)
def test_non_public_addresses_are_denied(address: str) -> None:
    assert not is_allowed(ip_address(address))


@pytest.mark.parametrize(
    ("address", "allow", "allowed"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("64:ff9b::7f00:1", ["127.0.0.0/8"], True),
        ("10.1.2.3", ["10.1.2.3/32"], True),
        ("10.1.2.4", ["10.1.2.3/32"], False),
        ("::1", ["127.0.0.0/8"], False),
        ("127.0.0.1", ["::1/128"], False),
        ("::1", ["::1/128"], True),
        ("fd00::25", ["fd00::/8"], True),
        ("169.254.169.254", ["10.0.0.0/8", "192.168.0.0/16"], False),
    ],
)
def test_relay_allow_lets_listed_addresses_through(
    address: str, allow: list[str], allowed: bool
) -> None:
    networks = [ip_network(network) for network in allow]

    assert allowed == is_allowed(ip_address(address), networks)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", IPv4Address("127.0.0.1")),
        ("127.1", IPv4Address("127.0.0.1")),
        ("127.0.1", IPv4Address("127.0.0.1")),
        ("0x7f000001", IPv4Address("127.0.0.1")),
        ("0X7F.0.0.1", IPv4Address("127.0.0.1")),
        ("0x7f.1", IPv4Address("127.0.0.1")),
        ("2130706433", IPv4Address("127.0.0.1")),
        ("0177.0.0.1", IPv4Address("127.0.0.1")),
        ("017700000001", IPv4Address("127.0.0.1")),
        ("0", IPv4Address("0.0.0.0")),
        ("10.65535", IPv4Address("10.0.255.255")),
        ("::1", IPv6Address("::1")),
        ("[::1]", IPv6Address("::1")),
        ("[::ffff:127.0.0.1]", IPv6Address("::ffff:127.0.0.1")),
        ("169.254.169.254", IPv4Address("169.254.169.254")),
    ],
)
def test_literal_address_reads_every_numeric_form(host: str, address: Any) -> None:
    assert address == literal_address(host)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "smtp.example.com",
        "127.0.0.1.example.com",
        "1.2.3.4.5",
        "256.0.0.1",
        "1.2.3.256",
        "0x",
        "08.0.0.1",  # 8 is no octal digit: a resolver takes it for a name
        "4294967296",
        "127.0.0.1.",
        "[localhost]",
    ],
)
def test_literal_address_leaves_names_alone(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize(
    "host",
    ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7f.1", "127.0.1", "10.65535"],
)
def test_literal_address_agrees_with_the_system_resolver(host: str) -> None:
    resolved = socket.getaddrinfo(host, 25, type=socket.SOCK_STREAM)[0][4][0]

    assert ip_address(resolved) == literal_address(host)


# --- at connection time: the SMTP layer ---------------------------------------------------------


def an_email() -> EmailMessage:
    return ticket_email(
        sid="sid0000aaaaaaaaaaaaaaaa",
        domain="example.com",
        sender="alerts@example.com",
        recipients=["ops@example.com"],
        subject_prefix="[ops]",
        title="Disk full",
        body="/var is at 99%",
        severity="high",
        created_at=datetime(2024, 5, 17, 8, 30, tzinfo=UTC),
    )


class FakeResolver:
    """Stands in for the loop's getaddrinfo: `names` maps a host name to its addresses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []
        self._real = loop.getaddrinfo

    async def __call__(self, host: Any, port: Any, **kwargs: Any) -> list[Any]:
        self.asked.append(host)
        if host not in self.names:
            return await self._real(host, port, **kwargs)
        found = []
        for text in self.names[host]:
            address = ip_address(text)
            if address.version == 4:
                found.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, port)))
            else:
                found.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, port, 0, 0)))
        return found


@pytest.fixture
async def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    loop = asyncio.get_running_loop()
    fake = FakeResolver(loop, {})
    monkeypatch.setattr(loop, "getaddrinfo", fake)
    return fake


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "0x7f000001"])
async def test_probe_refuses_a_denied_address_without_connecting(
    smtp: SmtpServer, host: str
) -> None:
    result = await probe(Relay(host, smtp.port, timeout=5.0))

    assert (result.ok, result.stage, result.message) == (False, "connect", DENIED)
    assert 0 == smtp.connections


async def test_pool_refuses_a_denied_address_for_good_without_connecting(
    smtp: SmtpServer,
) -> None:
    async with SmtpPool() as pool:
        with pytest.raises(SmtpPermanentError) as caught:
            await pool.send(Relay("localhost", smtp.port), an_email(), "a@example.com", ["b@x.io"])

    assert DENIED == str(caught.value)
    assert 0 == smtp.connections


@pytest.mark.parametrize(
    ("addresses", "allow", "message"),
    [
        (["127.0.0.1", "10.0.0.25", "fd00::25"], (), DENIED),
        # The server listens on 127.0.0.1, first in the answer but not allowed; nothing listens
        # on 127.0.0.2, which is.
        (["127.0.0.1", "127.0.0.2"], (ip_network("127.0.0.2/32"),), NO_CONNECTION),
    ],
    ids=["only-denied-addresses-refused", "denied-one-among-allowed-ones"],
)
async def test_a_denied_address_of_a_name_is_never_tried(
    smtp: SmtpServer,
    resolver: FakeResolver,
    addresses: list[str],
    allow: tuple[Network, ...],
    message: str,
) -> None:
    resolver.names["relay.invalid"] = addresses

    result = await probe(Relay("relay.invalid", smtp.port, timeout=5.0, allow=allow))

    assert (result.stage, result.message) == ("connect", message)
    assert 0 == smtp.connections


async def test_a_name_resolving_to_allowed_and_denied_addresses_reaches_an_allowed_one(
    smtp: SmtpServer, resolver: FakeResolver
) -> None:
    # "localhost" on many systems: ::1 first, which the allowed 127.0.0.0/8 does not cover.
    resolver.names["relay.invalid"] = ["::1", "127.0.0.1"]

    result = await probe(Relay("relay.invalid", smtp.port, timeout=5.0, allow=LOCAL))

    assert (result.ok, smtp.connections) == (True, 1), result.message


async def test_connects_to_the_address_it_checked_without_resolving_again(
    smtp: SmtpServer, resolver: FakeResolver
) -> None:
    # Nothing but the fake resolver knows this name: a second lookup would fail.
    resolver.names["relay.invalid"] = ["127.0.0.1"]

    result = await probe(Relay("relay.invalid", smtp.port, timeout=5.0, allow=LOCAL))

    assert (result.ok, result.stage) == (True, "done"), result.message
    assert ["relay.invalid"] == resolver.asked


@pytest.mark.parametrize("allow", [LOCAL, ()], ids=["allowed", "denied"])
async def test_an_ipv4_mapped_answer_is_judged_and_reached_as_ipv4(
    smtp: SmtpServer, resolver: FakeResolver, allow: Any
) -> None:
    resolver.names["relay.invalid"] = ["::ffff:127.0.0.1"]

    result = await probe(Relay("relay.invalid", smtp.port, timeout=5.0, allow=allow))

    assert result.ok is bool(allow), result.message
    assert (1 if allow else 0) == smtp.connections


async def test_tls_names_the_host_not_the_address(resolver: FakeResolver) -> None:
    resolver.names["relay.invalid"] = ["127.0.0.1"]
    async with SmtpServer(tls="implicit") as srv:
        relay = Relay(
            "relay.invalid",
            srv.port,
            secure=True,
            reject_unauthorized=False,
            timeout=5.0,
            allow=LOCAL,
        )
        result = await probe(relay)

        assert (result.ok, srv.server_names) == (True, ["relay.invalid"]), result.message


async def test_tls_verifies_the_certificate_against_the_host_name(
    resolver: FakeResolver,
) -> None:
    # The test certificate is self-signed: verified, it fails whatever the name; the point is
    # that verification is on, through the socket the worker connected itself.
    resolver.names["relay.invalid"] = ["127.0.0.1"]
    async with SmtpServer(tls="implicit") as srv:
        relay = Relay("relay.invalid", srv.port, secure=True, timeout=5.0, allow=LOCAL)
        result = await probe(relay)

    assert (result.stage, result.message[:25]) == ("tls", "certificate verify failed")


# --- through the broker -------------------------------------------------------------------------


@pytest.fixture
async def strict(env: Env) -> Env:
    """`env` with its worker replaced by one on the default policy: no relay_allow."""
    for worker in env.workers:
        await worker.stop()
    env.workers.clear()
    await env.start_worker(relay_allow=())
    return env


LITERAL_HOSTS = [
    "127.0.0.1",
    "127.1",
    "0x7f000001",
    "2130706433",
    "0177.0.0.1",
    "::1",
    "[::1]",
    "::ffff:127.0.0.1",
    "[::ffff:7f00:1]",
    "64:ff9b::7f00:1",
    "2002:7f00:1::1",
    "10.0.0.1",
    "192.168.1.10",
    "172.16.5.4",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "fd00::1",
    "fe80::1",
]


async def test_create_refuses_every_spelling_of_a_denied_address(
    strict: Env, owner: dict[str, str]
):
    refused = {}
    for host in LITERAL_HOSTS:
        data = email_settings(unique_domain(), host=host, port=25)
        reply = await strict.client.call("settings.email.create", owner, data)
        refused[host] = (reply["status"], reply.get("error", {}).get("details"))

    assert {
        host: (
            "error",
            [
                {
                    "loc": ["data", "options", "host"],
                    "msg": "the address is not allowed: a relay must be at a public address",
                }
            ],
        )
        for host in LITERAL_HOSTS
    } == refused


async def test_update_refuses_a_denied_address(strict: Env, owner: dict[str, str], domain: str):
    await strict.client.ok("settings.email.create", owner, email_settings(domain, host="8.8.8.8"))

    reply = await strict.client.call(
        "settings.email.update", owner, {"domain": domain, "options": {"host": "0x7f.1"}}
    )

    assert "ValidationError" == reply["error"]["name"]
    assert [["data", "options", "host"]] == [d["loc"] for d in reply["error"]["details"]]
    stored = await strict.client.ok("settings.email.get", owner, {"domain": domain})
    assert "8.8.8.8" == stored["options"]["host"]


@pytest.mark.parametrize("host", ["8.8.8.8", "2606:4700:4700::1111", "smtp.example.com"])
async def test_create_accepts_public_addresses_and_names(
    strict: Env, owner: dict[str, str], domain: str, host: str
):
    created = await strict.client.ok(
        "settings.email.create", owner, email_settings(domain, host=host)
    )

    assert host == created["options"]["host"]


async def test_create_honours_relay_allow(env: Env, owner: dict[str, str]):
    # The tests' worker allows 127.0.0.0/8, in every spelling, and nothing else.
    outcomes = {}
    for host in ["127.1", "0x7f000001", "::ffff:127.0.0.1", "10.0.0.1", "::1"]:
        data = email_settings(unique_domain(), host=host)
        outcomes[host] = (await env.client.call("settings.email.create", owner, data))["status"]

    assert {
        "127.1": "success",
        "0x7f000001": "success",
        "::ffff:127.0.0.1": "success",
        "10.0.0.1": "error",
        "::1": "error",
    } == outcomes


async def test_probe_of_a_name_resolving_to_loopback_fails_at_connect(
    strict: Env, owner: dict[str, str], domain: str, smtp: SmtpServer
):
    options = relay_options(smtp, host="localhost")
    await strict.client.ok("settings.email.create", owner, email_settings(domain, **options))

    result = await strict.client.ok("settings.email.test", owner, {"domain": domain})

    assert {"ok": False, "stage": "connect", "message": DENIED} == result
    assert 0 == smtp.connections


async def test_delivery_to_a_name_resolving_to_loopback_fails_for_good(
    strict: Env, smtp: SmtpServer
):
    world = await configure(strict, smtp, options=relay_options(smtp, host="localhost"))
    sid = await world.new_ticket()

    (failed,) = await strict.client.wait_events("email.failed")

    assert (failed["data"]["permanent"], failed["data"]["error"]) == (True, DENIED)
    assert {"status": "failed", "attempts": 1, "last_error": DENIED} == (await world.ticket(sid))[
        "delivery"
    ]
    assert 0 == smtp.connections
