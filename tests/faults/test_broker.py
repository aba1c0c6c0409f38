"""Scenario 3: the broker goes away under load, and comes back.

a) The worker's connection is cut for 10 seconds (through a proxy; the client is not cut).
b) The broker itself restarts: a private RabbitMQ node the test starts (tests/support/cluster.py)
   is stopped (`rabbitmqctl stop`, the node's VM exits) and started again.

Either way the worker's consumers come back by themselves, and the run completes: every command
answered once with one ticket, every email delivered exactly once, nothing dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.cluster import PrivateNodes
from tests.support.rig import Rig, build_rig, figure

pytestmark = pytest.mark.faults

COMMANDS = 300
OUTAGE = 10.0


def through(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def run_through_an_outage(
    rig: Rig, name: str, tag: str, outage: Callable[[], Awaitable[float]], **worker: str
) -> None:
    """Loads the worker, runs `outage` mid-load (it returns its length), checks nothing is lost."""
    await rig.start_worker(**worker)
    commands, ids = await rig.ticket_load(COMMANDS, tag)

    started = time.monotonic()
    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, COMMANDS // 4, timeout=120)
    answered_before = rig.load.answered(ids)
    outage_seconds = await outage()
    restored = time.monotonic()
    answered_during = rig.load.answered(ids) - answered_before
    next_reply = min(COMMANDS, answered_before + answered_during + 1)
    assert await rig.load.wait_answered(ids, next_reply, timeout=120)
    first_reply_after = time.monotonic() - restored
    assert await rig.load.wait_answered(ids, COMMANDS, timeout=120), rig.load.answered(ids)
    sids = rig.replies_of(ids)
    assert await rig.wait_emails(set(sids.values()), timeout=120)
    finished = time.monotonic()

    worker_process = rig.workers[0]
    processings = worker_process.processings(ids)
    tickets = await rig.query("SELECT count(*) AS n FROM tickets")
    received = rig.emails_by_sid()
    dead = await rig.load.dead()
    figure(
        name,
        commands=COMMANDS,
        outage_s=round(outage_seconds, 1),
        answered_before=answered_before,
        answered_during=answered_during,
        first_reply_after_s=round(first_reply_after, 1),
        total_s=round(finished - started, 1),
        replies=sum(len(rig.load.replies[i]) for i in ids),
        tickets=tickets[0].n,
        emails=sum(received.values()),
        commands_processed=dict(worker_process.outcomes()),
        emails_processed=dict(worker_process.outcomes("email.processed")),
        processed_twice=sum(1 for n in processings.values() if n == 2),
        processed_more=sum(1 for n in processings.values() if n > 2),
        dead=len(dead),
    )
    assert 0 == worker_process.count("worker.stopped")  # the same process throughout
    # A message in flight at the outage comes back once; no other attempt is spent on it.
    assert max(processings.values()) <= 2
    assert COMMANDS == len(set(sids.values())) == tickets[0].n
    assert COMMANDS == sum(received.values()) == len(received)
    assert [] == dead


async def test_the_worker_comes_back_after_its_broker_connection_is_cut_for_10_s(
    rig: Rig, amqp_url: str
) -> None:
    proxy = rig.proxy(urlsplit(amqp_url).port or 5672)

    async def cut() -> float:
        started = time.monotonic()
        proxy.cut()
        await asyncio.sleep(OUTAGE)
        proxy.restore()
        return time.monotonic() - started

    await run_through_an_outage(
        rig, "broker cut", "cut", cut, amqp_url=through(amqp_url, proxy.port)
    )


@pytest.mark.timeout(240)
async def test_the_worker_comes_back_after_its_broker_restarts(
    private_broker: PrivateNodes, postgres_admin_url: str, tmp_path: Path
) -> None:
    url = private_broker.urls[0]
    async with build_rig(url, postgres_admin_url, tmp_path) as rig:

        async def restart() -> float:
            started = time.monotonic()
            await asyncio.to_thread(private_broker.stop, 0)
            await asyncio.to_thread(private_broker.restart, 0)
            # The load client's own connection must be back before its replies can arrive.
            assert rig.load.channel is not None
            await asyncio.wait_for(rig.load.channel.ready(), 60)
            return time.monotonic() - started

        await run_through_an_outage(rig, "broker restart", "restart", restart)
