"""The `schemas` models and the JSON Schemas of `schemas/json/` are the truth about the wire: every
event a real worker publishes in a scenario that raises each event type, every reply it sends
and every command sent to it validate against them strictly, and the models dump back exactly
what was received (so no field is missing from a model, none is extra, none is coerced).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema
import pytest

from schemas import EVENTS, reply_adapter
from tests.support.environment import Env
from tests.support.logs import remember_secrets
from tests.support.payloads import relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from worker import contract

REJECTED = "550 5.7.1 rejected"


@cache
def json_schema(path: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((contract.DIRECTORY / contract.JSON_DIR / path).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@dataclass
class Wire:
    """Sends commands through the test client and keeps every body and reply, as bytes."""

    env: Env
    exchanges: list[tuple[str, bytes, bytes]] = field(default_factory=list)

    async def send(self, type_: str, auth: Any, data: Any, **kw: Any) -> dict[str, Any]:
        body = json.dumps({"type": type_, "auth": auth, "data": data}).encode()
        remember_secrets(json.loads(body))
        message = await self.env.client.call_raw(body, type_, **kw)
        self.exchanges.append((type_, body, message.body))
        reply: dict[str, Any] = json.loads(message.body)
        remember_secrets(reply)
        return reply

    async def ok(self, type_: str, auth: Any, data: Any) -> dict[str, Any]:
        reply = await self.send(type_, auth, data)
        assert "success" == reply["status"], reply
        result: dict[str, Any] = reply["data"]
        return result


@pytest.fixture
async def relays() -> AsyncIterator[tuple[SmtpServer, SmtpServer]]:
    async with (
        SmtpServer(auth=("relay-user", f"relay-{uuid.uuid4().hex}")) as accepting,
        SmtpServer(script={"DATA": itertools.repeat(REJECTED)}) as rejecting,
    ):
        yield accepting, rejecting


async def scenario(env: Env, accepting: SmtpServer, rejecting: SmtpServer) -> Wire:
    """One owner does a bit of everything, so that every event type is published."""
    wire = Wire(env)
    owner = await env.new_owner()
    good, bad, spare = unique_domain(), unique_domain(), unique_domain()
    for domain, relay in ((good, accepting), (bad, rejecting)):
        await wire.ok("settings.email.create", owner, {
            "domain": domain, "provider": "smtp", "from": f"Alerts <alerts@{domain}>",
            "description": "relay", "options": relay_options(relay),
        })  # fmt: skip
    await wire.ok("settings.email.create", owner, {
        "domain": spare, "provider": "smtp", "from": f"alerts@{spare}",
        "options": {"host": "smtp.example.com", "port": 587,
                    "auth": {"user": "u", "pass": f"p-{uuid.uuid4().hex}"}},
    })  # fmt: skip
    await wire.ok("settings.email.update", owner, {"domain": good, "description": None})
    await wire.ok("settings.email.get", owner, {"domain": good})
    await wire.ok("settings.email.test", owner, {"domain": good})
    user = await wire.ok("settings.smtp_user.add", owner, {"total_limit": 50, "hourly_limit": 50})
    name = user["smtp_user_name"]
    await wire.ok("settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": "Enable"})
    reset = await wire.ok("settings.smtp_user.reset_password", owner, {"smtp_user_name": name})
    await wire.ok("settings.smtp_user.list", owner, {})
    recipients = ["oncall@example.com"]
    await wire.ok(
        "settings.channel.put", owner, {"name": "ops", "domain": good, "recipients": recipients}
    )
    await wire.ok("settings.channel.put", owner, {
        "name": "broken", "domain": bad, "recipients": recipients, "subject_prefix": "!",
    })  # fmt: skip
    await wire.ok("settings.channel.get", owner, {"name": "ops"})
    await wire.ok("settings.channel.list", owner, {})

    auth = {"login": name, "password": reset["smtp_password"]}
    ticket = {"title": "Disk full", "body": "97% used", "severity": "high", "dedup_key": "disk"}
    sid = (await wire.ok("ticket.new", auth, {"channel": "ops", "ticket": ticket}))["sid"]
    await wire.ok("ticket.new", auth, {"channel": "ops", "ticket": ticket})  # deduplicated: a hit
    await wire.ok("hit.new", auth, {"sid": sid, "hit": {"summary": "98%", "body": "still"}})
    load = {"channel": "broken", "ticket": {"title": "Load", "body": ""}}
    other = (await wire.ok("ticket.new", auth, load))["sid"]
    await env.client.wait_events("email.sent", 3)
    await env.client.wait_events("email.failed", 1)
    await wire.ok("ticket.ack", auth, {"sid": sid})
    await wire.ok("hit.new", auth, {"sid": sid, "hit": {"summary": "acked: no email"}})
    await wire.ok("ticket.unack_many", auth, {"sids": [sid]})
    await wire.ok("ticket.ack_many", auth, {"sids": [other]})
    await wire.ok("ticket.unack", auth, {"sid": other})
    await wire.ok("ticket.close", auth, {"sid": sid, "comment": "fixed"})
    await wire.ok("ticket.close_many", auth, {"sids": [other]})
    await wire.ok("ticket.get", auth, {"sid": sid})
    await wire.ok("ticket.get_many", auth, {"sids": [other, sid]})
    await wire.ok("hit.list", auth, {"sid": sid, "limit": 2})
    refused = await wire.send("ticket.ack", auth, {"sid": sid})  # closed: Conflict
    assert "Conflict" == refused["error"]["name"]
    wrong = {"login": name, "password": "wrong"}
    await wire.send("ticket.get", wrong, {"sid": sid}, message_id=uuid.uuid4().hex)
    await wire.ok("settings.channel.delete", owner, {"name": "broken"})
    await wire.ok("settings.email.delete", owner, {"domain": bad})
    await wire.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})
    await env.client.wait_events("smtp_user.deleted")
    return wire


async def test_every_event_reply_and_command_matches_the_models_and_json_schemas(
    env: Env, relays: tuple[SmtpServer, SmtpServer]
) -> None:
    wire = await scenario(env, *relays)

    types = {event["type"] for event in env.client.events}
    assert set(EVENTS) == types, "the scenario raises every event type"
    assert None in {e["owner_id"] for e in env.client.events if e["type"] == "command.failed"}
    for event in env.client.events:
        raw = json.dumps(event)
        model = EVENTS[event["type"]].model_validate_json(raw, strict=True)
        assert event == model.model_dump(mode="json", by_alias=True), event["type"]
        json_schema(f"events/{event['type']}.json").validate(event)
    for type_, body, raw_reply in wire.exchanges:
        adapter = reply_adapter(type_)
        reply = adapter.validate_json(raw_reply, strict=True)
        assert json.loads(raw_reply) == adapter.dump_python(reply, mode="json", by_alias=True)
        json_schema(f"replies/{type_}.json").validate(json.loads(raw_reply))
        json_schema(f"commands/{type_}.json").validate(json.loads(body))
