"""Header injection (contract section 7): no line break reaches an email header.

A title (the Subject of every email of its ticket) or a subject prefix holding any character a
reader could take for the end of a line is refused as ValidationError, before anything is
stored; nothing reaches the SMTP server.
"""

from __future__ import annotations

import pytest

from tests.support.world import World

# Every character `str.splitlines()` ends a line on, and the classic smuggled header.
LINE_BREAKS = [
    ("\r\n", "CRLF"),
    ("\n", "LF"),
    ("\r", "CR"),
    ("\u2028", "LINE-SEPARATOR"),
    ("\u2029", "PARAGRAPH-SEPARATOR"),
    ("\x85", "NEL"),
    ("\v", "VT"),
    ("\f", "FF"),
    ("\x1c", "FS"),
    ("\x1d", "GS"),
    ("\x1e", "RS"),
]
TITLES = [
    *[(f"Disk{char}full", name) for char, name in LINE_BREAKS],
    ("x\r\nBcc: evil@example.com", "Bcc-header"),
    ("Disk full\r\n\r\nforged body", "forged-body"),
    ("Disk full\r\n", "trailing-CRLF"),
]


@pytest.mark.parametrize("title", [t for t, _ in TITLES], ids=[i for _, i in TITLES])
async def test_title_with_a_line_break_is_refused_before_anything_is_stored_or_sent(
    world: World, title: str
):
    error = await world.error("ticket.new", world.ticket_data(title))
    # A valid ticket after it: once its email is in, the refused one would have been too.
    await world.new_ticket("Disk full")

    received = await world.smtp.wait_for(1)
    assert "ValidationError" == error["name"]
    assert ["data", "ticket", "title"] in [detail["loc"] for detail in error["details"]]
    assert (1, 1) == (await world.stored("tickets"), await world.stored("emails"))
    assert [("[ops] Disk full", [])] == [
        (str(r.message["Subject"]), r.message.get_all("Bcc", [])) for r in received
    ]


async def test_dedup_repeat_with_a_smuggled_header_adds_no_hit(world: World):
    sid = await world.new_ticket("Disk full", dedup_key="disk")

    error = await world.error(
        "ticket.new", world.ticket_data("x\r\nBcc: evil@example.com", dedup_key="disk")
    )

    assert "ValidationError" == error["name"]
    assert 0 == (await world.ticket(sid))["hit_count"]


PREFIXES = [
    ("[ops]\r\nBcc: evil@example.com", "Bcc-header"),
    ("[ops]\n", "LF"),
    ("[ops]\r", "CR"),
    ("[ops]\u2028", "LINE-SEPARATOR"),
    ("[ops]\x85", "NEL"),
]


@pytest.mark.parametrize("prefix", [p for p, _ in PREFIXES], ids=[i for _, i in PREFIXES])
async def test_subject_prefix_with_a_line_break_is_refused(world: World, prefix: str):
    reply = await world.env.client.call(
        "settings.channel.put",
        world.owner,
        {
            "name": "injected",
            "domain": world.domain,
            "recipients": ["oncall@example.com"],
            "subject_prefix": prefix,
        },
    )

    assert "ValidationError" == reply["error"]["name"]
    assert ["data", "subject_prefix"] in [detail["loc"] for detail in reply["error"]["details"]]


async def test_refused_subject_prefix_leaves_the_channel_as_it_was(world: World):
    channel = await world.settings("settings.channel.get", {"name": "ops"})

    reply = await world.env.client.call(
        "settings.channel.put",
        world.owner,
        {
            "name": "ops",
            "domain": world.domain,
            "recipients": ["evil@example.com"],
            "subject_prefix": "[ops]\r\nBcc: evil@example.com",
        },
    )

    assert "ValidationError" == reply["error"]["name"]
    assert channel == await world.settings("settings.channel.get", {"name": "ops"})
