"""Text never changes an email's structure (contract sections 5, 6 and 7), end to end.

Hostile titles, subject prefixes, display names, bodies and summaries go through the broker to a
worker, which delivers to a real SMTP server; what the server received is parsed as a mail
client parses it. Every email must have exactly the headers of section 7 and show the text
literally, on both stores.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import hostile
from tests.support.environment import Env
from tests.support.payloads import relay_options
from tests.support.smtp_servers import Received, SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import World, configure

BCC_TITLE = "=?utf-8?q?=0D=0ABcc:_x@evil.example?="


def by_sid(received: list[Received]) -> dict[tuple[str, str | None], Received]:
    """Received emails by (SID, hit seq or None)."""
    return {(r.message["X-Ticket-SID"], r.message["X-Ticket-Hit-Seq"]): r for r in received}


def shape(received: Received) -> dict[str, Any]:
    """What a reader sees of an email's structure."""
    message = hostile.read(received.raw)
    return {
        "headers": message.keys(),
        "type": (message.get_content_type(), message.get_content_charset()),
        "multipart": message.is_multipart(),
        "defects": hostile.defects(message),
    }


def ticket_shape(headers: list[str] = hostile.TICKET_HEADERS) -> dict[str, Any]:
    return {
        "headers": headers,
        "type": ("text/plain", "utf-8"),
        "multipart": False,
        "defects": [],
    }


async def test_encoded_word_in_a_title_adds_no_bcc(world: World):
    sid = await world.new_ticket(BCC_TITLE)

    (received,) = await world.smtp.wait_for(1)
    message = hostile.read(received.raw)
    assert (ticket_shape(), f"[ops] {BCC_TITLE}", world.recipients) == (
        shape(received),
        message["Subject"],
        received.recipients,
    )
    assert (None, sid) == (message["Bcc"], message["X-Ticket-SID"])


async def test_encoded_word_in_a_subject_prefix_adds_no_bcc(env: Env, smtp: SmtpServer):
    world = await configure(env, smtp, subject_prefix=BCC_TITLE)

    await world.new_ticket("Disk full")

    (received,) = await smtp.wait_for(1)
    assert (ticket_shape(), f"{BCC_TITLE} Disk full") == (
        shape(received),
        hostile.read(received.raw)["Subject"],
    )


async def test_every_hostile_title_is_the_subject_literally(world: World):
    titles = {await world.new_ticket(title): title for title, _ in hostile.HEADER_SAFE}

    received = by_sid(await world.smtp.wait_for(len(titles)))

    assert {sid: (ticket_shape(), f"[ops] {title}") for sid, title in titles.items()} == {
        sid: (shape(received[sid, None]), hostile.read(received[sid, None].raw)["Subject"])
        for sid in titles
    }


async def test_every_hostile_title_is_the_subject_of_its_hits_literally(world: World):
    titles = {}
    for title, _ in hostile.HEADER_SAFE:
        sid = await world.new_ticket(title, dedup_key=title[:200])
        # A repeat of the same alert: a hit, emailed as a reply.
        again = await world.ok("ticket.new", world.ticket_data(title, dedup_key=title[:200]))
        assert {"sid": sid, "created": False} == again
        titles[sid] = title

    received = by_sid(await world.smtp.wait_for(2 * len(titles)))

    expected = {
        sid: (ticket_shape(hostile.HIT_HEADERS), f"Re: [ops] {title}")
        for sid, title in titles.items()
    }
    assert expected == {
        sid: (shape(received[sid, "1"]), hostile.read(received[sid, "1"].raw)["Subject"])
        for sid in titles
    }


async def test_every_hostile_subject_prefix_is_in_the_subject_literally(world: World):
    prefixes = {}
    for index, (prefix, _) in enumerate(hostile.HEADER_SAFE):
        channel = f"p{index}"
        await world.settings(
            "settings.channel.put",
            {
                "name": channel,
                "domain": world.domain,
                "recipients": world.recipients,
                "subject_prefix": prefix,
            },
        )
        created = await world.ok(
            "ticket.new", {"channel": channel, "ticket": {"title": "Disk full", "body": "x"}}
        )
        prefixes[created["sid"]] = prefix

    received = by_sid(await world.smtp.wait_for(len(prefixes)))

    assert {sid: (ticket_shape(), f"{prefix} Disk full") for sid, prefix in prefixes.items()} == {
        sid: (shape(received[sid, None]), hostile.read(received[sid, None].raw)["Subject"])
        for sid in prefixes
    }


DISPLAY_NAMES = [
    *[(text, id_) for text, id_ in hostile.HEADER_SAFE if not set("@<>") & set(text)],
    ("=?utf-8?q?=0D=0ABcc:_x=40evil.example?=", "q-bcc-no-at"),
    ("Alerts, Ops", "comma"),
    ('The "Ops" team', "quotes"),
]


async def test_every_hostile_display_name_is_the_from_display_name_literally(
    world: World, smtp: SmtpServer
):
    names = {}
    for index, (name, _) in enumerate(DISPLAY_NAMES):
        domain = unique_domain()
        await world.settings(
            "settings.email.create",
            {
                "domain": domain,
                "provider": "smtp",
                "from": f"{hostile.quoted(name)} <alerts@{domain}>",
                "options": relay_options(smtp),
            },
        )
        channel = f"n{index}"
        await world.settings(
            "settings.channel.put",
            {"name": channel, "domain": domain, "recipients": world.recipients},
        )
        created = await world.ok(
            "ticket.new", {"channel": channel, "ticket": {"title": "Disk full", "body": "x"}}
        )
        names[created["sid"]] = (name, f"alerts@{domain}")

    received = by_sid(await smtp.wait_for(len(names)))

    def sender(received: Received) -> tuple[str, str]:
        (address,) = hostile.read(received.raw)["From"].addresses
        return address.display_name, address.addr_spec

    assert {sid: (ticket_shape(), name) for sid, name in names.items()} == {
        sid: (shape(received[sid, None]), sender(received[sid, None])) for sid in names
    }
    # The envelope sender is the address alone.
    assert {address for _, address in names.values()} == {r.sender for r in received.values()}


@pytest.mark.parametrize(
    "sender",
    ["alerts@{domain}", "Alerts <alerts@{domain}>", '"Alerts" <alerts@{domain}>'],
    ids=["address", "name", "quoted-name"],
)
async def test_from_header_is_exactly_the_domains_from(world: World, sender: str):
    given = sender.format(domain=world.domain)
    await world.settings("settings.email.update", {"domain": world.domain, "from": given})

    await world.new_ticket()

    (received,) = await world.smtp.wait_for(1)
    from_lines = [line for line in received.raw.split(b"\r\n") if line.startswith(b"From:")]
    assert [f"From: {given}".encode()] == from_lines


async def test_every_hostile_body_is_the_email_body_literally(world: World):
    bodies = {await world.new_ticket(body=body): body for body, _ in hostile.BODY_SAFE}

    received = by_sid(await world.smtp.wait_for(len(bodies)))

    assert {
        sid: (ticket_shape(), f"{body}\n\nSeverity: medium\nTicket: {sid}\n")
        for sid, body in bodies.items()
    } == {
        sid: (shape(received[sid, None]), hostile.text_of(hostile.read(received[sid, None].raw)))
        for sid in bodies
    }


async def test_every_hostile_summary_and_hit_body_is_the_email_body_literally(world: World):
    sid = await world.new_ticket()
    texts = {}
    for text, _ in hostile.BODY_SAFE:
        seq = (await world.ok("hit.new", {"sid": sid, "hit": {"summary": text, "body": text}}))[
            "seq"
        ]
        texts[str(seq)] = text

    received = by_sid(await world.smtp.wait_for(1 + len(texts)))

    assert {
        seq: (ticket_shape(hostile.HIT_HEADERS), f"{text}\n\n{text}\n\nTicket: {sid}\nHit: {seq}\n")
        for seq, text in texts.items()
    } == {
        seq: (shape(received[sid, seq]), hostile.text_of(hostile.read(received[sid, seq].raw)))
        for seq in texts
    }
