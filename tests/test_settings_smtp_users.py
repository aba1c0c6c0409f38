"""settings.smtp_user.* through the broker (contract sections 5 and 6).

Whether a login and password authenticate is read from a cheap user-auth command, `ticket.get`
of a ticket that does not exist: the worker answers `AuthenticationError` when the credentials
are wrong and something else (`NotFound`) when they are right.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support.environment import Env

USER_KEYS = {
    "smtp_user_name",
    "status",
    "total_limit",
    "hourly_limit",
    "total_sent",
    "hourly_sent",
    "created_at",
}
# 22 URL-safe base64 characters carry 132 bits: the contract asks for at least 128.
STRONG_SECRET = re.compile(r"[A-Za-z0-9_-]{22,}")


async def add(
    env: Env, owner: dict[str, str], total: int = 100, hourly: int = 10
) -> dict[str, Any]:
    return await env.client.ok(
        "settings.smtp_user.add", owner, {"total_limit": total, "hourly_limit": hourly}
    )


async def login_error(env: Env, login: str, password: str) -> str | None:
    """The error name a user-auth command gets with these credentials (None on success)."""
    reply = await env.client.call(
        "ticket.get", {"login": login, "password": password}, {"sid": "no-such-ticket-0000000"}
    )
    return reply["error"]["name"] if reply["status"] == "error" else None


# --- add ----------------------------------------------------------------------------------------


async def test_add_returns_the_name_password_status_and_limits(env: Env, owner: dict[str, str]):
    created = await add(env, owner, total=500, hourly=50)

    assert set(created) == {
        "smtp_user_name",
        "smtp_password",
        "status",
        "total_limit",
        "hourly_limit",
    }
    assert (created["status"], created["total_limit"], created["hourly_limit"]) == (
        "Enable",
        500,
        50,
    )


async def test_add_generates_a_password_of_at_least_128_bits(env: Env, owner: dict[str, str]):
    created = await add(env, owner)

    assert STRONG_SECRET.fullmatch(created["smtp_password"])


async def test_add_makes_a_new_name_and_password_each_time(env: Env, owner: dict[str, str]):
    first, second = await add(env, owner), await add(env, owner)

    assert first["smtp_user_name"] != second["smtp_user_name"]
    assert first["smtp_password"] != second["smtp_password"]


async def test_added_user_can_authenticate(env: Env, owner: dict[str, str]):
    created = await add(env, owner)

    assert await login_error(env, created["smtp_user_name"], created["smtp_password"]) != (
        "AuthenticationError"
    )


async def test_store_holds_only_a_hash_of_the_password(env: Env, owner: dict[str, str]):
    created = await add(env, owner)

    [row] = await env.query("SELECT * FROM smtp_users WHERE name = :n", n=created["smtp_user_name"])

    assert row.password_hash
    assert created["smtp_password"] not in repr(tuple(row))


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"total_limit": 0, "hourly_limit": 1}, ["data", "total_limit"]),
        ({"total_limit": 1, "hourly_limit": 0}, ["data", "hourly_limit"]),
        ({"total_limit": -5, "hourly_limit": 1}, ["data", "total_limit"]),
        ({"total_limit": "10", "hourly_limit": 1}, ["data", "total_limit"]),
        ({"total_limit": 10, "hourly_limit": 1.5}, ["data", "hourly_limit"]),
        ({"total_limit": True, "hourly_limit": 1}, ["data", "total_limit"]),
        ({"total_limit": None, "hourly_limit": 1}, ["data", "total_limit"]),
        ({"hourly_limit": 1}, ["data", "total_limit"]),
    ],
    ids=["total-0", "hourly-0", "negative", "string", "float", "bool", "null", "missing"],
)
async def test_add_with_a_bad_limit_is_a_validation_error(
    env: Env, owner: dict[str, str], data: dict[str, Any], loc: list[Any]
):
    reply = await env.client.call("settings.smtp_user.add", owner, data)

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [loc]


async def test_refused_add_creates_no_user(env: Env, owner: dict[str, str]):
    await env.client.call("settings.smtp_user.add", owner, {"total_limit": 0, "hourly_limit": 1})

    assert await env.client.ok("settings.smtp_user.list", owner, {}) == {"smtp_list": []}


# --- edit ---------------------------------------------------------------------------------------


async def test_edit_changes_the_limits(env: Env, owner: dict[str, str]):
    name = (await add(env, owner, total=100, hourly=10))["smtp_user_name"]

    edited = await env.client.ok(
        "settings.smtp_user.edit",
        owner,
        {"smtp_user_name": name, "total_limit": 7, "hourly_limit": 3},
    )

    assert (edited["total_limit"], edited["hourly_limit"]) == (7, 3)


async def test_edit_returns_the_user_object_without_a_password(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    edited = await env.client.ok("settings.smtp_user.edit", owner, {"smtp_user_name": name})

    assert set(edited) == USER_KEYS
    assert (edited["smtp_user_name"], edited["total_sent"], edited["hourly_sent"]) == (name, 0, 0)


@pytest.mark.parametrize(
    "unchanged",
    [{}, {"total_limit": None, "hourly_limit": None, "status": None}],
    ids=["omitted", "null"],
)
async def test_edit_leaves_omitted_or_null_fields_unchanged(
    env: Env, owner: dict[str, str], unchanged: dict[str, Any]
):
    name = (await add(env, owner, total=100, hourly=10))["smtp_user_name"]

    edited = await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, **unchanged}
    )

    assert (edited["status"], edited["total_limit"], edited["hourly_limit"]) == ("Enable", 100, 10)


async def test_edit_of_one_limit_keeps_the_other(env: Env, owner: dict[str, str]):
    name = (await add(env, owner, total=100, hourly=10))["smtp_user_name"]

    edited = await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "hourly_limit": 4}
    )

    assert (edited["total_limit"], edited["hourly_limit"]) == (100, 4)


@pytest.mark.parametrize("status", ["Disable", "Enable"], ids=["disable", "enable"])
async def test_edit_sets_the_status(env: Env, owner: dict[str, str], status: str):
    name = (await add(env, owner))["smtp_user_name"]
    await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": "Disable"}
    )

    edited = await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": status}
    )

    assert edited["status"] == status


async def test_edit_persists(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    edited = await env.client.ok(
        "settings.smtp_user.edit",
        owner,
        {"smtp_user_name": name, "total_limit": 9, "status": "Disable"},
    )

    assert (await env.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"] == [edited]


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"total_limit": 0}, ["data", "total_limit"]),
        ({"hourly_limit": -1}, ["data", "hourly_limit"]),
        ({"total_limit": "5"}, ["data", "total_limit"]),
        ({"status": "Disabled"}, ["data", "status"]),
        ({"status": False}, ["data", "status"]),
    ],
    ids=["total-0", "hourly-negative", "string", "unknown-status", "bool-status"],
)
async def test_edit_with_bad_data_is_a_validation_error_and_changes_nothing(
    env: Env, owner: dict[str, str], change: dict[str, Any], loc: list[Any]
):
    name = (await add(env, owner, total=100, hourly=10))["smtp_user_name"]

    reply = await env.client.call(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, **change}
    )

    assert reply["error"]["name"] == "ValidationError"
    assert [d["loc"] for d in reply["error"]["details"]] == [loc]
    [user] = (await env.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"]
    assert (user["status"], user["total_limit"], user["hourly_limit"]) == ("Enable", 100, 10)


# --- status -------------------------------------------------------------------------------------


async def test_disabled_user_is_forbidden(env: Env, owner: dict[str, str]):
    created = await add(env, owner)
    name, password = created["smtp_user_name"], created["smtp_password"]
    await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": "Disable"}
    )

    assert await login_error(env, name, password) == "Forbidden"


async def test_disabled_user_with_a_wrong_password_is_not_authenticated(
    env: Env, owner: dict[str, str]
):
    name = (await add(env, owner))["smtp_user_name"]
    await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": "Disable"}
    )

    assert await login_error(env, name, "not-the-password-000000") == "AuthenticationError"


async def test_enabled_again_user_is_accepted(env: Env, owner: dict[str, str]):
    created = await add(env, owner)
    name, password = created["smtp_user_name"], created["smtp_password"]
    for status in ("Disable", "Enable"):
        await env.client.ok(
            "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": status}
        )

    assert await login_error(env, name, password) not in {"AuthenticationError", "Forbidden"}


# --- reset_password -----------------------------------------------------------------------------


async def test_reset_password_returns_a_new_strong_password(env: Env, owner: dict[str, str]):
    created = await add(env, owner)
    name = created["smtp_user_name"]

    reset = await env.client.ok(
        "settings.smtp_user.reset_password", owner, {"smtp_user_name": name}
    )

    assert set(reset) == {"smtp_user_name", "smtp_password"}
    assert reset["smtp_user_name"] == name
    assert reset["smtp_password"] != created["smtp_password"]
    assert STRONG_SECRET.fullmatch(reset["smtp_password"])


@pytest.mark.parametrize(
    "type_",
    ["settings.smtp_user.reset_password", "settings.smtp_user.delete"],
    ids=["reset_password", "delete"],
)
async def test_the_old_password_stops_working_at_once_after(
    env: Env, owner: dict[str, str], type_: str
):
    """A reset password, and a deleted user's, can no longer authenticate."""
    created = await add(env, owner)
    name = created["smtp_user_name"]

    await env.client.ok(type_, owner, {"smtp_user_name": name})

    assert await login_error(env, name, created["smtp_password"]) == "AuthenticationError"


async def test_reset_password_makes_the_new_password_work(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    reset = await env.client.ok(
        "settings.smtp_user.reset_password", owner, {"smtp_user_name": name}
    )

    assert await login_error(env, name, reset["smtp_password"]) != "AuthenticationError"


async def test_reset_password_keeps_the_user_otherwise(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]
    before = await env.client.ok("settings.smtp_user.list", owner, {})

    await env.client.ok("settings.smtp_user.reset_password", owner, {"smtp_user_name": name})

    assert await env.client.ok("settings.smtp_user.list", owner, {}) == before


# --- list ---------------------------------------------------------------------------------------


async def test_list_of_an_owner_without_users_is_empty(env: Env, owner: dict[str, str]):
    assert await env.client.ok("settings.smtp_user.list", owner, {}) == {"smtp_list": []}


async def test_list_accepts_a_command_without_data(env: Env, owner: dict[str, str]):
    await add(env, owner)

    listed = await env.client.ok("settings.smtp_user.list", owner)

    assert len(listed["smtp_list"]) == 1


async def test_list_shows_the_owners_users_as_user_objects(env: Env, owner: dict[str, str]):
    first = await add(env, owner, total=100, hourly=10)
    second = await add(env, owner, total=200, hourly=20)
    await add(env, await env.new_owner("other"))

    listed = (await env.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"]

    assert {u["smtp_user_name"] for u in listed} == {
        first["smtp_user_name"],
        second["smtp_user_name"],
    }
    assert all(set(u) == USER_KEYS for u in listed)
    assert {(u["total_limit"], u["hourly_limit"], u["status"]) for u in listed} == {
        (100, 10, "Enable"),
        (200, 20, "Enable"),
    }


# --- delete -------------------------------------------------------------------------------------


async def test_delete_removes_the_user(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    removed = await env.client.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})

    assert removed == {"removed": 1}
    assert await env.client.ok("settings.smtp_user.list", owner, {}) == {"smtp_list": []}


@pytest.mark.parametrize(
    "type_",
    [
        "settings.smtp_user.edit",
        "settings.smtp_user.reset_password",
        "settings.smtp_user.delete",
    ],
    ids=["edit", "reset_password", "delete"],
)
async def test_deleted_user_is_not_found(env: Env, owner: dict[str, str], type_: str):
    name = (await add(env, owner))["smtp_user_name"]
    await env.client.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})

    reply = await env.client.call(type_, owner, {"smtp_user_name": name})

    assert reply["error"]["name"] == "NotFound"
    assert reply["error"]["details"] == {"missing": [name]}


# --- events -------------------------------------------------------------------------------------


async def test_add_publishes_smtp_user_created(env: Env, owner: dict[str, str]):
    created = await add(env, owner, total=100, hourly=10)

    [event] = await env.client.wait_events("smtp_user.created")

    assert event["owner_id"] == owner["owner_id"]
    assert event["data"] == {
        "smtp_user_name": created["smtp_user_name"],
        "status": "Enable",
        "total_limit": 100,
        "hourly_limit": 10,
    }


async def test_edit_publishes_smtp_user_updated(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    edited = await env.client.ok(
        "settings.smtp_user.edit", owner, {"smtp_user_name": name, "status": "Disable"}
    )

    [event] = await env.client.wait_events("smtp_user.updated")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], edited)


async def test_reset_password_publishes_smtp_user_password_reset(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    await env.client.ok("settings.smtp_user.reset_password", owner, {"smtp_user_name": name})

    [event] = await env.client.wait_events("smtp_user.password_reset")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], {"smtp_user_name": name})


async def test_delete_publishes_smtp_user_deleted(env: Env, owner: dict[str, str]):
    name = (await add(env, owner))["smtp_user_name"]

    await env.client.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})

    [event] = await env.client.wait_events("smtp_user.deleted")
    assert (event["owner_id"], event["data"]) == (owner["owner_id"], {"smtp_user_name": name})


async def test_events_never_carry_a_password(env: Env, owner: dict[str, str]):
    created = await add(env, owner)
    name = created["smtp_user_name"]
    await env.client.ok("settings.smtp_user.edit", owner, {"smtp_user_name": name})
    reset = await env.client.ok(
        "settings.smtp_user.reset_password", owner, {"smtp_user_name": name}
    )
    await env.client.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})

    for type_ in ("created", "updated", "password_reset", "deleted"):
        assert await env.client.wait_events(f"smtp_user.{type_}")
    published = json.dumps(env.client.events)
    assert created["smtp_password"] not in published
    assert reset["smtp_password"] not in published
    assert "smtp_password" not in published
