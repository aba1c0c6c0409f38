"""The `smtp-worker` command line (contract section 1), run as a user runs it: a subprocess
configured by `SMTP_WORKER_*` variables, in a working directory of its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import stat
import uuid
from pathlib import Path

import pytest

from tests.support.commandline import smtp_worker, spawn
from tests.support.environment import Env
from tests.support.logs import PROCESS_LINES, SECRET_KEY, SECRETS

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def connected(env: Env) -> dict[str, str]:
    """The variables that point the command at a test's broker, prefix and store."""
    return {
        "amqp_url": env.amqp_url,
        "database_url": env.database_url,
        "prefix": env.settings.prefix,
        "secret_key": SECRET_KEY,
    }


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# --- owner create -------------------------------------------------------------------------------


async def test_owner_create_prints_an_owner_id_and_a_token(tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"

    ran = await smtp_worker(
        "owner", "create", "--name", "acme", cwd=tmp_path, database_url=database_url,
        secret_key=SECRET_KEY,
    )  # fmt: skip

    assert ran.code == 0, ran.stderr
    SECRETS.add(ran.json()["token"])
    assert sorted(ran.json()) == ["owner_id", "token"]


async def test_owner_create_without_a_secret_key_makes_one_only_its_user_can_read(
    tmp_path: Path,
) -> None:
    ran = await smtp_worker("owner", "create", "--name", "acme", cwd=tmp_path)

    assert ran.code == 0, ran.stderr
    SECRETS.add(ran.json()["token"])
    assert stat.S_IMODE((tmp_path / "var" / "secret.key").stat().st_mode) == 0o600


@ON_SQLITE
async def test_an_owner_made_by_the_command_line_can_send_commands(
    env: Env, tmp_path: Path
) -> None:
    owner = (
        await smtp_worker("owner", "create", "--name", "acme", cwd=tmp_path, **connected(env))
    ).json()
    SECRETS.add(owner["token"])

    reply = await env.client.call("settings.smtp_user.list", owner, {})

    assert reply["status"] == "success"


# --- call ---------------------------------------------------------------------------------------


@ON_SQLITE
async def test_call_prints_the_reply_and_exits_0_on_success(env: Env, tmp_path: Path) -> None:
    owner = await env.new_owner()

    ran = await smtp_worker(
        "call", "settings.smtp_user.list", "--auth", json.dumps(owner), "--data", "{}",
        cwd=tmp_path, **connected(env),
    )  # fmt: skip

    assert (ran.code, ran.json()["status"]) == (0, "success")
    assert ran.json()["data"] == {"smtp_list": []}


@ON_SQLITE
async def test_call_prints_the_reply_and_exits_1_on_an_error_reply(
    env: Env, tmp_path: Path
) -> None:
    owner = await env.new_owner()
    wrong = {"owner_id": owner["owner_id"], "token": "wrong-" + uuid.uuid4().hex}

    ran = await smtp_worker(
        "call", "settings.smtp_user.list", "--auth", json.dumps(wrong), "--data", "{}",
        cwd=tmp_path, **connected(env),
    )  # fmt: skip

    assert (ran.code, ran.json()["error"]["name"]) == (1, "AuthenticationError")


@ON_SQLITE
async def test_call_exits_2_when_no_reply_comes_in_time(env: Env, tmp_path: Path) -> None:
    while env.workers:  # the queues stay, nobody consumes them
        await env.workers.pop().stop()

    ran = await smtp_worker(
        "call", "settings.smtp_user.list", "--auth", "{}", "--data", "{}", "--timeout", "0.5",
        cwd=tmp_path, **connected(env),
    )  # fmt: skip

    assert (ran.code, ran.stdout) == (2, "")
    assert "no reply within 0.5 s" in ran.stderr


async def test_call_exits_2_on_a_prefix_no_worker_ever_ran_with(
    amqp_url: str, tmp_path: Path
) -> None:
    prefix = f"nobody{uuid.uuid4().hex[:10]}"

    ran = await smtp_worker(
        "call", "settings.smtp_user.list", "--auth", "{}", "--data", "{}", "--timeout", "30",
        cwd=tmp_path, amqp_url=amqp_url, prefix=prefix,
    )  # fmt: skip

    assert ran.code == 2
    assert f"no exchange {prefix}.commands" in ran.stderr


@ON_SQLITE
async def test_call_exits_2_and_says_so_when_the_broker_does_not_answer(
    env: Env, tmp_path: Path
) -> None:
    variables = connected(env) | {"amqp_url": "amqp://guest:guest@127.0.0.1:1/"}

    ran = await smtp_worker(
        "call", "settings.smtp_user.list", "--auth", "{}", "--data", "{}",
        cwd=tmp_path, **variables,
    )  # fmt: skip

    assert (2, "") == (ran.code, ran.stdout)
    assert "no broker node answered (127.0.0.1:1: " in ran.stderr


# --- events -------------------------------------------------------------------------------------


async def _line(stream: asyncio.StreamReader, timeout: float = 20) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    assert line, "the stream ended"
    return line.decode()


@ON_SQLITE
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_events_prints_each_event_as_a_json_line_until_stopped_then_exits_0(
    env: Env, tmp_path: Path, stop: signal.Signals
) -> None:
    owner = await env.new_owner()
    process = await spawn("events", "smtp_user.*", cwd=tmp_path, **connected(env))
    try:
        assert process.stdout is not None and process.stderr is not None
        while "events.listening" not in await _line(process.stderr):
            pass
        user = await env.client.ok(
            "settings.smtp_user.add", owner, {"total_limit": 1, "hourly_limit": 1}
        )
        await env.client.call("settings.channel.get", owner, {"name": "nope"})  # command.failed
        name = user["smtp_user_name"]
        await env.client.ok("settings.smtp_user.delete", owner, {"smtp_user_name": name})
        printed = [json.loads(await _line(process.stdout)) for _ in range(2)]
        process.send_signal(stop)
        code = await asyncio.wait_for(process.wait(), 20)
        PROCESS_LINES.extend((await process.stderr.read()).decode().splitlines())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert [("smtp_user.created", name), ("smtp_user.deleted", name)] == [
        (event["type"], event["data"]["smtp_user_name"]) for event in printed
    ]
    assert {owner["owner_id"]} == {event["owner_id"] for event in printed}
    assert 0 == code


async def test_events_exits_2_on_a_prefix_no_worker_ever_ran_with(
    amqp_url: str, tmp_path: Path
) -> None:
    prefix = f"nobody{uuid.uuid4().hex[:10]}"

    ran = await smtp_worker("events", cwd=tmp_path, amqp_url=amqp_url, prefix=prefix)

    assert (2, "") == (ran.code, ran.stdout)
    assert f"no exchange {prefix}.events" in ran.stderr


# --- migrate and run ----------------------------------------------------------------------------


async def test_migrate_makes_the_schema_of_a_fresh_sqlite_store(tmp_path: Path) -> None:
    ran = await smtp_worker("migrate", cwd=tmp_path)  # the default store: var/smtp-worker.db

    assert ran.code == 0, ran.stderr
    assert {"alembic_version", "owners", "processed_commands", "smtp_users"} <= tables(
        tmp_path / "var" / "smtp-worker.db"
    )


async def test_run_with_an_unknown_queue_fails_at_once_and_says_which(tmp_path: Path) -> None:
    ran = await smtp_worker("run", "--queues", "settings,nope", cwd=tmp_path, timeout=10)

    assert ran.code == 1
    assert ran.stderr.strip() == "smtp-worker: unknown queues: nope"
    assert not (tmp_path / "var").exists()  # it stopped before touching the store
