"""Control and bidirectional characters in text (contract section 5), field by field.

Fields that reach a header (`title`, `subject_prefix`, the display name of `from`) refuse control
characters (U+0000-U+001F, U+007F-U+009F), the line and paragraph separators and bidirectional
controls (U+202A-U+202E, U+2066-U+2069) with ValidationError; fields that reach only a body
(`body`, `summary`, `comment`, `description`) refuse them too, but keep TAB and line breaks (CR,
LF and the line and paragraph separators, which are no control characters).
A refused command changes nothing. Every test runs on both stores.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.hostile import BODY_ONLY, REFUSED_IN_BODIES, REFUSED_IN_HEADERS
from tests.support.payloads import relay_options
from tests.support.tenants import unique_domain
from tests.support.world import World


@dataclass(frozen=True)
class Field:
    """How to put `text` in one field of one command, and what a refusal must leave as it was."""

    loc: list[str]
    send: Callable[[World, str, str], Awaitable[dict[str, Any]]]  # (world, sid, text) -> reply
    state: Callable[[World, str], Awaitable[Any]]  # (world, sid) -> what must not change


async def owner_call(world: World, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return await world.env.client.call(type_, world.owner, data)


async def tickets_and_settings(world: World, sid: str) -> Any:
    rows = await world.env.query(
        "SELECT (SELECT count(*) FROM tickets WHERE owner_id = :o),"
        " (SELECT count(*) FROM email_settings WHERE owner_id = :o)",
        o=world.owner["owner_id"],
    )
    return tuple(rows[0])


async def the_ticket(world: World, sid: str) -> Any:
    # Everything but `delivery`, which the ticket's email moves on meanwhile.
    ticket = {key: value for key, value in (await world.ticket(sid)).items() if key != "delivery"}
    return ticket, await world.ok("hit.list", {"sid": sid})


async def the_settings(world: World, sid: str) -> Any:
    return await world.settings("settings.email.get", {"domain": world.domain})


async def the_channel(world: World, sid: str) -> Any:
    return await world.settings("settings.channel.get", {"name": world.channel})


def create_settings(**fields: Any) -> Callable[[World, str, str], Awaitable[dict[str, Any]]]:
    """settings.email.create for a new domain, with `fields` formatted with text and domain."""

    async def send(world: World, sid: str, text: str) -> dict[str, Any]:
        domain = unique_domain()
        data = {
            "domain": domain,
            "provider": "smtp",
            "from": f"alerts@{domain}",
            "options": relay_options(world.smtp),
        }
        data |= {key: value.format(text=text, domain=domain) for key, value in fields.items()}
        return await owner_call(world, "settings.email.create", data)

    return send


def update_settings(**fields: Any) -> Callable[[World, str, str], Awaitable[dict[str, Any]]]:
    """settings.email.update of the world's domain, `fields` formatted with text and domain."""

    async def send(world: World, sid: str, text: str) -> dict[str, Any]:
        data = {"domain": world.domain}
        data |= {key: value.format(text=text, domain=world.domain) for key, value in fields.items()}
        return await owner_call(world, "settings.email.update", data)

    return send


HEADER_FIELDS = {
    "title": Field(
        ["data", "ticket", "title"],
        lambda w, sid, text: w.call("ticket.new", w.ticket_data(f"Disk{text}full")),
        tickets_and_settings,
    ),
    "subject_prefix": Field(
        ["data", "subject_prefix"],
        lambda w, sid, text: owner_call(
            w,
            "settings.channel.put",
            {
                "name": w.channel,
                "domain": w.domain,
                "recipients": ["evil@example.com"],
                "subject_prefix": f"[ops{text}]",
            },
        ),
        the_channel,
    ),
    "from-create-quoted": Field(
        ["data", "from"],
        create_settings(**{"from": '"Al{text}erts" <alerts@{domain}>'}),
        tickets_and_settings,
    ),
    "from-update": Field(
        ["data", "from"],
        update_settings(**{"from": "Al{text}erts <x@{domain}>"}),
        the_settings,
    ),
}
BODY_FIELDS = {
    "body": Field(
        ["data", "ticket", "body"],
        lambda w, sid, text: w.call("ticket.new", w.ticket_data(body=f"97%{text}used")),
        tickets_and_settings,
    ),
    "summary": Field(
        ["data", "hit", "summary"],
        lambda w, sid, text: w.call("hit.new", {"sid": sid, "hit": {"summary": f"a{text}b"}}),
        the_ticket,
    ),
    "hit-body": Field(
        ["data", "hit", "body"],
        lambda w, sid, text: w.call(
            "hit.new", {"sid": sid, "hit": {"summary": "again", "body": f"a{text}b"}}
        ),
        the_ticket,
    ),
    "comment-close": Field(
        ["data", "comment"],
        lambda w, sid, text: w.call("ticket.close", {"sid": sid, "comment": f"a{text}b"}),
        the_ticket,
    ),
    "comment-close-many": Field(
        ["data", "comment"],
        lambda w, sid, text: w.call("ticket.close_many", {"sids": [sid], "comment": f"a{text}b"}),
        the_ticket,
    ),
    "description-create": Field(
        ["data", "description"],
        create_settings(description="a{text}b"),
        tickets_and_settings,
    ),
    "description-update": Field(
        ["data", "description"],
        update_settings(description="a{text}b"),
        the_settings,
    ),
}


async def verdicts(world: World, field: Field, texts: list[tuple[str, str]]) -> dict[str, Any]:
    """The error name and its distinct locations for each text put in `field`."""
    sid = await world.new_ticket()
    before = await field.state(world, sid)
    found = {}
    for text, name in texts:
        reply = await field.send(world, sid, text)
        error = reply.get("error") or {}
        # Distinct locations: the consumer's own NUL check adds a second entry for U+0000.
        locs = {tuple(detail["loc"]) for detail in error.get("details", [])}
        found[name] = (error.get("name"), sorted(locs))
    assert before == await field.state(world, sid), "a refused command changed something"
    return found


@pytest.mark.parametrize("field", HEADER_FIELDS.values(), ids=HEADER_FIELDS.keys())
async def test_header_field_refuses_control_and_bidirectional_characters(
    world: World, field: Field
):
    found = await verdicts(world, field, REFUSED_IN_HEADERS)

    refused = ("ValidationError", [tuple(field.loc)])
    assert {name: refused for _, name in REFUSED_IN_HEADERS} == found


@pytest.mark.parametrize("field", BODY_FIELDS.values(), ids=BODY_FIELDS.keys())
async def test_body_field_refuses_control_and_bidirectional_characters(world: World, field: Field):
    found = await verdicts(world, field, REFUSED_IN_BODIES)

    refused = ("ValidationError", [tuple(field.loc)])
    assert {name: refused for _, name in REFUSED_IN_BODIES} == found


# --- what a body field keeps --------------------------------------------------------------------


async def stored_body(world: World, text: str) -> Any:
    return (await world.ticket(await world.new_ticket(body=text)))["body"]


async def stored_hit(world: World, text: str) -> Any:
    sid = await world.new_ticket()
    await world.ok("hit.new", {"sid": sid, "hit": {"summary": text, "body": text}})
    (hit,) = (await world.ok("hit.list", {"sid": sid}))["hits"]
    return hit["summary"], hit["body"]


async def stored_comment(world: World, text: str) -> Any:
    sid = await world.new_ticket()
    await world.ok("ticket.close", {"sid": sid, "comment": text})
    return (await world.ticket(sid))["comment"]


async def stored_description(world: World, text: str) -> Any:
    await world.settings("settings.email.update", {"domain": world.domain, "description": text})
    return (await world.settings("settings.email.get", {"domain": world.domain}))["description"]


KEEPERS: dict[str, tuple[Callable[[World, str], Awaitable[Any]], Callable[[str], Any]]] = {
    "body": (stored_body, lambda text: text),
    "summary-and-hit-body": (stored_hit, lambda text: (text, text)),
    "comment": (stored_comment, lambda text: text),
    "description": (stored_description, lambda text: text),
}


@pytest.mark.parametrize("keeper", KEEPERS.values(), ids=KEEPERS.keys())
async def test_body_field_keeps_tab_and_line_breaks(
    world: World, keeper: tuple[Callable[[World, str], Awaitable[Any]], Callable[[str], Any]]
):
    stored, expected = keeper

    found = {name: await stored(world, f"a{char}b") for char, name in BODY_ONLY}

    assert {name: expected(f"a{char}b") for char, name in BODY_ONLY} == found
