"""Logs are events with stable keys, and no secret reaches them (contract section 5, STYLE 6)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tests.support.environment import Env
from tests.support.logs import log_lines
from worker.logs import REDACTED, redact_secrets

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
PROCESSED_KEYS = {"type", "message_id", "correlation_id", "outcome", "duration_ms"}


async def processed(logs: list[dict[str, Any]], message_id: str, count: int) -> list[Any]:
    """The `command.processed` events of a message_id, once `count` are there (or 2 s passed).

    The event is logged once the message is settled, just after its reply was sent.
    """
    for _ in range(100):
        found = [
            e
            for e in logs
            if e["event"] == "command.processed" and e.get("message_id") == message_id
        ]
        if len(found) >= count:
            break
        await asyncio.sleep(0.02)
    return found


def settings_command(type_: str, auth: Any, data: Any) -> bytes:
    return json.dumps({"type": type_, "auth": auth, "data": data}).encode()


# --- command.processed --------------------------------------------------------------------------

OUTCOMES = [
    # id, body (given an owner's auth), type logged, outcome
    (
        "success",
        lambda owner: settings_command("settings.smtp_user.list", owner, {}),
        "settings.smtp_user.list",
        "success",
    ),
    (
        "refused",
        lambda owner: settings_command("settings.smtp_user.add", owner, {"total_limit": 0}),
        "settings.smtp_user.add",
        "refused",
    ),
    ("unreadable", lambda owner: b"{not json", None, "unreadable"),
]


@ON_SQLITE
@pytest.mark.parametrize(
    ("make_body", "type_", "outcome"),
    [case[1:] for case in OUTCOMES],
    ids=[case[0] for case in OUTCOMES],
)
async def test_a_processed_command_logs_one_command_processed_event(
    env: Env, make_body: Any, type_: str | None, outcome: str
) -> None:
    owner = await env.new_owner()
    message_id = uuid.uuid4().hex

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        reply = await env.client.call_raw(
            make_body(owner), type_ or "settings.x", message_id=message_id
        )
        [event] = await processed(logs, message_id, 1)

    assert {key: event[key] for key in PROCESSED_KEYS - {"duration_ms"}} == {
        "type": type_,
        "message_id": message_id,
        "correlation_id": reply.correlation_id,
        "outcome": outcome,
    }
    assert isinstance(event["duration_ms"], float)
    assert event["duration_ms"] >= 0


@ON_SQLITE
async def test_a_repeat_is_logged_as_a_duplicate(env: Env) -> None:
    owner = await env.new_owner()
    body = settings_command("settings.smtp_user.list", owner, {})

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await env.client.call_raw(body, "settings.smtp_user.list", message_id="twice")
        await env.client.call_raw(body, "settings.smtp_user.list", message_id="twice")
        events = await processed(logs, "twice", 2)

    assert [e["outcome"] for e in events] == ["success", "duplicate"]


# --- redaction ----------------------------------------------------------------------------------

REDACTIONS = [
    # id, event values, what is logged
    ("token", {"token": "t0k3n"}, {"token": REDACTED}),
    ("password", {"password": "pw"}, {"password": REDACTED}),
    ("smtp-password", {"smtp_password": "pw"}, {"smtp_password": REDACTED}),
    ("any-case", {"Token": "t0k3n"}, {"Token": REDACTED}),
    (
        "pass-nested",
        {"data": {"options": {"host": "relay", "auth_": {"user": "u", "pass": "pw"}}}},
        {"data": {"options": {"host": "relay", "auth_": {"user": "u", "pass": REDACTED}}}},
    ),
    (
        "in-a-list",
        {"users": [{"name": "u1", "smtp_password": "pw"}, {"name": "u2"}]},
        {"users": [{"name": "u1", "smtp_password": REDACTED}, {"name": "u2"}]},
    ),
    (
        "in-a-tuple",
        {"pair": ({"token": "t0k3n"}, "plain")},
        {"pair": [{"token": REDACTED}, "plain"]},
    ),
    (
        "deep",
        {"a": {"b": [{"c": {"d": [{"password": "pw", "e": 1}]}}]}},
        {"a": {"b": [{"c": {"d": [{"password": REDACTED, "e": 1}]}}]}},
    ),
    ("a-whole-auth", {"auth": {"owner_id": "o", "token": "t"}}, {"auth": REDACTED}),
    (
        "nothing-secret",
        {"domain": "example.com", "user": "u", "count": 3, "none": None},
        {"domain": "example.com", "user": "u", "count": 3, "none": None},
    ),
]


@pytest.mark.parametrize(
    ("values", "logged"),
    [case[1:] for case in REDACTIONS],
    ids=[case[0] for case in REDACTIONS],
)
def test_redact_secrets_replaces_secret_values_at_any_depth(
    values: dict[str, Any], logged: dict[str, Any]
) -> None:
    event = {"event": "something", **values}

    assert redact_secrets(None, "info", event) == {"event": "something", **logged}


def test_the_configured_pipeline_redacts_secrets() -> None:
    structlog.get_logger("test").info(
        "relay", options={"auth": {"user": "u", "pass": "relay-secret-1"}}, token="token-secret-2"
    )

    logged = json.loads(log_lines()[-1])
    assert (logged["event"], logged["options"], logged["token"]) == (
        "relay",
        {"auth": REDACTED},
        REDACTED,
    )
