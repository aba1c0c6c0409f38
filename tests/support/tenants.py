"""Tenant setup: an owner, and what it configures before it sends tickets.

owner --settings.email.create--> a domain, relayed as `options` say
      --settings.channel.put---> each channel, to its recipients
      --settings.smtp_user.add-> SMTP users, whose logins send the ticket and hit commands

`set_up_tenant` sends these through any client's "command that must succeed" (`ok`), so the
tests, the fault scenarios and the benchmarks configure their tenants alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tests.support.logs import SECRET_KEY, SECRETS
from worker.security import Keyring
from worker.store import Store, owners

Ok = Callable[[str, Any, Any], Awaitable[dict[str, Any]]]
"""(type, auth, data) -> the reply's `data`, failing unless the command succeeded."""

RECIPIENTS = ["oncall@example.com", "ops@example.org"]
BIG_LIMITS = {"total_limit": 1_000_000, "hourly_limit": 1_000_000}


def unique_domain() -> str:
    return f"d{uuid.uuid4().hex[:12]}.example.com"


async def new_owner(store: Store, name: str) -> dict[str, str]:
    """A new owner, written to the store as `smtp-worker owner create` does."""
    async with store.transaction() as conn:
        owner_id, token = await owners.create(conn, Keyring(SECRET_KEY), name, datetime.now(UTC))
    SECRETS.add(token)
    return {"owner_id": owner_id, "token": token}


async def set_up_tenant(
    ok: Ok,
    owner: Mapping[str, str],
    domain: str,
    options: Mapping[str, Any],
    *,
    sender: str | None = None,
    channels: Mapping[str, Sequence[str]] | None = None,
    subject_prefix: str | None = None,
    limits: Mapping[str, int] = BIG_LIMITS,
    users: int = 1,
) -> list[dict[str, str]]:
    """Email settings for `domain` from `sender` (default `Alerts <alerts@DOMAIN>`) relayed
    with `options`, each of `channels` (name -> recipients; default "ops" to RECIPIENTS) on it,
    and `users` SMTP users with `limits`; returns the users' logins, the `auth` of ticket and
    hit commands."""
    await ok(
        "settings.email.create",
        owner,
        {
            "domain": domain,
            "provider": "smtp",
            "from": sender if sender is not None else f"Alerts <alerts@{domain}>",
            "options": dict(options),
        },
    )
    for name, recipients in (channels if channels is not None else {"ops": RECIPIENTS}).items():
        put: dict[str, Any] = {"name": name, "domain": domain, "recipients": list(recipients)}
        if subject_prefix is not None:
            put["subject_prefix"] = subject_prefix
        await ok("settings.channel.put", owner, put)
    logins = []
    for _ in range(users):
        user = await ok("settings.smtp_user.add", owner, dict(limits))
        logins.append({"login": user["smtp_user_name"], "password": user["smtp_password"]})
    return logins
