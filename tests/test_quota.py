"""Quotas (contract section 7): every email counts once per recipient against its SMTP user.

A command whose emails would pass the hourly or total limit fails with QuotaExceeded and stores
nothing. The check and the count are one step in the store, so workers racing on one PostgreSQL
store never send past a limit together.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.databases import create_database, drop_database
from tests.support.environment import Env, running_env
from tests.support.smtp_servers import SmtpServer
from tests.support.world import World, configure

TWO = ["oncall@example.com", "ops@example.org"]


async def limited(env: Env, smtp: SmtpServer, *, total: int = 1000, hourly: int = 1000) -> World:
    """A world whose channel has two recipients: every email counts twice."""
    limits = {"total_limit": total, "hourly_limit": hourly}
    return await configure(env, smtp, recipients=TWO, limits=limits)


def next_utc_hour() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


async def counters(world: World) -> dict[str, int]:
    (user,) = (await world.settings("settings.smtp_user.list", {}))["smtp_list"]
    return {"hourly_sent": user["hourly_sent"], "total_sent": user["total_sent"]}


# --- refusals -----------------------------------------------------------------------------------


async def test_hourly_limit_refuses_the_ticket_that_would_pass_it(env: Env, smtp: SmtpServer):
    world = await limited(env, smtp, hourly=3)
    await world.new_ticket("first")

    error = await world.error("ticket.new", world.ticket_data("second"))

    details = error["details"]
    assert "QuotaExceeded" == error["name"]
    assert {"limit": "hourly", "max": 3, "used": 2, "resets_at": next_utc_hour()} == details | {
        "resets_at": datetime.fromisoformat(details["resets_at"])
    }


async def test_total_limit_refuses_the_ticket_that_would_pass_it(env: Env, smtp: SmtpServer):
    world = await limited(env, smtp, total=3)
    await world.new_ticket("first")

    error = await world.error("ticket.new", world.ticket_data("second"))

    assert ("QuotaExceeded", {"limit": "total", "max": 3, "used": 2, "resets_at": None}) == (
        error["name"],
        error["details"],
    )


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [
        ({"hourly": 3}, 1),
        ({"hourly": 4}, 2),
        ({"total": 3}, 1),
        ({"total": 4}, 2),
        ({"total": 1}, 0),
    ],
    ids=["hourly-3", "hourly-4", "total-3", "total-4", "total-1"],
)
async def test_limit_allows_the_tickets_whose_recipients_fit(
    env: Env, smtp: SmtpServer, limits: dict[str, int], allowed: int
):
    world = await limited(env, smtp, **limits)

    replies = [await world.call("ticket.new", world.ticket_data(f"alert {n}")) for n in range(3)]

    assert ["success"] * allowed + ["error"] * (3 - allowed) == [r["status"] for r in replies]


async def test_refused_ticket_stores_nothing_and_sends_nothing(env: Env, smtp: SmtpServer):
    world = await limited(env, smtp, hourly=3)
    await world.new_ticket("first")

    await world.error("ticket.new", world.ticket_data("second"))

    await world.env.client.wait_events("email.sent")
    assert (1, 1) == (await world.stored("tickets"), await world.stored("emails"))
    assert ["[ops] first"] == [str(r.message["Subject"]) for r in smtp.messages]


async def test_counters_count_each_recipient_and_not_the_refused(env: Env, smtp: SmtpServer):
    world = await limited(env, smtp, hourly=3)
    await world.new_ticket("first")

    await world.error("ticket.new", world.ticket_data("second"))

    assert {"hourly_sent": 2, "total_sent": 2} == await counters(world)


async def _hit(world: World, sid: str) -> dict[str, Any]:
    return await world.call("hit.new", {"sid": sid, "hit": {"summary": "again"}})


async def _dedup_repeat(world: World, sid: str) -> dict[str, Any]:
    return await world.call("ticket.new", world.ticket_data("again", dedup_key="disk"))


@pytest.mark.parametrize("repeat", [_hit, _dedup_repeat], ids=["hit.new", "dedup-ticket.new"])
async def test_refused_hit_stores_nothing(
    env: Env,
    smtp: SmtpServer,
    repeat: Callable[[World, str], Awaitable[dict[str, Any]]],
):
    world = await limited(env, smtp, total=2)
    sid = await world.new_ticket(dedup_key="disk")

    reply = await repeat(world, sid)

    assert "QuotaExceeded" == reply["error"]["name"]
    assert {"hits": [], "next_after_seq": None} == await world.ok("hit.list", {"sid": sid})
    ticket = await world.ticket(sid)
    assert (0, None) == (ticket["hit_count"], ticket["last_hit_at"])
    assert 1 == await world.stored("emails")


async def test_hits_on_an_acknowledged_ticket_count_nothing(env: Env, smtp: SmtpServer):
    world = await limited(env, smtp, total=2)
    sid = await world.new_ticket()
    await world.ok("ticket.ack", {"sid": sid})

    reply = await _hit(world, sid)

    assert "success" == reply["status"]
    assert {"hourly_sent": 2, "total_sent": 2} == await counters(world)


# --- two workers racing on one PostgreSQL store --------------------------------------------------


@pytest.fixture
async def two_workers(amqp_url: str, postgres_admin_url: str) -> AsyncIterator[Env]:
    """Two workers on one fresh PostgreSQL database, consuming the same queues."""
    url = await create_database(postgres_admin_url)
    try:
        # The first worker migrates the new database.
        async with running_env(amqp_url, url, workers=2) as env:
            yield env
    finally:
        await drop_database(postgres_admin_url, url)


@pytest.mark.slow
async def test_two_workers_racing_100_tickets_send_exactly_the_total_limit(
    two_workers: Env, smtp: SmtpServer
):
    world = await configure(
        two_workers,
        smtp,
        recipients=["oncall@example.com"],
        limits={"total_limit": 50, "hourly_limit": 1000},
    )

    replies = await asyncio.gather(
        *(world.call("ticket.new", world.ticket_data(f"alert {n}")) for n in range(100))
    )

    outcomes = Counter(r["error"]["name"] if r["status"] == "error" else "created" for r in replies)
    assert {"created": 50, "QuotaExceeded": 50} == outcomes
    await two_workers.client.wait_events("email.sent", 50)
    assert 50 == len(smtp.messages)
    assert 50 == await world.stored("emails")
    assert {"hourly_sent": 50, "total_sent": 50} == await counters(world)
