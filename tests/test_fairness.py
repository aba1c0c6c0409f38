"""One owner cannot slow another through relays (contract section 5).

Owner A points its relay at a SilentRelay (accepts connections, never answers), owner B at a
healthy aiosmtpd relay; A floods, B's commands and emails must stay fast. The figures are
printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.support.environment import Env
from tests.support.payloads import email_settings
from tests.support.polling import eventually
from tests.support.silent_relay import SilentRelay
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import World, configure

FAST = 2.0  # seconds: B's commands, whatever A does


async def timed(call: Any) -> float:
    started = time.monotonic()
    await call
    return time.monotonic() - started


async def email_latency(world: World, title: str) -> float:
    """Seconds from a ticket.new of `world` to its email on the world's relay."""
    started = time.monotonic()
    sid = await world.new_ticket(title)
    while not any(m.message["X-Ticket-SID"] == sid for m in world.smtp.messages):
        assert time.monotonic() - started < 60, f"the email of {title} never arrived"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


# --- probes -------------------------------------------------------------------------------------


async def test_probes_at_a_silent_relay_neither_slow_another_owner_nor_run_more_than_four(
    env: Env,
):
    # Command consumers holding 8 messages at a time: 16 probes waiting 2 s each on a relay
    # would hold all 8 for 4 s, were the probes run in them.
    default = env.workers.pop()
    await default.stop()
    await env.start_worker(prefetch=8)
    a = await env.new_owner("a")
    domain = unique_domain()
    async with SilentRelay() as silent, SmtpServer() as healthy:
        options = {"host": "127.0.0.1", "port": silent.port, "timeout": 2}
        await env.client.ok("settings.email.create", a, email_settings(domain, **options))
        b = await configure(env, healthy)
        body = json.dumps({"type": "settings.email.test", "auth": a, "data": {"domain": domain}})
        started = time.monotonic()
        probes = [await env.client.publish(body.encode(), "settings.email.test") for _ in range(16)]

        latencies: dict[str, list[float]] = {"settings.channel.get": [], "ticket.new": []}
        while not all(probe.done() for probe in probes if probe is not None):
            assert time.monotonic() - started < 60, "the probes were not all answered"
            get = b.settings("settings.channel.get", {"name": b.channel})
            latencies["settings.channel.get"].append(await timed(get))
            latencies["ticket.new"].append(await timed(b.new_ticket()))
            await asyncio.sleep(0.2)
        answered = time.monotonic() - started
        replies = [json.loads((await probe).body) for probe in probes if probe is not None]

    print(
        f"16 probes at a silent relay (timeout 2 s) answered in {answered:.1f} s, "
        f"at most {silent.peak} connections at once; owner B meanwhile: "
        + ", ".join(
            f"{type_} max {max(times):.2f} s over {len(times)}"
            for type_, times in latencies.items()
        )
    )
    assert {("success", False, "connect")} == {
        (r["status"], r["data"]["ok"], r["data"]["stage"]) for r in replies
    }
    assert silent.peak <= 4
    assert 16 == silent.accepted
    for type_, times in latencies.items():
        assert max(times) < FAST, (type_, times)


async def test_a_repeated_probe_gets_the_first_reply(env: Env):
    owner = await env.new_owner()
    domain = unique_domain()
    async with SmtpServer() as first, SmtpServer() as second:
        options = {"host": first.host, "port": first.port, "timeout": 5}
        await env.client.ok("settings.email.create", owner, email_settings(domain, **options))
        reply = await env.client.call(
            "settings.email.test", owner, {"domain": domain}, message_id="probe-1"
        )
        # The relay changes; a repeat of the processed message_id is not probed again.
        moved = {"domain": domain, "options": {"host": "127.0.0.1", "port": second.port}}
        await env.client.ok("settings.email.update", owner, moved)

        repeat = await env.client.call(
            "settings.email.test", owner, {"domain": domain}, message_id="probe-1"
        )

        assert 1 == first.connections
        assert 0 == second.connections
    assert reply == repeat


async def test_probe_of_settings_deleted_while_it_waited_is_not_found(env: Env):
    owner = await env.new_owner()
    domain = unique_domain()
    async with SilentRelay() as silent:
        options = {"host": "127.0.0.1", "port": silent.port, "timeout": 2}
        await env.client.ok("settings.email.create", owner, email_settings(domain, **options))
        body = json.dumps(
            {"type": "settings.email.test", "auth": owner, "data": {"domain": domain}}
        ).encode()
        # Four probes take every turn of the owner; the next ones wait or are parked.
        probes = [await env.client.publish(body, "settings.email.test") for _ in range(12)]

        async def four_in_flight() -> bool:
            return silent.open >= 4

        await eventually(four_in_flight)
        await env.client.ok("settings.email.delete", owner, {"domain": domain})

        replies = [json.loads((await asyncio.wait_for(p, 30)).body) for p in probes if p]

    # The probes that ran got through to the relay's silence; the others found no settings.
    assert {("success", "connect"), ("error", "NotFound")} == {
        (r["status"], r["data"]["stage"] if r["status"] == "success" else r["error"]["name"])
        for r in replies
    }


# --- deliveries ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_dead_relay_backlog_does_not_delay_another_owners_email(env: Env):
    async with SilentRelay() as silent, SmtpServer() as healthy:
        a = await configure(
            env, healthy, options={"host": "127.0.0.1", "port": silent.port, "timeout": 3}
        )
        b = await configure(env, healthy)
        before = await email_latency(b, "before")
        started = time.monotonic()
        a_sids = await asyncio.gather(*(a.new_ticket(f"a {n}") for n in range(200)))
        queued = time.monotonic() - started

        latencies = []
        for n in range(3):
            latencies.append(await email_latency(b, f"b {n}"))
            await asyncio.sleep(1)
        emails = await env.query(
            "SELECT status, attempts, last_error FROM emails WHERE owner_id = :owner",
            owner=a.owner["owner_id"],
        )
        tried = [e for e in emails if e.attempts > 0]
        ticket = await a.ticket(a_sids[0])
        peak = silent.peak

    print(
        f"owner B's email: {before:.2f} s alone; with 200 emails of owner A queued in "
        f"{queued:.1f} s for a silent relay: " + ", ".join(f"{s:.2f} s" for s in latencies)
    )
    assert max(latencies) < 5
    assert [] == [e for e in emails if e.status == "sent"]
    assert tried, "owner A's emails were never tried"
    assert {"could not connect to an SMTP server"} == {e.last_error for e in tried}
    assert ticket["delivery"]["status"] in ("pending", "failed")
    assert peak <= 4
