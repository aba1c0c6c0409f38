"""Two worker processes on one broker and one PostgreSQL store (contract sections 1, 3, 4, 6).

`smtp-worker run` twice on a fresh database (they migrate it together), owners made by
`smtp-worker owner create`, then 200 settings commands from one client, interleaved across
owners and published at once, so that the two workers take them in no particular order: owners
race for the same domains, and some commands are sent twice under one `message_id`. Every command
is answered exactly once, the store holds exactly what the replies say, and SIGTERM stops both
workers with exit code 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.support.broker import delete_prefix
from tests.support.client import Client
from tests.support.commandline import create_owner, environment, settings_variables
from tests.support.databases import create_database, drop_database
from tests.support.environment import make_settings
from tests.support.logs import PROCESS_LINES, remember_secrets
from tests.support.processes import WorkerProcess
from worker.config import Settings
from worker.store import Store

OWNERS = 3
OWN_DOMAINS = 2  # per owner
CONTESTED = 3  # domains every owner tries to create
USERS = 25  # per owner
RESENT = 10  # smtp_user.add commands sent a second time under the same message_id
STARTUP_TIMEOUT = 30.0


@dataclass
class Cluster:
    settings: Settings
    workers: list[WorkerProcess]
    client: Client
    owners: list[dict[str, str]]  # made by `smtp-worker owner create`

    async def query(self, sql: str, **params: Any) -> list[Any]:
        store = Store(self.settings.database_url)
        try:
            async with store.transaction() as conn:
                return list(await conn.execute(text(sql), params))
        finally:
            await store.close()


@pytest.fixture
async def cluster(amqp_url: str, postgres_admin_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Two `smtp-worker run` processes on a fresh PostgreSQL database and a prefix of their own,
    and owners made by `smtp-worker owner create`."""
    database_url = await create_database(postgres_admin_url)
    settings = make_settings(amqp_url, database_url)
    variables = settings_variables(settings)
    workers = [
        WorkerProcess(environment(**variables), tmp_path / f"worker-{n}.log", tmp_path).spawn()
        for n in (1, 2)
    ]
    try:
        # While the workers start (and migrate the new database, as owner create does too).
        owners = await asyncio.gather(
            *(create_owner(f"owner{i}", tmp_path, **variables) for i in range(OWNERS))
        )
        for worker in workers:
            await worker.wait_started(STARTUP_TIMEOUT)
        client = await Client.connect(settings)
        try:
            yield Cluster(settings, workers, client, list(owners))
        finally:
            await client.close()
    finally:
        for worker in workers:
            await worker.stop()
            PROCESS_LINES.extend(worker.text_lines())  # searched for secrets at the end of the run
        await delete_prefix(amqp_url, settings)
        await drop_database(postgres_admin_url, database_url)


# --- the workload -------------------------------------------------------------------------------


@dataclass
class Command:
    type: str
    auth: dict[str, str]
    data: dict[str, Any]
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    raw_reply: bytes = b""

    @property
    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self.raw_reply)
        return reply

    @property
    def ok(self) -> bool:
        return bool(self.reply["status"] == "success")


async def send_all(client: Client, commands: list[Command]) -> None:
    """Publishes every command at once, each under a correlation id of its own, then waits."""
    futures = []
    for command in commands:
        body = json.dumps({"type": command.type, "auth": command.auth, "data": command.data})
        futures.append(
            await client.publish(
                body.encode(),
                command.type,
                message_id=command.message_id,
                correlation_id=uuid.uuid4().hex,
            )
        )
    for command, future in zip(commands, futures, strict=True):
        assert future is not None
        command.raw_reply = (await asyncio.wait_for(future, 30)).body
        remember_secrets(command.reply)


def email_settings(domain: str) -> dict[str, Any]:
    return {
        "domain": domain,
        "provider": "smtp",
        "from": f"alerts@{domain}",
        "options": {"host": "127.0.0.1", "port": 2525},
    }


async def test_two_worker_processes_answer_every_command_once_and_agree_on_the_store(
    cluster: Cluster,
) -> None:
    owners = cluster.owners
    rng = random.Random(1)
    tag = uuid.uuid4().hex[:8]
    own = [[f"own{k}-{i}-{tag}.example.com" for k in range(OWN_DOMAINS)] for i in range(OWNERS)]
    contested = [f"contested{k}-{tag}.example.com" for k in range(CONTESTED)]

    # Phase one: domains, some contested by every owner; SMTP users, some sent twice.
    creates = [
        Command("settings.email.create", owners[i], email_settings(domain))
        for i in range(OWNERS)
        for domain in own[i] + contested
    ]
    adds = [
        Command(
            "settings.smtp_user.add",
            owners[i],
            {"total_limit": rng.randint(1, 1000), "hourly_limit": rng.randint(1, 100)},
        )
        for i in range(OWNERS)
        for _ in range(USERS)
    ]
    resent = [Command(a.type, a.auth, a.data, a.message_id) for a in rng.sample(adds, RESENT)]
    first = creates + adds + resent
    rng.shuffle(first)
    await send_all(cluster.client, first)

    # Phase two: channels, user edits, domain updates, and reads of one's own and others' domains.
    users = [(add.auth, add.reply["data"]["smtp_user_name"]) for add in adds if add.ok]
    channels = [
        Command(
            "settings.channel.put",
            owners[i],
            {"name": f"ch{n}", "domain": own[i][n % OWN_DOMAINS], "recipients": ["ops@ex.com"]},
        )
        for i in range(OWNERS)
        for n in range(10)
    ]
    edits = [
        Command(
            "settings.smtp_user.edit",
            auth,
            {"smtp_user_name": name, "total_limit": rng.randint(1, 1000), "status": "Disable"},
        )
        for auth, name in rng.sample(users, 40)
    ]
    updates = [
        Command(
            "settings.email.update",
            owners[i],
            {"domain": own[i][n % OWN_DOMAINS], "description": f"update {n}"},
        )
        for i in range(OWNERS)
        for n in range(5)
    ]
    reads = [
        Command("settings.email.get", owners[i], {"domain": own[(i + n) % OWNERS][0]})
        for i in range(OWNERS)
        for n in range(5)
    ]
    second = channels + edits + updates + reads
    rng.shuffle(second)
    await send_all(cluster.client, second)
    everything = first + second
    assert len(everything) == 200

    # Every command answered (send_all waited for each), none twice, both workers at work.
    await asyncio.sleep(0.3)
    assert cluster.client.orphan_replies == []
    assert all(
        any('"command.processed"' in line for line in worker.text_lines())
        for worker in cluster.workers
    )
    # Refused only where the rules say: a contested domain goes to one owner; others' are missing.
    others_domains = sum(r.data["domain"] not in own[owners.index(r.auth)] for r in reads)
    assert Counter(c.reply["error"]["name"] for c in everything if not c.ok) == {
        "Conflict": CONTESTED * (OWNERS - 1),
        "NotFound": others_domains,
    }
    # A command sent twice got the reply of its first execution.
    first_replies = {add.message_id: add.raw_reply for add in adds}
    assert [r.raw_reply for r in resent] == [first_replies[r.message_id] for r in resent]

    # The store holds what the replies say.
    assert len(users) == OWNERS * USERS
    assert sorted(await cluster.query("SELECT name FROM smtp_users")) == sorted(
        (name,) for _, name in users
    )
    assert sorted(await cluster.query("SELECT owner_id, name FROM channels")) == sorted(
        (c.auth["owner_id"], c.data["name"]) for c in channels if c.ok
    )
    assert sorted(await cluster.query("SELECT domain, owner_id FROM email_settings")) == sorted(
        (c.data["domain"], c.auth["owner_id"]) for c in creates if c.ok
    )
    edited = await cluster.query(
        "SELECT name, total_limit FROM smtp_users WHERE status = 'Disable'"
    )
    assert sorted(edited) == sorted(
        (e.data["smtp_user_name"], e.data["total_limit"]) for e in edits
    )

    # SIGTERM: both stop consuming, finish, and exit 0.
    assert [await worker.stop() for worker in cluster.workers] == [0, 0]


async def test_a_reset_disabled_or_deleted_user_is_refused_by_both_workers_at_once(
    cluster: Cluster,
) -> None:
    owner = cluster.owners[0]
    limits = {"total_limit": 10, "hourly_limit": 10}
    logins = []
    for _ in range(3):
        user = await cluster.client.ok("settings.smtp_user.add", owner, limits)
        logins.append({"login": user["smtp_user_name"], "password": user["smtp_password"]})
    reset, disabled, deleted = logins

    def probes(auth: dict[str, str]) -> list[Command]:
        # A ticket that does not exist: NotFound once authenticated, so no email is involved.
        return [Command("ticket.get", auth, {"sid": f"absent-{n}"}) for n in range(20)]

    # Each login works, on both workers (they take the commands in turn).
    warm = [probe for auth in logins for probe in probes(auth)]
    await send_all(cluster.client, warm)
    assert {"NotFound"} == {probe.reply["error"]["name"] for probe in warm}

    new = await cluster.client.ok(
        "settings.smtp_user.reset_password", owner, {"smtp_user_name": reset["login"]}
    )
    await cluster.client.ok(
        "settings.smtp_user.edit",
        owner,
        {"smtp_user_name": disabled["login"], "status": "Disable"},
    )
    await cluster.client.ok(
        "settings.smtp_user.delete", owner, {"smtp_user_name": deleted["login"]}
    )
    # At once: published the moment the last change is answered.
    old_password, now_disabled, now_deleted = probes(reset), probes(disabled), probes(deleted)
    new_password = probes({"login": reset["login"], "password": new["smtp_password"]})
    after = old_password + now_disabled + now_deleted + new_password
    await send_all(cluster.client, after)

    def refusals(probes: list[Command]) -> set[str]:
        return {probe.reply["error"]["name"] for probe in probes}

    assert (
        {"AuthenticationError"},
        {"Forbidden"},
        {"AuthenticationError"},
        {"NotFound"},
    ) == (
        refusals(old_password),
        refusals(now_disabled),
        refusals(now_deleted),
        refusals(new_password),
    )
    # Both workers took some of them, and refused them.
    refused = {probe.message_id for probe in old_password + now_disabled + now_deleted}
    for worker in cluster.workers:
        assert sum(worker.processings(refused).values()) > 0, worker.tail()
