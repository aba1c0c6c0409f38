"""Tenant isolation (contract section 5): another owner's object answers exactly as a missing one.

For every command type, a second owner (with its own owner credentials for settings commands,
its SMTP user's for ticket and hit commands) aims at the first owner's domain, SMTP user,
channels, tickets and hits. Each probe gets `NotFound`, with the same error a name that exists
nowhere gets; or, for commands that name nothing of the first owner's (lists, creations), an
answer about the second owner's objects only. Afterwards the first owner's view is unchanged
and no email was sent on its behalf.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from schemas import COMMANDS, OwnerAuth
from tests.support.environment import Env
from tests.support.payloads import email_settings, relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from worker.security import new_id

Auth = dict[str, str]


@dataclass(frozen=True)
class Refs:
    """The names a probe aims at: the first owner's objects, or names that exist nowhere."""

    domain: str
    user: str
    channel: str  # a channel name only the first owner has
    sid: str  # an unacknowledged ticket, with a hit
    acked_sid: str  # an acknowledged ticket

    @classmethod
    def nowhere(cls) -> Refs:
        return cls(unique_domain(), f"smtp_{uuid.uuid4().hex[:16]}", "nowhere", new_id(), new_id())

    def placeholders(self, text: str) -> str:
        """`text` with each of these names replaced by what it stands for."""
        for name, value in vars(self).items():
            text = text.replace(value, f"<{name}>")
        return text


@dataclass(frozen=True)
class Tenant:
    owner: Auth
    user: str
    user_auth: Auth
    domain: str
    sid: str


SHARED_CHANNEL = "ops"  # both owners have a channel of this name, each on its own domain
DEDUP_KEY = "disk-full"  # the first owner's open ticket on SHARED_CHANNEL has this dedup key
PROBE_PASS = "probe-pass-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Probe:
    """One command of the second owner: its data, given the names it aims at, and the answer.

    `answer` is NotFound, Conflict or success; for a success, `shows` projects the reply's data
    and `expect` says what it must be, from the second owner's own objects.
    """

    data: Callable[[Refs, Tenant], dict[str, Any]]
    answer: str = "NotFound"
    shows: Callable[[dict[str, Any]], Any] | None = None
    expect: Callable[[Tenant], Any] | None = None


def _ticket(title: str, **fields: Any) -> dict[str, Any]:
    return {"title": title, "body": "probe", **fields}


MATRIX: dict[str, list[Probe]] = {
    # Domains are global by contract ("already configured (by anyone) is a Conflict", section 6):
    # the answer tells that the domain is taken, and nothing more.
    "settings.email.create": [Probe(lambda r, b: email_settings(r.domain), "Conflict")],
    "settings.email.get": [Probe(lambda r, b: {"domain": r.domain})],
    "settings.email.update": [
        Probe(
            lambda r, b: {
                "domain": r.domain,
                "description": "hijacked",
                "options": {
                    "host": "evil.example.com",
                    "auth": {"user": "thief", "pass": PROBE_PASS},
                },
            }
        )
    ],
    "settings.email.delete": [Probe(lambda r, b: {"domain": r.domain})],
    "settings.email.test": [Probe(lambda r, b: {"domain": r.domain})],
    # A creation names nothing of the first owner's: the user is the second owner's.
    "settings.smtp_user.add": [
        Probe(
            lambda r, b: {"total_limit": 5, "hourly_limit": 5},
            "success",
            shows=lambda d: (d["status"], d["total_limit"]),
            expect=lambda b: ("Enable", 5),
        )
    ],
    "settings.smtp_user.edit": [
        Probe(lambda r, b: {"smtp_user_name": r.user, "status": "Disable", "total_limit": 1})
    ],
    "settings.smtp_user.reset_password": [Probe(lambda r, b: {"smtp_user_name": r.user})],
    "settings.smtp_user.list": [
        Probe(
            lambda r, b: {},
            "success",
            shows=lambda d: [u["smtp_user_name"] for u in d["smtp_list"]],
            expect=lambda b: [b.user],
        )
    ],
    "settings.smtp_user.delete": [Probe(lambda r, b: {"smtp_user_name": r.user})],
    "settings.channel.put": [
        # On the first owner's domain: its email settings are not the second owner's.
        Probe(
            lambda r, b: {
                "name": r.channel,
                "domain": r.domain,
                "recipients": ["thief@example.com"],
            }
        ),
        # The first owner's channel name, on the second owner's domain: a channel of its own.
        Probe(
            lambda r, b: {
                "name": r.channel,
                "domain": b.domain,
                "recipients": ["thief@example.com"],
            },
            "success",
            shows=lambda d: d["domain"],
            expect=lambda b: b.domain,
        ),
    ],
    "settings.channel.get": [Probe(lambda r, b: {"name": r.channel})],
    "settings.channel.list": [
        Probe(
            lambda r, b: {},
            "success",
            shows=lambda d: [(c["name"], c["domain"]) for c in d["channels"]],
            expect=lambda b: [(SHARED_CHANNEL, b.domain)],
        )
    ],
    "settings.channel.delete": [Probe(lambda r, b: {"name": r.channel})],
    "ticket.new": [
        Probe(lambda r, b: {"channel": r.channel, "ticket": _ticket("probe")}),
        # Same channel name and dedup key as the first owner's open ticket: a new ticket of the
        # second owner's, not a hit folded into the first owner's.
        Probe(
            lambda r, b: {
                "channel": SHARED_CHANNEL,
                "ticket": _ticket("probe", dedup_key=DEDUP_KEY),
            },
            "success",
            shows=lambda d: d["created"],
            expect=lambda b: True,
        ),
    ],
    "ticket.get": [Probe(lambda r, b: {"sid": r.sid})],
    "ticket.get_many": [Probe(lambda r, b: {"sids": [b.sid, r.sid]})],
    "ticket.close": [Probe(lambda r, b: {"sid": r.sid, "comment": "probe"})],
    "ticket.close_many": [Probe(lambda r, b: {"sids": [b.sid, r.sid], "comment": "probe"})],
    "ticket.ack": [Probe(lambda r, b: {"sid": r.sid})],
    "ticket.ack_many": [Probe(lambda r, b: {"sids": [b.sid, r.sid]})],
    "ticket.unack": [Probe(lambda r, b: {"sid": r.acked_sid})],
    "ticket.unack_many": [Probe(lambda r, b: {"sids": [b.sid, r.acked_sid]})],
    "hit.new": [Probe(lambda r, b: {"sid": r.sid, "hit": {"summary": "probe"}})],
    "hit.list": [Probe(lambda r, b: {"sid": r.sid})],
}


@dataclass
class World:
    env: Env
    first: Tenant
    first_refs: Refs
    second: Tenant
    first_smtp: SmtpServer
    second_smtp: SmtpServer

    async def first_view(self) -> dict[str, Any]:
        """Everything the first owner can see of its objects (each reply, but its command_id)."""
        c, owner, user = self.env.client, self.first.owner, self.first.user_auth
        r = self.first_refs
        asked = {
            "settings": ("settings.email.get", owner, {"domain": r.domain}),
            "users": ("settings.smtp_user.list", owner, {}),
            "channels": ("settings.channel.list", owner, {}),
            "tickets": ("ticket.get_many", user, {"sids": [r.sid, r.acked_sid]}),
            "hits": ("hit.list", user, {"sid": r.sid}),
        }
        view = {}
        for name, (type_, auth, data) in asked.items():
            reply = await c.call(type_, auth, data)
            view[name] = {k: v for k, v in reply.items() if k != "command_id"}
        return view

    async def first_emails(self) -> int:
        """Emails the store holds for the first owner, or for its domain."""
        rows = await self.env.query(
            "SELECT count(*) FROM emails WHERE owner_id = :owner OR domain = :domain",
            owner=self.first.owner["owner_id"],
            domain=self.first.domain,
        )
        return int(rows[0][0])

    async def deliveries_settled(self, timeout: float = 15) -> None:
        """Waits until no email of the two owners is waiting to be sent.

        Only theirs: the store is shared by the whole session, and other tests leave emails
        pending on purpose (relays that never answer)."""
        deadline = asyncio.get_running_loop().time() + timeout
        pending = (
            "SELECT count(*) FROM emails WHERE status = 'pending' AND owner_id IN (:first, :second)"
        )
        owners = {"first": self.first.owner["owner_id"], "second": self.second.owner["owner_id"]}
        while (await self.env.query(pending, **owners))[0][0]:
            assert asyncio.get_running_loop().time() < deadline, "emails still pending"
            await asyncio.sleep(0.05)


async def tenant(env: Env, name: str, smtp: SmtpServer, channels: list[str]) -> Tenant:
    c = env.client
    owner = await env.new_owner(name)
    domain = unique_domain()
    await c.ok("settings.email.create", owner, email_settings(domain, **relay_options(smtp)))
    for channel in channels:
        recipients = [f"{name}-{channel}@example.com"]
        await c.ok(
            "settings.channel.put",
            owner,
            {"name": channel, "domain": domain, "recipients": recipients},
        )
    user = await c.ok("settings.smtp_user.add", owner, {"total_limit": 100, "hourly_limit": 100})
    user_auth = {"login": user["smtp_user_name"], "password": user["smtp_password"]}
    created = await c.ok(
        "ticket.new", user_auth, {"channel": SHARED_CHANNEL, "ticket": _ticket(f"{name} ticket")}
    )
    return Tenant(owner, user["smtp_user_name"], user_auth, domain, created["sid"])


@pytest.fixture
async def world(env: Env) -> AsyncIterator[World]:
    """Two owners. The first: channels `ops` and `a-only`, an unacknowledged ticket with a
    dedup key and a hit, an acknowledged ticket, every email delivered. The second: `ops`
    on its own domain and one ticket."""
    async with SmtpServer() as first_smtp, SmtpServer() as second_smtp:
        c = env.client
        first = await tenant(env, "first", first_smtp, [SHARED_CHANNEL, "a-only"])
        open_ticket = await c.ok(
            "ticket.new",
            first.user_auth,
            {"channel": SHARED_CHANNEL, "ticket": _ticket("disk full", dedup_key=DEDUP_KEY)},
        )
        await c.ok(
            "hit.new", first.user_auth, {"sid": open_ticket["sid"], "hit": {"summary": "again"}}
        )
        await c.ok("ticket.ack", first.user_auth, {"sid": first.sid})
        second = await tenant(env, "second", second_smtp, [SHARED_CHANNEL])
        refs = Refs(first.domain, first.user, "a-only", open_ticket["sid"], first.sid)
        world = World(env, first, refs, second, first_smtp, second_smtp)
        await world.deliveries_settled()
        yield world


def test_matrix_covers_every_command_type():
    assert sorted(COMMANDS) == sorted(MATRIX)


@pytest.mark.parametrize("type_", sorted(MATRIX), ids=str)
async def test_second_owner_reaches_nothing_of_the_first(world, type_):
    c, second = world.env.client, world.second
    auth = second.owner if COMMANDS[type_][0] is OwnerAuth else second.user_auth
    view, emails = await world.first_view(), await world.first_emails()
    sent = len(world.first_smtp.messages)

    for probe in MATRIX[type_]:
        reply = await c.call(type_, auth, probe.data(world.first_refs, second))
        answer = reply["error"]["name"] if reply["status"] == "error" else "success"
        assert probe.answer == answer, reply
        if answer == "NotFound":
            nowhere = Refs.nowhere()
            missing = await c.call(type_, auth, probe.data(nowhere, second))
            assert nowhere.placeholders(json.dumps(missing["error"])) == (
                world.first_refs.placeholders(json.dumps(reply["error"]))
            )
        elif answer == "success":
            assert probe.shows is not None and probe.expect is not None
            assert probe.expect(second) == probe.shows(reply["data"])

    await world.deliveries_settled()
    assert view == await world.first_view()
    assert emails == await world.first_emails()
    assert sent == len(world.first_smtp.messages)
