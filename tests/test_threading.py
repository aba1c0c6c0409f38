"""Stable threading (contract section 7): a ticket's Message-ID is fixed when it is created.

Its hits thread under it even after `settings.channel.put` moves the channel to another domain;
they are then sent through the new domain's relay, `From:` the new domain's `from`. Two real
SMTP servers, one per domain; every test runs on both stores.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import update

from tests.support.environment import Env
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import World, configure
from worker.store.tables import tickets


@dataclass
class Moved:
    """A world whose channel moved from its first domain to `domain`, relayed by `smtp`."""

    world: World
    domain: str
    sender: str
    smtp: SmtpServer


@pytest.fixture
async def first() -> AsyncIterator[SmtpServer]:
    async with SmtpServer() as server:
        yield server


@pytest.fixture
async def second() -> AsyncIterator[SmtpServer]:
    async with SmtpServer() as server:
        yield server


async def add_domain(world: World, smtp: SmtpServer) -> tuple[str, str]:
    """A second domain of the world's owner, relayed by `smtp`: (domain, from)."""
    domain = unique_domain()
    sender = f"Other Alerts <alerts@{domain}>"
    await world.settings(
        "settings.email.create",
        {"domain": domain, "provider": "smtp", "from": sender, "options": relay_options(smtp)},
    )
    return domain, sender


async def move_channel(world: World, domain: str) -> None:
    await world.settings(
        "settings.channel.put",
        {"name": world.channel, "domain": domain, "recipients": world.recipients},
    )


async def test_hit_threads_under_the_ticket_after_the_channel_moves(
    env: Env, first: SmtpServer, second: SmtpServer
):
    world = await configure(env, first)
    sid = await world.new_ticket("Disk full")
    (ticket_email,) = await first.wait_for(1)
    domain, sender = await add_domain(world, second)

    await move_channel(world, domain)
    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "again"}})

    (hit_email,) = await second.wait_for(1)
    message = hit_email.message
    assert f"<{sid}@{world.domain}>" == ticket_email.message["Message-ID"]
    expected = {
        "In-Reply-To": f"<{sid}@{world.domain}>",
        "References": f"<{sid}@{world.domain}>",
        "Message-ID": f"<{sid}.h1@{domain}>",
        "From": sender,
        "Subject": "Re: [ops] Disk full",
    }
    assert expected == {name: str(message[name]) for name in expected}
    assert f"alerts@{domain}" == hit_email.sender
    assert 1 == len(first.messages)  # nothing more through the old domain's relay


async def test_repeated_alert_threads_under_the_ticket_after_the_channel_moves(
    env: Env, first: SmtpServer, second: SmtpServer
):
    world = await configure(env, first)
    sid = await world.new_ticket("Disk full", dedup_key="disk")
    await first.wait_for(1)
    domain, _ = await add_domain(world, second)

    await move_channel(world, domain)
    again = await world.ok("ticket.new", world.ticket_data("Disk full", dedup_key="disk"))

    (hit_email,) = await second.wait_for(1)
    assert ({"sid": sid, "created": False}, f"<{sid}@{world.domain}>") == (
        again,
        hit_email.message["In-Reply-To"],
    )


async def test_ticket_keeps_the_domain_it_was_created_on(
    env: Env, first: SmtpServer, second: SmtpServer
):
    world = await configure(env, first)
    sid = await world.new_ticket()
    domain, _ = await add_domain(world, second)

    await move_channel(world, domain)
    moved_sid = await world.new_ticket("After the move")

    rows = await env.query(
        "SELECT sid, thread_domain FROM tickets WHERE owner_id = :owner",
        owner=world.owner["owner_id"],
    )
    assert {sid: world.domain, moved_sid: domain} == dict(rows)
    (moved_email,) = await second.wait_for(1)
    assert f"<{moved_sid}@{domain}>" == moved_email.message["Message-ID"]


async def test_ticket_without_a_thread_domain_threads_under_the_emails_domain(
    env: Env, first: SmtpServer
):
    world = await configure(env, first)
    sid = await world.new_ticket()
    # A ticket from before the column whose first email is gone.
    async with env.store.transaction() as conn:
        await conn.execute(update(tickets).where(tickets.c.sid == sid).values(thread_domain=None))

    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "again"}})

    received = await first.wait_for(2)
    (hit_email,) = [r for r in received if r.message["X-Ticket-Hit-Seq"] == "1"]
    assert f"<{sid}@{world.domain}>" == hit_email.message["In-Reply-To"]
