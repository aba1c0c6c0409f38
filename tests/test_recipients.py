"""Recipients that differ only in case are one recipient (contract sections 6 and 7).

`settings.channel.put` keeps the first spelling, in order; an email goes once to each recipient
and counts once per recipient against the SMTP user's limits, also for a channel stored before
recipients were de-duplicated. Every test runs on both stores.
"""

from __future__ import annotations

import json

from sqlalchemy import update

from tests.support.environment import Env
from tests.support.smtp_servers import SmtpServer
from tests.support.world import World, configure
from worker.store.tables import channels

GIVEN = ["Ops@Example.com", "oncall@example.org", "ops@example.com", "OPS@EXAMPLE.COM", "b@x.io"]
DISTINCT = ["Ops@Example.com", "oncall@example.org", "b@x.io"]


async def put(world: World, recipients: list[str]) -> dict[str, object]:
    return await world.settings(
        "settings.channel.put",
        {"name": world.channel, "domain": world.domain, "recipients": recipients},
    )


async def sent_by(world: World) -> tuple[int, int]:
    """The SMTP user's (total_sent, hourly_sent)."""
    (user,) = (await world.settings("settings.smtp_user.list", {}))["smtp_list"]
    return user["total_sent"], user["hourly_sent"]


async def test_channel_keeps_the_first_spelling_of_each_recipient_in_order(
    env: Env, smtp: SmtpServer
):
    world = await configure(env, smtp)

    put_reply = await put(world, GIVEN)

    shown = await world.settings("settings.channel.get", {"name": world.channel})
    (listed,) = (await world.settings("settings.channel.list", {}))["channels"]
    assert [DISTINCT] * 3 == [put_reply["recipients"], shown["recipients"], listed["recipients"]]


async def test_email_goes_once_to_each_recipient(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp, recipients=GIVEN)

    await world.new_ticket()

    (received,) = await smtp.wait_for(1)
    to = [address.addr_spec for address in received.message["To"].addresses]
    assert (DISTINCT, DISTINCT) == (received.recipients, to)


async def test_email_counts_once_per_recipient_against_the_limits(env: Env, smtp: SmtpServer):
    # Exactly enough for one email to the distinct recipients; five would not fit.
    limits = {"total_limit": len(DISTINCT), "hourly_limit": len(DISTINCT)}
    world = await configure(env, smtp, recipients=GIVEN, limits=limits)

    await world.new_ticket()

    assert (len(DISTINCT), len(DISTINCT)) == await sent_by(world)
    error = await world.error("ticket.new", world.ticket_data("Another"))
    assert ("QuotaExceeded", len(DISTINCT)) == (error["name"], error["details"]["used"])


async def test_channel_stored_with_repeated_recipients_is_emailed_once_each(
    env: Env, smtp: SmtpServer
):
    world = await configure(env, smtp)
    # As a channel put before recipients were de-duplicated holds them.
    async with env.store.transaction() as conn:
        await conn.execute(
            update(channels)
            .where(channels.c.owner_id == world.owner["owner_id"], channels.c.name == "ops")
            .values(recipients=GIVEN)
        )

    sid = await world.new_ticket()
    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "again"}})

    received = await smtp.wait_for(2)
    stored = await env.query("SELECT recipients FROM emails WHERE sid = :sid", sid=sid)
    assert [DISTINCT, DISTINCT] == [r.recipients for r in received]
    assert [DISTINCT, DISTINCT] == [
        json.loads(row[0]) if isinstance(row[0], str) else row[0] for row in stored
    ]
    assert (2 * len(DISTINCT), 2 * len(DISTINCT)) == await sent_by(world)
    shown = await world.settings("settings.channel.get", {"name": world.channel})
    assert DISTINCT == shown["recipients"]
