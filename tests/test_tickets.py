"""Ticket commands (contract sections 5, 7, 8): the email, the object, the status machine, batches.

Every test runs on both stores, with a worker consuming every queue and a real SMTP server as
the domain's relay.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.environment import Env
from tests.support.smtp_servers import SmtpServer
from tests.support.world import World, configure

TICKET_KEYS = {
    "sid",
    "channel",
    "title",
    "body",
    "severity",
    "dedup_key",
    "status",
    "created_at",
    "updated_at",
    "closed_at",
    "comment",
    "hit_count",
    "last_hit_at",
    "created_by",
    "delivery",
}
EVENT_KEYS = {"type", "id", "time", "owner_id", "data"}


def unknown_sid() -> str:
    """A SID shaped like a real one that names no ticket."""
    return secrets.token_urlsafe(16)


def state(ticket: dict[str, Any]) -> dict[str, Any]:
    """What commands change: everything but `delivery`, which the email's sending moves on."""
    return {key: value for key, value in ticket.items() if key != "delivery"}


async def states(world: World, sids: list[str]) -> list[dict[str, Any]]:
    return [
        state(ticket) for ticket in (await world.ok("ticket.get_many", {"sids": sids}))["tickets"]
    ]


def recent(iso: str) -> bool:
    """True for an ISO 8601 UTC time within the last minute."""
    moment = datetime.fromisoformat(iso)
    return moment.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - moment) < timedelta(
        minutes=1
    )


# --- the email ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject_prefix", "subject"),
    [(None, "[ops] Disk full"), ("ALERT:", "ALERT: Disk full")],
    ids=["default-prefix", "given-prefix"],
)
async def test_ticket_email_carries_every_contract_header(
    env: Env, smtp: SmtpServer, subject_prefix: str | None, subject: str
):
    world = await configure(env, smtp, subject_prefix=subject_prefix)

    sid = await world.new_ticket("Disk full")

    message = (await smtp.wait_for(1))[0].message
    expected = {
        "From": world.sender,
        "To": ", ".join(world.recipients),
        "Subject": subject,
        "Message-ID": f"<{sid}@{world.domain}>",
        "Auto-Submitted": "auto-generated",
        "X-Ticket-SID": sid,
    }
    assert expected == {name: str(message[name]) for name in expected}


async def test_ticket_email_is_dated_now(world: World):
    await world.new_ticket()

    message = (await world.smtp.wait_for(1))[0].message
    assert abs(datetime.now(UTC) - message["Date"].datetime) < timedelta(minutes=1)


async def test_ticket_email_goes_to_every_recipient_of_the_channel(world: World):
    await world.new_ticket()

    received = (await world.smtp.wait_for(1))[0]
    assert (f"alerts@{world.domain}", world.recipients) == (received.sender, received.recipients)


async def test_ticket_email_body_holds_the_body_severity_and_sid(world: World):
    sid = await world.new_ticket(body="disk /var is 97% full", severity="critical")

    text = (await world.smtp.wait_for(1))[0].message.get_content()
    for part in ("disk /var is 97% full", "critical", sid):
        assert part in text


# --- the ticket object --------------------------------------------------------------------------


async def test_ticket_object_has_every_field_of_the_contract(world: World):
    sid = await world.new_ticket("Disk full")
    await world.env.client.wait_events("email.sent")

    ticket = await world.ticket(sid)

    assert TICKET_KEYS == set(ticket)
    assert {
        "sid": sid,
        "channel": "ops",
        "title": "Disk full",
        "body": "97% used",
        "severity": "medium",
        "dedup_key": None,
        "status": "unacknowledged",
        "closed_at": None,
        "comment": None,
        "hit_count": 0,
        "last_hit_at": None,
        "created_by": world.user_name,
        "delivery": {"status": "sent", "attempts": 1, "last_error": None},
    } == {key: ticket[key] for key in TICKET_KEYS - {"created_at", "updated_at"}}


async def test_ticket_timestamps_are_utc_and_equal_at_creation(world: World):
    ticket = await world.ticket(await world.new_ticket())

    assert recent(ticket["created_at"])
    assert ticket["created_at"] == ticket["updated_at"]


async def test_ticket_keeps_the_given_severity_and_dedup_key(world: World):
    sid = await world.new_ticket(severity="critical", dedup_key="disk:/var")

    ticket = await world.ticket(sid)

    assert ("critical", "disk:/var") == (ticket["severity"], ticket["dedup_key"])


async def test_sids_are_long_url_safe_and_distinct(world: World):
    sids = await asyncio.gather(*(world.new_ticket(f"alert {n}") for n in range(20)))

    assert all(len(sid) >= 16 and re.fullmatch(r"[A-Za-z0-9_-]+", sid) for sid in sids), sids
    # Not a counter nor a clock: no two share even their first eight characters.
    assert 20 == len({sid[:8] for sid in sids})


# --- the status machine -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("commands", "status"),
    [
        ([], "unacknowledged"),
        (["ticket.ack"], "acknowledged"),
        (["ticket.ack", "ticket.ack"], "acknowledged"),
        (["ticket.ack", "ticket.unack"], "unacknowledged"),
        (["ticket.unack"], "unacknowledged"),
        (["ticket.close"], "closed"),
        (["ticket.ack", "ticket.close"], "closed"),
        (["ticket.close", "ticket.close"], "closed"),
    ],
    ids=["new", "ack", "ack-twice", "ack-unack", "unack-new", "close", "ack-close", "close-twice"],
)
async def test_status_follows_the_machine(world: World, commands: list[str], status: str):
    sid = await world.new_ticket()

    for type_ in commands:
        assert {} == await world.ok(type_, {"sid": sid})

    assert status == (await world.ticket(sid))["status"]


async def test_close_records_closed_at_and_the_comment(world: World):
    sid = await world.new_ticket()

    await world.ok("ticket.close", {"sid": sid, "comment": "disk replaced"})

    ticket = await world.ticket(sid)
    assert "disk replaced" == ticket["comment"]
    assert recent(ticket["closed_at"])
    assert ticket["closed_at"] == ticket["updated_at"]


async def test_closing_a_closed_ticket_keeps_the_first_close(world: World):
    sid = await world.new_ticket()
    await world.ok("ticket.close", {"sid": sid, "comment": "first"})
    first = state(await world.ticket(sid))

    await world.ok("ticket.close", {"sid": sid, "comment": "second"})

    assert first == state(await world.ticket(sid))


@pytest.mark.parametrize(
    ("type_", "data"),
    [
        ("ticket.ack", lambda sid: {"sid": sid}),
        ("ticket.ack_many", lambda sid: {"sids": [sid]}),
        ("ticket.unack", lambda sid: {"sid": sid}),
        ("ticket.unack_many", lambda sid: {"sids": [sid]}),
        ("hit.new", lambda sid: {"sid": sid, "hit": {"summary": "again"}}),
    ],
    ids=["ack", "ack_many", "unack", "unack_many", "hit"],
)
async def test_closed_ticket_refuses_with_conflict(
    world: World, type_: str, data: Callable[[str], dict[str, Any]]
):
    sid = await world.new_ticket()
    await world.ok("ticket.close", {"sid": sid})
    closed = state(await world.ticket(sid))

    error = await world.error(type_, data(sid))

    assert "Conflict" == error["name"]
    assert closed == state(await world.ticket(sid))


async def test_ack_many_with_one_closed_ticket_acks_none(world: World):
    open_sid, closed_sid = await world.new_ticket("a"), await world.new_ticket("b")
    await world.ok("ticket.close", {"sid": closed_sid})

    error = await world.error("ticket.ack_many", {"sids": [open_sid, closed_sid]})

    assert "Conflict" == error["name"]
    assert "unacknowledged" == (await world.ticket(open_sid))["status"]


# --- get_many and all-or-nothing batches ---------------------------------------------------------


async def test_get_many_keeps_the_asked_order(world: World):
    first, second, third = [await world.new_ticket(f"alert {n}") for n in range(3)]

    found = await world.ok("ticket.get_many", {"sids": [third, first, second]})

    assert [third, first, second] == [ticket["sid"] for ticket in found["tickets"]]


@pytest.mark.parametrize(
    ("type_", "ack_first"),
    [
        ("ticket.get_many", False),
        ("ticket.close_many", False),
        ("ticket.ack_many", False),
        ("ticket.unack_many", True),
    ],
    ids=["get_many", "close_many", "ack_many", "unack_many"],
)
async def test_batch_with_one_unknown_sid_changes_nothing_and_names_it(
    world: World, type_: str, ack_first: bool
):
    sids = [await world.new_ticket(f"alert {n}") for n in range(2)]
    if ack_first:
        await world.ok("ticket.ack_many", {"sids": sids})
    before = await states(world, sids)
    missing = unknown_sid()

    error = await world.error(type_, {"sids": [sids[0], missing, sids[1]]})

    assert ("NotFound", {"missing": [missing]}) == (error["name"], error["details"])
    assert before == await states(world, sids)


async def test_batch_names_every_unknown_sid_in_the_asked_order(world: World):
    sid = await world.new_ticket()
    missing = [unknown_sid(), unknown_sid()]

    error = await world.error("ticket.close_many", {"sids": [missing[0], sid, missing[1]]})

    assert {"missing": missing} == error["details"]


# --- tenants ------------------------------------------------------------------------------------


async def intruder(env: Env) -> dict[str, str]:
    """The `auth` of an SMTP user of another owner."""
    owner = await env.new_owner("intruder")
    user = await env.client.ok(
        "settings.smtp_user.add", owner, {"total_limit": 10, "hourly_limit": 10}
    )
    return {"login": user["smtp_user_name"], "password": user["smtp_password"]}


ONE_SID: list[tuple[str, Callable[[str], dict[str, Any]]]] = [
    ("ticket.get", lambda sid: {"sid": sid}),
    ("ticket.get_many", lambda sid: {"sids": [sid]}),
    ("ticket.close", lambda sid: {"sid": sid}),
    ("ticket.close_many", lambda sid: {"sids": [sid]}),
    ("ticket.ack", lambda sid: {"sid": sid}),
    ("ticket.ack_many", lambda sid: {"sids": [sid]}),
    ("ticket.unack", lambda sid: {"sid": sid}),
    ("ticket.unack_many", lambda sid: {"sids": [sid]}),
    ("hit.new", lambda sid: {"sid": sid, "hit": {"summary": "again"}}),
    ("hit.list", lambda sid: {"sid": sid}),
]


@pytest.mark.parametrize(("type_", "data"), ONE_SID, ids=[type_ for type_, _ in ONE_SID])
async def test_another_owners_user_gets_not_found_and_changes_nothing(
    world: World, type_: str, data: Callable[[str], dict[str, Any]]
):
    sid = await world.new_ticket()
    before = state(await world.ticket(sid))

    reply = await world.env.client.call(type_, await intruder(world.env), data(sid))

    assert ("NotFound", {"missing": [sid]}) == (reply["error"]["name"], reply["error"]["details"])
    assert before == state(await world.ticket(sid))


async def test_another_owners_ticket_answers_exactly_as_a_missing_one(world: World):
    sid = await world.new_ticket()
    auth = await intruder(world.env)
    missing = unknown_sid()

    foreign = await world.env.client.call("ticket.get", auth, {"sid": sid})
    absent = await world.env.client.call("ticket.get", auth, {"sid": missing})

    assert absent["error"] == {
        "name": foreign["error"]["name"],
        "message": foreign["error"]["message"].replace(sid, missing),
        "details": {"missing": [missing]},
    }


# --- events -------------------------------------------------------------------------------------


async def test_ticket_new_publishes_ticket_created(world: World):
    sid = await world.new_ticket("Disk full", severity="high")

    (event,) = await world.env.client.wait_events("ticket.created")

    assert EVENT_KEYS == set(event)
    assert (world.owner["owner_id"], sid, "ops", "Disk full", "high") == (
        event["owner_id"],
        event["data"]["sid"],
        event["data"]["channel"],
        event["data"]["title"],
        event["data"]["severity"],
    )
    assert recent(event["time"])


@pytest.mark.parametrize(
    ("commands", "event_type"),
    [
        (["ticket.close"], "ticket.closed"),
        (["ticket.ack"], "ticket.acked"),
        (["ticket.ack", "ticket.unack"], "ticket.unacked"),
    ],
    ids=["close", "ack", "unack"],
)
async def test_status_change_publishes_its_event(
    world: World, commands: list[str], event_type: str
):
    sid = await world.new_ticket()

    for type_ in commands:
        await world.ok(type_, {"sid": sid})

    (event,) = await world.env.client.wait_events(event_type)
    assert (world.owner["owner_id"], sid) == (event["owner_id"], event["data"]["sid"])


async def test_close_many_publishes_one_ticket_closed_per_ticket(world: World):
    sids = [await world.new_ticket(f"alert {n}") for n in range(3)]

    await world.ok("ticket.close_many", {"sids": sids, "comment": "maintenance"})

    events = await world.env.client.wait_events("ticket.closed", 3)
    assert sorted(sids) == sorted(event["data"]["sid"] for event in events)


async def test_closing_a_closed_ticket_publishes_no_second_event(world: World):
    sid = await world.new_ticket()
    await world.ok("ticket.close", {"sid": sid})
    await world.ok("ticket.close", {"sid": sid})
    # Events reach the client's queue in order: once a later one is in, so is the second
    # close's, had it published one.
    await world.new_ticket("later")
    await world.env.client.wait_events("ticket.created", 2)

    assert 1 == len([e for e in world.env.client.events if e["type"] == "ticket.closed"])


# --- idempotency --------------------------------------------------------------------------------


async def test_ticket_new_repeated_with_one_message_id_opens_one_ticket_and_sends_one_email(
    world: World,
):
    first = await world.call("ticket.new", world.ticket_data(), message_id="alert-42")
    second = await world.call("ticket.new", world.ticket_data(), message_id="alert-42")
    # A later ticket's email is the sign that the deliveries published before it have run.
    await world.new_ticket("later")
    await world.smtp.wait_for(2)

    assert first == second
    assert "success" == first["status"]
    assert (2, 2) == (await world.stored("tickets"), await world.stored("emails"))
    assert ["[ops] Disk full", "[ops] later"] == sorted(
        str(received.message["Subject"]) for received in world.smtp.messages
    )
