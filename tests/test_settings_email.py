"""settings.email.create / get / update / delete through the broker (contract section 6)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from tests.support.environment import Env
from tests.support.payloads import email_settings, relay_options
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from worker.store.tables import channels

RELAY_USER, RELAY_PASS = "relay-user", "relay-pass-7f3a9c"
SETTINGS_KEYS = {
    "id",
    "domain",
    "provider",
    "description",
    "from",
    "options",
    "created_at",
    "updated_at",
}


async def create(env: Env, owner: dict[str, str], domain: str, **options: Any) -> dict[str, Any]:
    return await env.client.ok("settings.email.create", owner, email_settings(domain, **options))


# --- create and get -----------------------------------------------------------------------------


async def test_create_returns_the_settings_object(env: Env, owner: dict[str, str], domain: str):
    created = await create(env, owner, domain)

    assert set(created) == SETTINGS_KEYS
    assert (created["domain"], created["provider"], created["from"]) == (
        domain,
        "smtp",
        f"Alerts <alerts@{domain}>",
    )
    assert created["description"] is None
    assert created["created_at"] == created["updated_at"]


async def test_create_fills_the_option_defaults(env: Env, owner: dict[str, str], domain: str):
    created = await create(env, owner, domain)

    assert created["options"] == {
        "host": "smtp.example.com",
        "port": 587,
        "secure": False,
        "starttls": "auto",
        "debug": False,
        "tls": {"rejectUnauthorized": True},
        "auth": None,
        "timeout": 30,
    }


async def test_create_keeps_every_option_given(env: Env, owner: dict[str, str], domain: str):
    options = {
        "host": "relay.example.net",
        "port": 465,
        "secure": True,
        "starttls": "never",
        "debug": True,
        "tls": {"rejectUnauthorized": False},
        "timeout": 12.5,
    }

    created = await create(env, owner, domain, **options)

    assert created["options"] == {**options, "auth": None}


async def test_create_shows_the_relay_password_masked(env: Env, owner: dict[str, str], domain: str):
    created = await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    assert created["options"]["auth"] == {"user": RELAY_USER, "pass": "********"}


async def test_get_returns_what_create_returned(env: Env, owner: dict[str, str], domain: str):
    created = await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    assert await env.client.ok("settings.email.get", owner, {"domain": domain}) == created


async def test_relay_password_is_stored_encrypted(env: Env, owner: dict[str, str], domain: str):
    await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    [row] = await env.query("SELECT * FROM email_settings WHERE domain = :d", d=domain)

    assert row.auth_pass_enc
    assert RELAY_PASS not in repr(tuple(row))


async def test_domain_is_stored_in_lower_case_and_found_in_any_case(
    env: Env, owner: dict[str, str], domain: str
):
    created = await create(env, owner, domain.upper())

    found = await env.client.ok("settings.email.get", owner, {"domain": domain.title()})

    assert created["domain"] == found["domain"] == domain


@pytest.mark.parametrize("by", ["same-owner", "another-owner"], ids=["same-owner", "another-owner"])
async def test_create_of_a_configured_domain_is_a_conflict(
    env: Env, owner: dict[str, str], domain: str, by: str
):
    await create(env, owner, domain)
    creator = owner if by == "same-owner" else await env.new_owner("other")

    reply = await env.client.call("settings.email.create", creator, email_settings(domain))

    assert reply["error"]["name"] == "Conflict"


async def test_refused_create_leaves_the_settings_untouched(
    env: Env, owner: dict[str, str], domain: str
):
    created = await create(env, owner, domain)
    other = await env.new_owner("other")

    await env.client.call(
        "settings.email.create", other, email_settings(domain, host="evil.example.org")
    )

    assert await env.client.ok("settings.email.get", owner, {"domain": domain}) == created


@pytest.mark.parametrize(
    ("field", "value", "loc"),
    [
        ("provider", "ses", ["data", "provider"]),
        ("from", "not an address", ["data", "from"]),
        ("domain", "localhost", ["data", "domain"]),
    ],
    ids=["provider", "from", "domain"],
)
async def test_create_with_invalid_data_is_a_validation_error(
    env: Env, owner: dict[str, str], domain: str, field: str, value: Any, loc: list[Any]
):
    data = email_settings(domain) | {field: value}

    reply = await env.client.call("settings.email.create", owner, data)

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [loc]


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"port": 0}, ["data", "options", "port"]),
        ({"starttls": "sometimes"}, ["data", "options", "starttls"]),
        ({"timeout": 0}, ["data", "options", "timeout"]),
        ({"timeout": 0.5}, ["data", "options", "timeout"]),
        ({"timeout": 120.5}, ["data", "options", "timeout"]),
        ({"timeout": 600}, ["data", "options", "timeout"]),
        ({"auth": {"user": RELAY_USER}}, ["data", "options", "auth", "pass"]),
    ],
    ids=[
        "port-0",
        "starttls",
        "timeout-0",
        "timeout-half-a-second",
        "timeout-past-120",
        "timeout-600",
        "auth-without-pass",
    ],
)
async def test_create_with_invalid_options_is_a_validation_error(
    env: Env, owner: dict[str, str], domain: str, options: dict[str, Any], loc: list[Any]
):
    reply = await env.client.call("settings.email.create", owner, email_settings(domain, **options))

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [loc]


@pytest.mark.parametrize("timeout", [1, 120, 1.5, 119.99])
async def test_timeout_between_1_and_120_seconds_is_accepted(
    env: Env, owner: dict[str, str], domain: str, timeout: float
):
    created = await create(env, owner, domain, timeout=timeout)

    assert timeout == created["options"]["timeout"]


# --- update -------------------------------------------------------------------------------------


async def test_update_merges_options_key_by_key(env: Env, owner: dict[str, str], domain: str):
    created = await create(
        env,
        owner,
        domain,
        starttls="always",
        timeout=10,
        auth={"user": RELAY_USER, "pass": RELAY_PASS},
    )

    updated = await env.client.ok(
        "settings.email.update",
        owner,
        {"domain": domain, "options": {"port": 2525, "tls": {"rejectUnauthorized": False}}},
    )

    assert updated["options"] == {
        **created["options"],
        "port": 2525,
        "tls": {"rejectUnauthorized": False},
    }


async def test_update_replaces_the_fields_given(env: Env, owner: dict[str, str], domain: str):
    created = await create(env, owner, domain)

    updated = await env.client.ok(
        "settings.email.update",
        owner,
        {"domain": domain, "description": "primary relay", "from": f"ops@{domain}"},
    )

    assert updated == {
        **created,
        "description": "primary relay",
        "from": f"ops@{domain}",
        "updated_at": updated["updated_at"],
    }


async def test_update_keeps_id_and_created_at_and_advances_updated_at(
    env: Env, owner: dict[str, str], domain: str
):
    created = await create(env, owner, domain)

    updated = await env.client.ok(
        "settings.email.update", owner, {"domain": domain, "options": {"port": 25}}
    )

    assert (updated["id"], updated["created_at"]) == (created["id"], created["created_at"])
    assert datetime.fromisoformat(updated["updated_at"]) >= datetime.fromisoformat(
        created["updated_at"]
    )


async def test_update_is_what_get_returns_next(env: Env, owner: dict[str, str], domain: str):
    await create(env, owner, domain)

    updated = await env.client.ok(
        "settings.email.update", owner, {"domain": domain, "options": {"debug": True}}
    )

    assert await env.client.ok("settings.email.get", owner, {"domain": domain}) == updated


async def test_update_without_auth_pass_keeps_the_stored_password(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer(auth=(RELAY_USER, RELAY_PASS)) as srv:
        await create(env, owner, domain, **relay_options(srv))

        updated = await env.client.ok(
            "settings.email.update",
            owner,
            {"domain": domain, "options": {"auth": {"user": RELAY_USER}, "timeout": 4}},
        )
        probe = await env.client.ok("settings.email.test", owner, {"domain": domain})

    assert updated["options"]["auth"] == {"user": RELAY_USER, "pass": "********"}
    assert (probe["ok"], probe["stage"]) == (True, "done")


async def test_update_with_auth_pass_replaces_the_stored_password(
    env: Env, owner: dict[str, str], domain: str
):
    async with SmtpServer(auth=(RELAY_USER, RELAY_PASS)) as srv:
        await create(env, owner, domain, **relay_options(srv))

        await env.client.ok(
            "settings.email.update",
            owner,
            {"domain": domain, "options": {"auth": {"user": RELAY_USER, "pass": "another-pass"}}},
        )
        probe = await env.client.ok("settings.email.test", owner, {"domain": domain})

    assert (probe["ok"], probe["stage"]) == (False, "auth")


async def test_update_with_auth_null_removes_the_login(
    env: Env, owner: dict[str, str], domain: str
):
    await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    updated = await env.client.ok(
        "settings.email.update", owner, {"domain": domain, "options": {"auth": None}}
    )

    [row] = await env.query("SELECT auth_pass_enc FROM email_settings WHERE domain = :d", d=domain)
    assert updated["options"]["auth"] is None
    assert row.auth_pass_enc is None


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"from": None}, ["data", "from"]),
        ({"provider": None}, ["data", "provider"]),
        ({"options": None}, ["data", "options"]),
        ({"options": {"host": None}}, ["data", "options", "host"]),
        ({"options": {"port": None}}, ["data", "options", "port"]),
        ({"options": {"tls": None}}, ["data", "options", "tls"]),
        ({"options": {"auth": {"user": RELAY_USER}}}, ["data", "options", "auth", "pass"]),
        ({"options": {"auth": {"pass": RELAY_PASS}}}, ["data", "options", "auth", "user"]),
        ({"options": {"port": 0}}, ["data", "options", "port"]),
        ({"options": {"timeout": 121}}, ["data", "options", "timeout"]),
        ({"options": {"timeout": 0.9}}, ["data", "options", "timeout"]),
    ],
    ids=[
        "from-null",
        "provider-null",
        "options-null",
        "host-null",
        "port-null",
        "tls-null",
        "auth-without-stored-pass",
        "auth-without-stored-user",
        "port-0",
        "timeout-121",
        "timeout-0.9",
    ],
)
async def test_update_with_invalid_data_is_a_validation_error_naming_the_field(
    env: Env, owner: dict[str, str], domain: str, change: dict[str, Any], loc: list[Any]
):
    created = await create(env, owner, domain)

    reply = await env.client.call("settings.email.update", owner, {"domain": domain, **change})

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [loc]
    assert await env.client.ok("settings.email.get", owner, {"domain": domain}) == created


async def test_update_of_a_domain_without_settings_is_not_found(
    env: Env, owner: dict[str, str], domain: str
):
    reply = await env.client.call(
        "settings.email.update", owner, {"domain": domain, "options": {"port": 25}}
    )

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [domain]}


# --- delete -------------------------------------------------------------------------------------


async def test_delete_removes_the_settings(env: Env, owner: dict[str, str], domain: str):
    await create(env, owner, domain)

    removed = await env.client.ok("settings.email.delete", owner, {"domain": domain})
    reply = await env.client.call("settings.email.get", owner, {"domain": domain})

    assert removed == {"removed": 1}
    assert reply["error"]["name"] == "NotFound"


async def test_deleted_domain_can_be_created_again(env: Env, owner: dict[str, str], domain: str):
    await create(env, owner, domain)
    await env.client.ok("settings.email.delete", owner, {"domain": domain})

    reply = await env.client.call("settings.email.create", owner, email_settings(domain))

    assert reply["status"] == "success"


async def put_channel(env: Env, owner: dict[str, str], name: str, domain: str) -> None:
    data = {"name": name, "domain": domain, "recipients": ["oncall@example.com"]}
    await env.client.ok("settings.channel.put", owner, data)


async def test_delete_of_a_domain_channels_use_is_a_conflict_naming_them(
    env: Env, owner: dict[str, str], domain: str
):
    created = await create(env, owner, domain)
    for name in ("web", "db", "db-2", "db_1"):
        await put_channel(env, owner, name, domain)

    reply = await env.client.call("settings.email.delete", owner, {"domain": domain.upper()})

    assert "Conflict" == reply["error"]["name"]
    assert {"channels": ["db", "db-2", "db_1", "web"]} == reply["error"]["details"]
    assert created == await env.client.ok("settings.email.get", owner, {"domain": domain})
    assert [] == await env.client.wait_events("email_settings.deleted", timeout=0.5)


@pytest.mark.parametrize("how", ["deleted", "moved"], ids=["channel-deleted", "channel-moved"])
async def test_delete_succeeds_once_no_channel_uses_the_domain(
    env: Env, owner: dict[str, str], domain: str, how: str
):
    await create(env, owner, domain)
    await put_channel(env, owner, "ops", domain)
    assert (
        "Conflict"
        == (await env.client.call("settings.email.delete", owner, {"domain": domain}))["error"][
            "name"
        ]
    )
    if how == "deleted":
        await env.client.ok("settings.channel.delete", owner, {"name": "ops"})
    else:
        other = unique_domain()
        await create(env, owner, other)
        await put_channel(env, owner, "ops", other)

    removed = await env.client.ok("settings.email.delete", owner, {"domain": domain})

    reply = await env.client.call("settings.email.get", owner, {"domain": domain})
    assert ({"removed": 1}, "NotFound") == (removed, reply["error"]["name"])


async def test_another_owners_channel_on_the_domain_neither_blocks_nor_shows(
    env: Env, owner: dict[str, str], domain: str
):
    # A channel another owner kept on the domain from before it changed hands, written directly.
    await create(env, owner, domain)
    other = await env.new_owner("other")
    now = datetime.now(UTC)
    async with env.store.transaction() as conn:
        await conn.execute(
            insert(channels).values(
                owner_id=other["owner_id"],
                name="secret-plans",
                domain=domain,
                recipients=["x@example.com"],
                subject_prefix="[secret-plans]",
                created_at=now,
                updated_at=now,
            )
        )
    await put_channel(env, owner, "ops", domain)

    refused = await env.client.call("settings.email.delete", owner, {"domain": domain})
    await env.client.ok("settings.channel.delete", owner, {"name": "ops"})
    removed = await env.client.ok("settings.email.delete", owner, {"domain": domain})

    assert {"channels": ["ops"]} == refused["error"]["details"]
    assert {"removed": 1} == removed


async def test_delete_racing_a_channel_put_never_leaves_a_channel_without_settings(
    env: Env, owner: dict[str, str]
):
    domains = [unique_domain() for _ in range(30)]
    for domain in domains:
        await create(env, owner, domain)

    async def race(n: int, domain: str) -> tuple[str, str]:
        put, delete = await asyncio.gather(
            env.client.call(
                "settings.channel.put",
                owner,
                {"name": f"c{n}", "domain": domain, "recipients": ["oncall@example.com"]},
            ),
            env.client.call("settings.email.delete", owner, {"domain": domain}),
        )
        return put["status"], delete["status"]

    outcomes = await asyncio.gather(*(race(n, domain) for n, domain in enumerate(domains)))

    orphans = await env.query(
        "SELECT c.name FROM channels c LEFT JOIN email_settings s ON s.domain = c.domain"
        " WHERE c.owner_id = :owner AND s.id IS NULL",
        owner=owner["owner_id"],
    )
    assert [] == [row.name for row in orphans]
    # One of the two wins each race: the channel and its settings, or neither.
    assert set() == set(outcomes) - {("success", "error"), ("error", "success")}


# --- another owner's domain ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "extra"),
    [
        ("settings.email.get", {}),
        ("settings.email.update", {"options": {"port": 25}}),
        ("settings.email.delete", {}),
        ("settings.email.test", {}),
    ],
    ids=["get", "update", "delete", "test"],
)
async def test_another_owners_domain_is_not_found(
    env: Env, owner: dict[str, str], domain: str, type_: str, extra: dict[str, Any]
):
    created = await create(env, owner, domain)
    other = await env.new_owner("other")

    reply = await env.client.call(type_, other, {"domain": domain, **extra})

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [domain]}
    assert await env.client.ok("settings.email.get", owner, {"domain": domain}) == created


# --- events -------------------------------------------------------------------------------------


async def test_create_publishes_email_settings_created(
    env: Env, owner: dict[str, str], domain: str
):
    created = await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    [event] = await env.client.wait_events("email_settings.created")

    assert (event["owner_id"], event["data"]) == (owner["owner_id"], created)
    assert set(event) == {"type", "id", "time", "owner_id", "data"}
    assert datetime.fromisoformat(event["time"]).utcoffset() == timedelta(0)


async def test_update_publishes_email_settings_updated(
    env: Env, owner: dict[str, str], domain: str
):
    await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})

    updated = await env.client.ok(
        "settings.email.update",
        owner,
        {"domain": domain, "options": {"auth": {"user": RELAY_USER, "pass": "new-relay-pass"}}},
    )

    [event] = await env.client.wait_events("email_settings.updated")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], updated)


async def test_delete_publishes_email_settings_deleted(
    env: Env, owner: dict[str, str], domain: str
):
    await create(env, owner, domain)

    await env.client.ok("settings.email.delete", owner, {"domain": domain})

    [event] = await env.client.wait_events("email_settings.deleted")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], {"domain": domain})


async def test_events_never_carry_the_relay_password(env: Env, owner: dict[str, str], domain: str):
    await create(env, owner, domain, auth={"user": RELAY_USER, "pass": RELAY_PASS})
    await env.client.ok(
        "settings.email.update",
        owner,
        {"domain": domain, "options": {"auth": {"user": RELAY_USER, "pass": RELAY_PASS + "2"}}},
    )
    await env.client.ok("settings.email.delete", owner, {"domain": domain})

    for type_ in ("created", "updated", "deleted"):
        assert await env.client.wait_events(f"email_settings.{type_}")
    assert RELAY_PASS not in json.dumps(env.client.events)
