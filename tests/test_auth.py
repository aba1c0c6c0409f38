"""Credentials and tenants through the broker (contract section 5).

A caller learns nothing from a refusal: every bad `auth` gets the same AuthenticationError, and
another owner's domain, SMTP user or channel answers exactly as one that does not exist.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.support.environment import Env
from tests.support.payloads import email_settings
from tests.support.tenants import unique_domain

Owner = dict[str, str]
# What a test case sends: the command's `type` and its body, built from a world of one owner
# (`owner`) with one enabled SMTP user (`user`: its name and password).
Case = Callable[[Owner, dict[str, Any]], tuple[str, dict[str, Any]]]

NO_SUCH_TICKET = {"sid": "no-such-ticket-0000000"}
WRONG_TOKEN = "wrong-token-" + "0" * 32


def settings_cmd(auth: Any) -> tuple[str, dict[str, Any]]:
    return "settings.channel.list", {"type": "settings.channel.list", "auth": auth, "data": {}}


def ticket_cmd(auth: Any) -> tuple[str, dict[str, Any]]:
    return "ticket.get", {"type": "ticket.get", "auth": auth, "data": NO_SUCH_TICKET}


async def send(env: Env, type_: str, body: dict[str, Any]) -> dict[str, Any]:
    message = await env.client.call_raw(json.dumps(body).encode(), type_)
    reply: dict[str, Any] = json.loads(message.body)
    return reply


@pytest.fixture
async def user(env: Env, owner: Owner) -> dict[str, Any]:
    return await env.client.ok(
        "settings.smtp_user.add", owner, {"total_limit": 10, "hourly_limit": 10}
    )


# --- one AuthenticationError for every bad auth -------------------------------------------------

BAD_AUTH: list[Case] = [
    lambda o, u: settings_cmd({"owner_id": o["owner_id"], "token": WRONG_TOKEN}),
    lambda o, u: settings_cmd({"owner_id": "no-such-owner-000000", "token": o["token"]}),
    lambda o, u: settings_cmd({"owner_id": o["owner_id"], "token": ""}),
    lambda o, u: settings_cmd({"owner_id": o["owner_id"]}),
    lambda o, u: settings_cmd({"token": o["token"]}),
    lambda o, u: settings_cmd({"owner_id": o["owner_id"], "token": 12345}),
    lambda o, u: settings_cmd(None),
    lambda o, u: settings_cmd(o["token"]),
    lambda o, u: settings_cmd([o["owner_id"], o["token"]]),
    lambda o, u: settings_cmd({"login": u["smtp_user_name"], "password": u["smtp_password"]}),
    lambda o, u: (
        "settings.channel.list",
        {"type": "settings.channel.list", "data": {}},
    ),
    lambda o, u: ticket_cmd({"login": u["smtp_user_name"], "password": "wrong-" + "0" * 32}),
    lambda o, u: ticket_cmd({"login": "smtp_nosuchuser0000", "password": u["smtp_password"]}),
    lambda o, u: ticket_cmd({"login": u["smtp_user_name"]}),
    lambda o, u: ticket_cmd(o),
    lambda o, u: ("ticket.get", {"type": "ticket.get", "data": NO_SUCH_TICKET}),
]
BAD_AUTH_IDS = [
    "owner-wrong-token",
    "owner-unknown-id",
    "owner-empty-token",
    "owner-no-token",
    "owner-no-id",
    "owner-token-not-a-string",
    "owner-null",
    "owner-a-string",
    "owner-a-list",
    "owner-given-user-credentials",
    "owner-missing",
    "user-wrong-password",
    "user-unknown-login",
    "user-no-password",
    "user-given-owner-credentials",
    "user-missing",
]


@pytest.mark.parametrize("case", BAD_AUTH, ids=BAD_AUTH_IDS)
async def test_bad_auth_is_one_authentication_error(
    env: Env, owner: Owner, user: dict[str, Any], case: Case
):
    reference = await env.client.call(
        "settings.channel.list", {"owner_id": owner["owner_id"], "token": WRONG_TOKEN}, {}
    )

    reply = await send(env, *case(owner, user))

    assert reply["status"] == "error"
    assert reply["error"] == reference["error"]
    assert (reply["error"]["name"], reply["error"]["details"]) == ("AuthenticationError", None)


async def test_another_owners_token_does_not_authenticate(env: Env, owner: Owner):
    other = await env.new_owner("other")

    reply = await env.client.call(
        "settings.channel.list", {"owner_id": owner["owner_id"], "token": other["token"]}, {}
    )

    assert reply["error"]["name"] == "AuthenticationError"


async def test_auth_is_checked_before_data(env: Env, owner: Owner):
    reply = await env.client.call(
        "settings.smtp_user.add",
        {"owner_id": owner["owner_id"], "token": WRONG_TOKEN},
        {"total_limit": 0, "hourly_limit": "many"},
    )

    assert reply["error"]["name"] == "AuthenticationError"


async def test_refused_auth_changes_nothing(env: Env, owner: Owner, domain: str):
    await env.client.call(
        "settings.email.create",
        {"owner_id": owner["owner_id"], "token": WRONG_TOKEN},
        email_settings(domain),
    )

    reply = await env.client.call("settings.email.get", owner, {"domain": domain})

    assert reply["error"]["name"] == "NotFound"


# --- another owner's object answers as a missing one --------------------------------------------

Make = Callable[[Env, Owner], Awaitable[str]]


async def make_domain(env: Env, owner: Owner) -> str:
    domain = unique_domain()
    await env.client.ok("settings.email.create", owner, email_settings(domain))
    return domain


async def make_user(env: Env, owner: Owner) -> str:
    created = await env.client.ok(
        "settings.smtp_user.add", owner, {"total_limit": 10, "hourly_limit": 10}
    )
    name: str = created["smtp_user_name"]
    return name


async def make_channel(env: Env, owner: Owner) -> str:
    domain = await make_domain(env, owner)
    name = f"c{uuid.uuid4().hex[:12]}"
    await env.client.ok(
        "settings.channel.put",
        owner,
        {"name": name, "domain": domain, "recipients": ["ops@example.com"]},
    )
    return name


def missing_domain() -> str:
    return unique_domain()


def missing_user() -> str:
    return f"smtp_{uuid.uuid4().hex[:16]}"


def missing_channel() -> str:
    return f"c{uuid.uuid4().hex[:12]}"


FOREIGN = [
    ("settings.email.get", make_domain, missing_domain, lambda n: {"domain": n}),
    ("settings.email.update", make_domain, missing_domain, lambda n: {"domain": n}),
    ("settings.email.delete", make_domain, missing_domain, lambda n: {"domain": n}),
    ("settings.email.test", make_domain, missing_domain, lambda n: {"domain": n}),
    (
        "settings.channel.put",
        make_domain,
        missing_domain,
        lambda n: {"name": "ops", "domain": n, "recipients": ["ops@example.com"]},
    ),
    ("settings.smtp_user.edit", make_user, missing_user, lambda n: {"smtp_user_name": n}),
    (
        "settings.smtp_user.reset_password",
        make_user,
        missing_user,
        lambda n: {"smtp_user_name": n},
    ),
    ("settings.smtp_user.delete", make_user, missing_user, lambda n: {"smtp_user_name": n}),
    ("settings.channel.get", make_channel, missing_channel, lambda n: {"name": n}),
    ("settings.channel.delete", make_channel, missing_channel, lambda n: {"name": n}),
]
FOREIGN_IDS = [
    "email.get",
    "email.update",
    "email.delete",
    "email.test",
    "channel.put-domain",
    "smtp_user.edit",
    "smtp_user.reset_password",
    "smtp_user.delete",
    "channel.get",
    "channel.delete",
]


def anonymized(error: dict[str, Any], name: str) -> dict[str, Any]:
    """The error with the object's name taken out, to compare two errors about two names."""
    return {
        "name": error["name"],
        "message": re.sub(re.escape(name), "<name>", error["message"]),
        "details": {"missing": ["<name>" if n == name else n for n in error["details"]["missing"]]},
    }


@pytest.mark.parametrize(("type_", "make", "missing", "data"), FOREIGN, ids=FOREIGN_IDS)
async def test_another_owners_object_answers_as_a_missing_one(
    env: Env,
    owner: Owner,
    type_: str,
    make: Make,
    missing: Callable[[], str],
    data: Callable[[str], dict[str, Any]],
):
    foreign = await make(env, await env.new_owner("other"))
    absent = missing()

    foreign_reply = await env.client.call(type_, owner, data(foreign))
    missing_reply = await env.client.call(type_, owner, data(absent))

    assert missing_reply["error"]["name"] == "NotFound"
    assert missing_reply["error"]["details"] == {"missing": [absent]}
    assert anonymized(foreign_reply["error"], foreign) == anonymized(missing_reply["error"], absent)


async def test_another_owners_objects_are_not_listed(env: Env, owner: Owner):
    other = await env.new_owner("other")
    await make_user(env, other)
    await make_channel(env, other)

    users = await env.client.ok("settings.smtp_user.list", owner, {})
    channels = await env.client.ok("settings.channel.list", owner, {})

    assert (users, channels) == ({"smtp_list": []}, {"channels": []})
