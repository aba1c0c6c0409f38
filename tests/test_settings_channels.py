"""settings.channel.put / get / list / delete through the broker (contract section 6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from tests.support.environment import Env
from tests.support.payloads import email_settings
from tests.support.tenants import unique_domain

CHANNEL_KEYS = {"name", "domain", "recipients", "subject_prefix", "created_at", "updated_at"}


@pytest.fixture
async def owner(env: Env, domain: str) -> dict[str, str]:
    """An owner with email settings for `domain`."""
    owner = await env.new_owner()
    await env.client.ok("settings.email.create", owner, email_settings(domain))
    return owner


def channel(name: str, domain: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "domain": domain, "recipients": ["ops@example.com"], **fields}


async def put(env: Env, owner: dict[str, str], data: dict[str, Any]) -> dict[str, Any]:
    return await env.client.ok("settings.channel.put", owner, data)


# --- put ----------------------------------------------------------------------------------------


async def test_put_returns_the_channel_object(env: Env, owner: dict[str, str], domain: str):
    recipients = ["ops@example.com", "Oncall+alerts@example.org"]

    created = await put(env, owner, channel("ops", domain, recipients=recipients))

    assert set(created) == CHANNEL_KEYS
    assert (created["name"], created["domain"], created["recipients"]) == (
        "ops",
        domain,
        recipients,
    )
    assert created["created_at"] == created["updated_at"]


async def test_put_defaults_the_subject_prefix_to_the_bracketed_name(
    env: Env, owner: dict[str, str], domain: str
):
    created = await put(env, owner, channel("db-alerts", domain))

    assert created["subject_prefix"] == "[db-alerts]"


async def test_put_keeps_a_given_subject_prefix(env: Env, owner: dict[str, str], domain: str):
    created = await put(env, owner, channel("ops", domain, subject_prefix="ALERT:"))

    assert created["subject_prefix"] == "ALERT:"


async def test_second_put_replaces_the_channel(env: Env, owner: dict[str, str], domain: str):
    other_domain = unique_domain()
    await env.client.ok("settings.email.create", owner, email_settings(other_domain))
    await put(env, owner, channel("ops", domain, subject_prefix="[old]"))

    replaced = await put(
        env, owner, channel("ops", other_domain, recipients=["a@example.com", "b@example.com"])
    )

    assert (replaced["domain"], replaced["recipients"], replaced["subject_prefix"]) == (
        other_domain,
        ["a@example.com", "b@example.com"],
        "[ops]",
    )


async def test_second_put_keeps_created_at_and_advances_updated_at(
    env: Env, owner: dict[str, str], domain: str
):
    first = await put(env, owner, channel("ops", domain))

    second = await put(env, owner, channel("ops", domain, subject_prefix="[new]"))

    assert second["created_at"] == first["created_at"]
    assert datetime.fromisoformat(second["updated_at"]) > datetime.fromisoformat(
        first["created_at"]
    )


async def test_put_is_what_get_returns_next(env: Env, owner: dict[str, str], domain: str):
    await put(env, owner, channel("ops", domain))
    replaced = await put(env, owner, channel("ops", domain, recipients=["b@example.com"]))

    assert await env.client.ok("settings.channel.get", owner, {"name": "ops"}) == replaced


@pytest.mark.parametrize(
    "name",
    ["a", "ops", "db_alerts-2", "0", "x" * 64],
    ids=["one-char", "word", "underscore-dash-digit", "digit", "64-chars"],
)
async def test_put_accepts_a_name_of_the_pattern(
    env: Env, owner: dict[str, str], domain: str, name: str
):
    created = await put(env, owner, channel(name, domain))

    assert created["name"] == name


@pytest.mark.parametrize(
    "name",
    ["", "Ops", "a b", "a.b", "ops/1", "é", "x" * 65, 7],
    ids=["empty", "upper-case", "space", "dot", "slash", "non-ascii", "65-chars", "number"],
)
async def test_put_refuses_a_name_outside_the_pattern(
    env: Env, owner: dict[str, str], domain: str, name: Any
):
    reply = await env.client.call("settings.channel.put", owner, channel(name, domain))

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [["data", "name"]]


@pytest.mark.parametrize("count", [1, 100], ids=["one", "hundred"])
async def test_put_accepts_one_to_a_hundred_recipients(
    env: Env, owner: dict[str, str], domain: str, count: int
):
    recipients = [f"r{i}@example.com" for i in range(count)]

    created = await put(env, owner, channel("ops", domain, recipients=recipients))

    assert created["recipients"] == recipients


@pytest.mark.parametrize("count", [0, 101], ids=["none", "hundred-and-one"])
async def test_put_refuses_no_recipients_or_more_than_a_hundred(
    env: Env, owner: dict[str, str], domain: str, count: int
):
    recipients = [f"r{i}@example.com" for i in range(count)]

    reply = await env.client.call(
        "settings.channel.put", owner, channel("ops", domain, recipients=recipients)
    )

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [["data", "recipients"]]


@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "ops@localhost",
        "ops@@example.com",
        "ops@example.com\r\nBcc: x@evil.example",
        "",
    ],
    ids=["no-at", "single-label-domain", "double-at", "header-injection", "empty"],
)
async def test_put_refuses_an_invalid_recipient_address(
    env: Env, owner: dict[str, str], domain: str, address: str
):
    recipients = ["ops@example.com", address]

    reply = await env.client.call(
        "settings.channel.put", owner, channel("ops", domain, recipients=recipients)
    )

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [["data", "recipients", 1]]


async def test_put_refuses_a_subject_prefix_with_a_line_break(
    env: Env, owner: dict[str, str], domain: str
):
    reply = await env.client.call(
        "settings.channel.put", owner, channel("ops", domain, subject_prefix="[ops]\r\nBcc: x")
    )

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [["data", "subject_prefix"]]


async def test_put_to_a_domain_without_settings_is_not_found(env: Env, owner: dict[str, str]):
    unconfigured = unique_domain()

    reply = await env.client.call("settings.channel.put", owner, channel("ops", unconfigured))

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [unconfigured]}


async def test_put_to_another_owners_domain_is_not_found(env: Env, domain: str):
    other_domain = unique_domain()
    other = await env.new_owner("other")
    await env.client.ok("settings.email.create", other, email_settings(other_domain))
    owner = await env.new_owner()

    reply = await env.client.call("settings.channel.put", owner, channel("ops", other_domain))

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [other_domain]}


async def test_refused_put_stores_nothing(env: Env, owner: dict[str, str], domain: str):
    await env.client.call("settings.channel.put", owner, channel("ops", unique_domain()))

    assert await env.client.ok("settings.channel.list", owner, {}) == {"channels": []}


# --- get, list, delete --------------------------------------------------------------------------


async def test_get_of_a_missing_channel_is_not_found(env: Env, owner: dict[str, str]):
    reply = await env.client.call("settings.channel.get", owner, {"name": "ops"})

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": ["ops"]}


async def test_list_of_an_owner_without_channels_is_empty(env: Env, owner: dict[str, str]):
    assert await env.client.ok("settings.channel.list", owner, {}) == {"channels": []}


async def test_list_shows_the_owners_channels_by_name(env: Env, owner: dict[str, str], domain: str):
    web = await put(env, owner, channel("web", domain))
    db = await put(env, owner, channel("db", domain))
    other = await env.new_owner("other")
    other_domain = unique_domain()
    await env.client.ok("settings.email.create", other, email_settings(other_domain))
    await put(env, other, channel("cache", other_domain))

    assert await env.client.ok("settings.channel.list", owner, {}) == {"channels": [db, web]}


async def test_same_name_is_a_separate_channel_for_each_owner(
    env: Env, owner: dict[str, str], domain: str
):
    other = await env.new_owner("other")
    other_domain = unique_domain()
    await env.client.ok("settings.email.create", other, email_settings(other_domain))
    mine = await put(env, owner, channel("ops", domain))

    await put(env, other, channel("ops", other_domain))

    assert await env.client.ok("settings.channel.get", owner, {"name": "ops"}) == mine


async def test_delete_removes_the_channel(env: Env, owner: dict[str, str], domain: str):
    await put(env, owner, channel("ops", domain))

    removed = await env.client.ok("settings.channel.delete", owner, {"name": "ops"})
    reply = await env.client.call("settings.channel.get", owner, {"name": "ops"})

    assert removed == {"removed": 1}
    assert reply["error"]["name"] == "NotFound"


async def test_delete_of_a_missing_channel_is_not_found(env: Env, owner: dict[str, str]):
    reply = await env.client.call("settings.channel.delete", owner, {"name": "ops"})

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": ["ops"]}


# --- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize("times", [1, 2], ids=["create", "replace"])
async def test_put_publishes_channel_updated(
    env: Env, owner: dict[str, str], domain: str, times: int
):
    for n in range(times):
        latest = await put(env, owner, channel("ops", domain, subject_prefix=f"[v{n}]"))

    events = await env.client.wait_events("channel.updated", count=times)

    assert [e["data"] for e in events][-1] == latest
    assert {e["owner_id"] for e in events} == {owner["owner_id"]}


async def test_delete_publishes_channel_deleted(env: Env, owner: dict[str, str], domain: str):
    await put(env, owner, channel("ops", domain))

    await env.client.ok("settings.channel.delete", owner, {"name": "ops"})

    [event] = await env.client.wait_events("channel.deleted")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], {"name": "ops"})


async def test_refused_put_publishes_no_channel_event(env: Env, owner: dict[str, str], domain: str):
    await env.client.call("settings.channel.put", owner, channel("ops", unique_domain()))

    await env.client.wait_events("command.failed")

    assert [e for e in env.client.events if e["type"].startswith("channel.")] == []
