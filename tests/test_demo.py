"""`smtp-worker demo`, run as a user runs it: a subprocess configured by SMTP_WORKER_* variables.

With its own SMTP server it prints the emails as they arrive; with `--relay` they go to that
server, through whatever worker runs on the prefix.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.broker import delete_prefix
from tests.support.commandline import smtp_worker
from tests.support.environment import Env, make_settings
from tests.support.logs import SECRET_KEY
from tests.support.smtp_servers import SmtpServer

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
_HEADER = re.compile(r"^\s+(From|To|Subject|Message-ID|In-Reply-To):\s+(.*)$")


def printed_emails(stdout: str) -> list[dict[str, str]]:
    """The emails the demo's SMTP server printed, as {header: value}, in arrival order."""
    emails: list[dict[str, str]] = []
    for line in stdout.splitlines():
        if "--- email" in line:
            emails.append({})
        elif emails and (match := _HEADER.match(line)):
            emails[-1][match[1]] = match[2]
    return emails


def printed_sid(stdout: str) -> str:
    match = re.search(r"ticket\.new\s+ticket (\S+):", stdout)
    assert match, stdout
    return match[1]


def secret_shaped(stdout: str) -> list[str]:
    """Words shaped like the owner's token or the SMTP password (43 URL-safe characters); ids,
    SIDs and logins are shorter."""
    return re.findall(r"[A-Za-z0-9_-]{40,}", stdout)


@pytest.fixture
async def prefix(amqp_url: str) -> AsyncIterator[str]:
    """A prefix no worker has used; its topology is deleted afterwards."""
    settings = make_settings(amqp_url, "sqlite+aiosqlite://")
    yield settings.prefix
    await delete_prefix(amqp_url, settings)


async def test_demo_with_its_own_worker_prints_the_ticket_email_and_two_threaded_hits(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    ran = await smtp_worker(
        "demo", "--with-worker", "--timeout", "30", cwd=tmp_path, timeout=90,
        amqp_url=amqp_url, prefix=prefix, secret_key=SECRET_KEY,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}",
    )  # fmt: skip

    assert 0 == ran.code, ran.stdout + ran.stderr
    sid = printed_sid(ran.stdout)
    ticket, *hits = printed_emails(ran.stdout)
    assert re.fullmatch(rf"<{sid}@demo-[0-9a-f]+\.example\.com>", ticket["Message-ID"])
    assert "-" == ticket["In-Reply-To"]
    assert "[demo] Disk full on db-1" == ticket["Subject"]
    assert 2 == len(hits)
    assert [ticket["Message-ID"]] * 2 == [hit["In-Reply-To"] for hit in hits]
    assert ["Re: [demo] Disk full on db-1"] * 2 == [hit["Subject"] for hit in hits]
    assert "ticket.ack" in ran.stdout
    assert [] == secret_shaped(ran.stdout)


@ON_SQLITE
async def test_demo_against_a_running_worker_sends_through_the_given_relay(
    env: Env, tmp_path: Path
) -> None:
    async with SmtpServer() as relay:
        ran = await smtp_worker(
            "demo", "--relay", f"127.0.0.1:{relay.port}", "--relay-ui", "http://mail.test",
            "--timeout", "30", cwd=tmp_path, timeout=90,
            amqp_url=env.amqp_url, database_url=env.database_url, prefix=env.settings.prefix,
            secret_key=SECRET_KEY,
        )  # fmt: skip
        received = [m.message for m in await relay.wait_for(3)]

    assert 0 == ran.code, ran.stdout + ran.stderr
    sid = printed_sid(ran.stdout)
    ticket, *hits = received
    assert sid == ticket["X-Ticket-SID"]
    assert [ticket["Message-ID"]] * 2 == [hit["In-Reply-To"] for hit in hits]
    assert [ticket["Message-ID"]] * 2 == [hit["References"] for hit in hits]
    assert 3 == ran.stdout.count("email.sent")
    assert "http://mail.test" in ran.stdout
    assert [] == secret_shaped(ran.stdout)


async def test_demo_without_a_worker_says_how_to_get_one(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    ran = await smtp_worker(
        "demo", "--timeout", "2", cwd=tmp_path, amqp_url=amqp_url, prefix=prefix,
        secret_key=SECRET_KEY, database_url=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}",
    )  # fmt: skip

    assert 1 == ran.code
    assert "no worker has run with the prefix" in ran.stdout
    assert "--with-worker" in ran.stdout
    assert "Traceback" not in ran.stderr
