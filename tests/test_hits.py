"""Hits (contract section 7): threaded emails, silence on acknowledged tickets, paging, dedup_key.

Every test runs on both stores, with a real SMTP server as the domain's relay.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, update

from tests.support.smtp_servers import Received
from tests.support.world import World
from worker.store.tables import hits, tickets

MiB = 1024 * 1024


def hit_email(received: list[Received], seq: int) -> Received:
    """The email of hit `seq` among those received, in whatever order they arrived."""
    (found,) = [r for r in received if r.message["X-Ticket-Hit-Seq"] == str(seq)]
    return found


async def hit(world: World, sid: str, summary: str = "again", body: str | None = None) -> int:
    data: dict[str, object] = {"sid": sid, "hit": {"summary": summary}}
    if body is not None:
        data["hit"] = {"summary": summary, "body": body}
    seq: int = (await world.ok("hit.new", data))["seq"]
    return seq


# --- the email ----------------------------------------------------------------------------------


async def test_hit_email_threads_under_the_ticket_email(world: World):
    sid = await world.new_ticket("Disk full")
    await world.smtp.wait_for(1)

    await hit(world, sid)

    message = (await world.smtp.wait_for(2))[1].message
    expected = {
        "Subject": "Re: [ops] Disk full",
        "In-Reply-To": world.message_id(sid),
        "References": world.message_id(sid),
        "X-Ticket-SID": sid,
        "X-Ticket-Hit-Seq": "1",
    }
    assert expected == {name: str(message[name]) for name in expected}


async def test_hit_email_carries_the_common_headers(world: World):
    sid = await world.new_ticket()

    await hit(world, sid)

    received = hit_email(await world.smtp.wait_for(2), 1)
    message = received.message
    assert (world.sender, ", ".join(world.recipients), "auto-generated") == (
        str(message["From"]),
        str(message["To"]),
        str(message["Auto-Submitted"]),
    )
    assert world.recipients == received.recipients
    assert abs(datetime.now(UTC) - message["Date"].datetime) < timedelta(minutes=1)


async def test_every_email_has_its_own_message_id(world: World):
    sid = await world.new_ticket()

    await hit(world, sid)
    await hit(world, sid)

    received = await world.smtp.wait_for(3)
    assert 3 == len({str(r.message["Message-ID"]) for r in received})


async def test_hit_email_body_holds_the_summary_and_body(world: World):
    sid = await world.new_ticket()

    await hit(world, sid, "still full", "now 99%")

    text = hit_email(await world.smtp.wait_for(2), 1).message.get_content()
    for part in ("still full", "now 99%", sid):
        assert part in text


# --- the hit ------------------------------------------------------------------------------------


async def test_hits_are_numbered_from_one_per_ticket(world: World):
    first, second = await world.new_ticket("a"), await world.new_ticket("b")

    seqs = [await hit(world, first), await hit(world, first), await hit(world, second)]

    assert [1, 2, 1] == seqs


async def test_hit_updates_the_tickets_count_and_last_hit_at(world: World):
    sid = await world.new_ticket()

    await hit(world, sid)
    await hit(world, sid)

    ticket = await world.ticket(sid)
    (last,) = (await world.ok("hit.list", {"sid": sid, "after_seq": 1}))["hits"]
    assert (2, last["created_at"]) == (ticket["hit_count"], ticket["last_hit_at"])


async def test_hit_publishes_hit_created(world: World):
    sid = await world.new_ticket()

    await hit(world, sid)

    (event,) = await world.env.client.wait_events("hit.created")
    assert (world.owner["owner_id"], sid, 1) == (
        event["owner_id"],
        event["data"]["sid"],
        event["data"]["seq"],
    )


async def test_acknowledged_tickets_hit_is_stored_without_email(world: World):
    sid = await world.new_ticket()
    await world.ok("ticket.ack", {"sid": sid})

    silent = await hit(world, sid, "while acknowledged")
    # Unacknowledged again, the next hit is emailed: once it arrives, the first had its chance.
    await world.ok("ticket.unack", {"sid": sid})
    await hit(world, sid, "after unack")

    received = await world.smtp.wait_for(2)
    stored = (await world.ok("hit.list", {"sid": sid}))["hits"]
    assert ["while acknowledged", "after unack"] == [h["summary"] for h in stored]
    assert ["2"] == [
        str(r.message["X-Ticket-Hit-Seq"]) for r in received if r.message["In-Reply-To"]
    ]
    assert 1 == silent


async def test_hit_list_pages_through_250_hits(world: World):
    sid = await world.new_ticket()
    await world.ok("ticket.ack", {"sid": sid})  # hits on an acknowledged ticket send no email
    await asyncio.gather(*(hit(world, sid, f"hit {n}") for n in range(250)))

    pages, after = [], 0
    while after is not None:
        page = await world.ok("hit.list", {"sid": sid, "after_seq": after, "limit": 100})
        pages.append([h["seq"] for h in page["hits"]])
        after = page["next_after_seq"]

    assert [list(range(1, 101)), list(range(101, 201)), list(range(201, 251))] == pages


async def hit_list_replies(world: World, sid: str) -> list[bytes]:
    """Every page of `hit.list` from the start, as the reply bodies the broker delivered."""
    bodies: list[bytes] = []
    after = 0
    while after is not None:
        command = {"type": "hit.list", "auth": world.auth, "data": {"sid": sid, "after_seq": after}}
        message = await world.env.client.call_raw(json.dumps(command).encode(), "hit.list")
        reply = json.loads(message.body)
        assert "success" == reply["status"], reply
        bodies.append(message.body)
        after = reply["data"]["next_after_seq"]
    return bodies


@pytest.mark.parametrize(
    "body",
    ["x" * 60_000, '"' * 60_000, "\U0001f525" * 15_000],
    ids=["60KB-ascii", "60KB-of-quotes-escaped-to-120KB", "15000-emoji-of-4-bytes"],
)
async def test_hit_list_pages_hold_at_most_one_mib_and_every_hit_once(world: World, body: str):
    sid = await world.new_ticket()
    await world.ok("ticket.ack", {"sid": sid})  # hits on an acknowledged ticket send no email
    await asyncio.gather(*(hit(world, sid, f"hit {n}", body) for n in range(40)))

    replies = await hit_list_replies(world, sid)

    pages = [json.loads(reply)["data"]["hits"] for reply in replies]
    assert [] == [len(reply) for reply in replies if len(reply) > MiB]
    assert list(range(1, 41)) == [h["seq"] for page in pages for h in page]
    assert {body} == {h["body"] for page in pages for h in page}
    # Pages are filled, not cut short: all but the last hold at least half a MiB.
    assert [] == [len(reply) for reply in replies[:-1] if len(reply) < MiB // 2]


async def add_old_hits(world: World, sid: str, count: int) -> None:
    """Stores hits 1..count of a ticket directly, as if `count` hits had come before."""
    now = datetime.now(UTC)
    async with world.env.store.transaction() as conn:
        await conn.execute(
            insert(hits),
            [
                {"sid": sid, "seq": n, "summary": f"old {n}", "body": None, "created_at": now}
                for n in range(1, count + 1)
            ],
        )
        await conn.execute(update(tickets).where(tickets.c.sid == sid).values(hit_count=count))


async def test_a_ticket_keeps_its_latest_10000_hits(world: World):
    sid = await world.new_ticket(dedup_key="disk:/var")
    await world.ok("ticket.ack", {"sid": sid})
    await add_old_hits(world, sid, 10_000)

    seqs = [
        await hit(world, sid, "new"),
        await hit(world, sid, "new"),
        # A repeat folded by dedup_key is a hit too.
        (await world.ok("ticket.new", world.ticket_data(dedup_key="disk:/var")))["sid"] == sid,
    ]

    stored = await world.env.query(
        "SELECT min(seq), max(seq), count(*) FROM hits WHERE sid = :sid", sid=sid
    )
    first = await world.ok("hit.list", {"sid": sid, "limit": 1})
    assert [10_001, 10_002, True] == seqs
    assert (4, 10_003, 10_000) == tuple(stored[0])
    assert 10_003 == (await world.ticket(sid))["hit_count"]
    assert ([4], 4) == ([h["seq"] for h in first["hits"]], first["next_after_seq"])


async def test_hit_list_shows_every_field_of_a_hit(world: World):
    sid = await world.new_ticket()
    await hit(world, sid, "still full", "now 99%")
    await hit(world, sid, "again")

    hits = (await world.ok("hit.list", {"sid": sid}))["hits"]

    assert [(1, "still full", "now 99%"), (2, "again", None)] == [
        (h["seq"], h["summary"], h["body"]) for h in hits
    ]
    assert {"seq", "summary", "body", "created_at"} == set(hits[0])


async def test_hit_list_of_a_ticket_without_hits_is_empty(world: World):
    sid = await world.new_ticket()

    assert {"hits": [], "next_after_seq": None} == await world.ok("hit.list", {"sid": sid})


async def test_hit_list_after_the_largest_seq_is_empty(world: World):
    sid = await world.new_ticket()
    await hit(world, sid)

    page = await world.ok("hit.list", {"sid": sid, "after_seq": 2**53 - 1})

    assert {"hits": [], "next_after_seq": None} == page


async def test_hit_list_of_exactly_one_page_has_no_next(world: World):
    sid = await world.new_ticket()
    for _ in range(3):
        await hit(world, sid)

    page = await world.ok("hit.list", {"sid": sid, "limit": 3})

    assert ([1, 2, 3], None) == ([h["seq"] for h in page["hits"]], page["next_after_seq"])


# --- dedup_key ----------------------------------------------------------------------------------


async def test_dedup_key_folds_repeats_into_hits_on_one_ticket(world: World):
    replies = [
        await world.ok("ticket.new", world.ticket_data(f"Disk full {n}", dedup_key="disk:/var"))
        for n in range(3)
    ]

    sid = replies[0]["sid"]
    assert [{"sid": sid, "created": flag} for flag in (True, False, False)] == replies
    assert 1 == await world.stored("tickets")
    assert 2 == (await world.ticket(sid))["hit_count"]


async def test_dedup_key_repeat_is_a_hit_summarised_by_its_title(world: World):
    for n in range(3):
        await world.ok("ticket.new", world.ticket_data(f"Disk full {n}", dedup_key="disk:/var"))

    sid = (await world.env.client.wait_events("ticket.created"))[0]["data"]["sid"]
    hits = (await world.ok("hit.list", {"sid": sid}))["hits"]
    assert [(1, "Disk full 1"), (2, "Disk full 2")] == [(h["seq"], h["summary"]) for h in hits]


async def test_dedup_key_repeats_send_three_threaded_emails(world: World):
    for n in range(3):
        await world.ok("ticket.new", world.ticket_data(f"Disk full {n}", dedup_key="disk:/var"))

    received = await world.smtp.wait_for(3)

    subjects = sorted(str(r.message["Subject"]) for r in received)
    assert ["Re: [ops] Disk full 0", "Re: [ops] Disk full 0", "[ops] Disk full 0"] == subjects


async def test_concurrent_repeats_of_one_dedup_key_open_one_ticket(world: World):
    replies = await asyncio.gather(
        *(
            world.ok("ticket.new", world.ticket_data(f"Disk full {n}", dedup_key="disk:/var"))
            for n in range(10)
        )
    )

    (sid,) = {reply["sid"] for reply in replies}
    assert [True] + [False] * 9 == sorted((r["created"] for r in replies), reverse=True)
    assert (1, 9) == (await world.stored("tickets"), (await world.ticket(sid))["hit_count"])


async def test_dedup_key_of_a_closed_ticket_opens_a_new_ticket(world: World):
    first = await world.new_ticket(dedup_key="disk:/var")
    await world.ok("ticket.close", {"sid": first})

    second = await world.ok("ticket.new", world.ticket_data(dedup_key="disk:/var"))

    assert second["created"] is True
    assert first != second["sid"]
    assert 0 == (await world.ticket(first))["hit_count"]


async def test_dedup_key_is_scoped_to_the_channel(world: World):
    await world.settings(
        "settings.channel.put",
        {"name": "db", "domain": world.domain, "recipients": ["dba@example.com"]},
    )
    first = await world.new_ticket(dedup_key="disk:/var")

    other = await world.ok(
        "ticket.new",
        {"channel": "db", "ticket": {"title": "Disk full", "body": "", "dedup_key": "disk:/var"}},
    )

    assert other["created"] is True
    assert first != other["sid"]
