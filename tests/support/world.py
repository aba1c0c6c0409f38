"""A configured owner, ready to send tickets: the world the ticket, hit and delivery tests share.

Its tenant (tests/support/tenants.py) relays its domain to an SmtpServer of the test, and has
channel "ops" to RECIPIENTS and one SMTP user, whose login sends the ticket and hit commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support.environment import Env
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import BIG_LIMITS, RECIPIENTS, set_up_tenant, unique_domain


@dataclass
class World:
    """One owner's configured domain, channel and SMTP user, and the server its relay points at."""

    env: Env
    smtp: SmtpServer
    owner: dict[str, str]
    domain: str
    sender: str
    channel: str
    recipients: list[str]
    user_name: str
    password: str

    @property
    def auth(self) -> dict[str, str]:
        """The `auth` of ticket and hit commands: the SMTP user's login."""
        return {"login": self.user_name, "password": self.password}

    async def call(self, type_: str, data: Any, **kw: Any) -> dict[str, Any]:
        """A ticket or hit command as the SMTP user; returns the whole reply."""
        return await self.env.client.call(type_, self.auth, data, **kw)

    async def ok(self, type_: str, data: Any, **kw: Any) -> dict[str, Any]:
        """A ticket or hit command that must succeed; returns the reply's `data`."""
        return await self.env.client.ok(type_, self.auth, data, **kw)

    async def error(self, type_: str, data: Any, **kw: Any) -> dict[str, Any]:
        """A ticket or hit command that must fail; returns the reply's `error`."""
        reply = await self.call(type_, data, **kw)
        assert "error" == reply["status"], reply
        error: dict[str, Any] = reply["error"]
        return error

    async def settings(self, type_: str, data: Any) -> dict[str, Any]:
        """A settings command as the owner that must succeed; returns the reply's `data`."""
        return await self.env.client.ok(type_, self.owner, data)

    def ticket_data(self, title: str = "Disk full", **fields: Any) -> dict[str, Any]:
        return {"channel": self.channel, "ticket": {"title": title, "body": "97% used", **fields}}

    async def new_ticket(self, title: str = "Disk full", **fields: Any) -> str:
        """Opens a ticket on the channel; returns its SID."""
        created = await self.ok("ticket.new", self.ticket_data(title, **fields))
        assert created["created"] is True
        sid: str = created["sid"]
        return sid

    async def ticket(self, sid: str) -> dict[str, Any]:
        """The ticket object, as `ticket.get` shows it."""
        ticket: dict[str, Any] = (await self.ok("ticket.get", {"sid": sid}))["ticket"]
        return ticket

    def message_id(self, sid: str) -> str:
        """The Message-ID of a ticket's email: `<SID@DOMAIN>`."""
        return f"<{sid}@{self.domain}>"

    async def stored(self, table: str) -> int:
        """How many rows of `table` (tickets or emails) belong to this owner."""
        rows = await self.env.query(
            f"SELECT count(*) FROM {table} WHERE owner_id = :owner",
            owner=self.owner["owner_id"],
        )
        return int(rows[0][0])

    async def email_ids(self, sid: str) -> list[str]:
        """The store's email jobs of one ticket, oldest first."""
        rows = await self.env.query(
            "SELECT id FROM emails WHERE sid = :sid ORDER BY COALESCE(seq, 0)", sid=sid
        )
        return [row[0] for row in rows]


async def configure(
    env: Env,
    smtp: SmtpServer,
    *,
    recipients: list[str] = RECIPIENTS,
    channel: str = "ops",
    subject_prefix: str | None = None,
    limits: dict[str, int] = BIG_LIMITS,
    options: dict[str, Any] | None = None,
) -> World:
    """A new owner with a domain whose relay is `smtp`, a channel, and an SMTP user."""
    owner = await env.new_owner()
    domain = unique_domain()
    sender = f"Alerts <alerts@{domain}>"
    (login,) = await set_up_tenant(
        env.client.ok,
        owner,
        domain,
        options if options is not None else relay_options(smtp),
        sender=sender,
        channels={channel: recipients},
        subject_prefix=subject_prefix,
        limits=limits,
    )
    return World(
        env=env,
        smtp=smtp,
        owner=owner,
        domain=domain,
        sender=sender,
        channel=channel,
        recipients=list(recipients),
        user_name=login["login"],
        password=login["password"],
    )
