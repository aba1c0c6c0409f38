"""Scenario: a RabbitMQ cluster of three private nodes loses nodes under load (contract 1).

Workers get every node's URL (`SMTP_WORKER_AMQP_URL=n0,n1,n2`) and start on the first; the load
client lists them the other way round. Its reply queue is a quorum queue, as are the worker's
queues, so they live on every node.

a) kill -9 of the node the worker is connected to, in the middle of 1,000 `ticket.new`.
b) A rolling restart: each node in turn stopped and started again, while commands keep coming.
c) Two workers on two different nodes and one PostgreSQL store, and a client on the third node
   whose direct reply-to token names that node.

Every time: every command answered (every reply of one message_id the same success), one
ticket and one email per command, nothing dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import pytest

from schemas import SuccessReply
from tests.support.cluster import PrivateNodes
from tests.support.polling import wait_until
from tests.support.processes import WorkerProcess
from tests.support.rig import Rig, figure
from worker.broker import COMMAND_QUEUES
from worker.client import Client

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

KILL_COMMANDS = 1000
ROLLING_COMMANDS = 600
TWO_WORKER_COMMANDS = 600
DIRECT_CALLS = 20


def node_of(worker: WorkerProcess) -> str:
    """host:port of the node the worker is connected to now, from its log."""
    return str(worker.lines_of("broker.connected")[-1]["node"])


async def unanswered(rig: Rig, ids: list[str], cluster: PrivateNodes) -> str:
    """Where the commands without a reply are: what the worker logged of each, what waits in
    the load client's reply queue and the command queues, and each queue's unacked messages and
    consumers as the broker counts them. Printed whole (an assertion message is cut short)."""
    missing = [i for i in ids if i not in rig.load.replies]
    assert rig.load.connection is not None
    depths: dict[str, object] = {}
    names = rig.load.names
    commands = [names.queue(short) for short in COMMAND_QUEUES]
    for name in (rig.load.reply_queue_name, *commands, names.deliveries):
        try:  # a channel of its own: a failed passive declare closes it
            async with rig.load.connection.channel() as channel:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = queue.declaration_result.message_count
        except Exception as exc:
            depths[name] = repr(exc)
    shown = set(missing[:10])
    logged = [
        {key: line.get(key) for key in ("message_id", "event", "outcome", "reason", "level")}
        for worker in rig.workers
        for line in worker.lines()
        if line.get("message_id") in shown
    ]
    queues = ""
    for index, node in enumerate(cluster.nodes):
        if cluster.running(index):
            columns = ("name", "messages_ready", "messages_unacknowledged", "consumers", "leader")
            with contextlib.suppress(Exception):
                queues = await asyncio.to_thread(
                    cluster.ctl, node, "list_queues", *columns, timeout=30
                )
            break
    report = {
        "answered": len(ids) - len(missing),
        "missing": missing[:10],
        "missing_count": len(missing),
        "logged_of_missing": logged,
        "queue_depths": depths,
        "queues": queues,
        "worker_tail": [worker.tail(15) for worker in rig.workers],
    }
    text = json.dumps(report, indent=1, default=str)
    print(text)  # pytest shows it under "Captured stdout call"
    return text


async def settled(
    rig: Rig,
    cluster: PrivateNodes,
    ids: list[str],
    timeout: float,
    other_sids: frozenset[str] = frozenset(),
) -> dict[str, object]:
    """Waits for every reply and email; checks nothing was lost or doubled; the figures.
    `other_sids`: tickets made by other commands than the load client's `ids`."""
    if not await rig.load.wait_answered(ids, len(ids), timeout=timeout):
        pytest.fail(await unanswered(rig, ids, cluster))
    sids = set(rig.replies_of(ids).values()) | other_sids
    assert await rig.wait_emails(sids, timeout=timeout)
    tickets = await rig.query("SELECT count(*) AS n FROM tickets")
    received = rig.emails_by_sid()
    dead = await rig.load.dead()
    processings = sum((worker.processings(ids) for worker in rig.workers), start=Counter())
    figures: dict[str, object] = {
        "replies": sum(len(rig.load.replies[i]) for i in ids),
        "tickets": tickets[0].n,
        "emails": sum(received.values()),
        "processed_twice": sum(1 for n in processings.values() if n == 2),
        "processed_more": sum(1 for n in processings.values() if n > 2),
        "dead": len(dead),
    }
    assert len(ids) + len(other_sids) == len(sids) == tickets[0].n
    assert len(sids) == sum(received.values()) == len(received)  # each email once
    assert [] == dead
    return figures


async def test_kill_9_of_the_workers_node_in_the_middle_of_1000_tickets(
    cluster_rig: Rig, rabbit_cluster: PrivateNodes
) -> None:
    rig = cluster_rig
    worker = await rig.start_worker()
    victim = rabbit_cluster.index_of(node_of(worker))
    commands, ids = await rig.ticket_load(KILL_COMMANDS, "kill")

    started = time.monotonic()
    await rig.load.publish_many(commands)
    assert await rig.load.wait_answered(ids, KILL_COMMANDS // 4, timeout=60)
    answered_before = rig.load.answered(ids)
    connections = worker.count("broker.connected")
    await asyncio.to_thread(rabbit_cluster.kill, victim)
    killed = time.monotonic()
    assert await wait_until(lambda: worker.count("broker.connected") > connections, 60)
    moved = time.monotonic() - killed
    assert await rig.load.wait_answered(ids, rig.load.answered(ids) + 1, timeout=60)
    first_reply_after = time.monotonic() - killed
    assert await rig.load.wait_answered(ids, KILL_COMMANDS, timeout=90), rig.load.answered(ids)
    answered_all = time.monotonic() - started
    # The killed node comes back, as it would: P.dead (a classic queue) lives there.
    await asyncio.to_thread(rabbit_cluster.restart, victim)
    # An email whose lease was taken on the lost node's watch may wait out its 60 s lease.
    figures = await settled(rig, rabbit_cluster, ids, timeout=90)

    figure(
        "cluster kill -9",
        commands=KILL_COMMANDS,
        answered_before_kill=answered_before,
        moved_to_another_node_s=round(moved, 1),
        first_reply_after_kill_s=round(first_reply_after, 1),
        all_answered_s=round(answered_all, 1),
        **figures,
    )
    assert node_of(worker) != rabbit_cluster.nodes[victim].where
    assert 0 == worker.count("worker.stopped")  # the same process throughout


async def test_a_rolling_restart_of_all_three_nodes_under_load(
    cluster_rig: Rig, rabbit_cluster: PrivateNodes
) -> None:
    rig = cluster_rig
    worker = await rig.start_worker()
    commands, ids = await rig.ticket_load(ROLLING_COMMANDS, "rolling")
    outages: list[float] = []

    async def roll() -> None:
        await asyncio.sleep(2)
        for index in range(len(rabbit_cluster.nodes)):
            # As an operator does: the next node only once no quorum queue depends on it.
            await asyncio.to_thread(rabbit_cluster.await_not_quorum_critical, index)
            stopped = time.monotonic()
            await asyncio.to_thread(rabbit_cluster.stop, index)
            await asyncio.to_thread(rabbit_cluster.restart, index)
            outages.append(time.monotonic() - stopped)

    started = time.monotonic()
    rolling = asyncio.create_task(roll())
    failed_publishes = await rig.load.publish_steadily(commands, per_second=20, timeout=120)
    await rolling
    figures = await settled(rig, rabbit_cluster, ids, timeout=90)

    figure(
        "cluster rolling restart",
        commands=ROLLING_COMMANDS,
        node_outages_s=[round(outage, 1) for outage in outages],
        publishes_retried=failed_publishes,
        worker_connections=worker.count("broker.connected"),
        total_s=round(time.monotonic() - started, 1),
        **figures,
    )
    assert 0 == worker.count("worker.stopped")


async def test_two_workers_on_two_nodes_and_a_client_on_the_third(
    cluster_rig: Rig, rabbit_cluster: PrivateNodes
) -> None:
    rig = cluster_rig
    urls = rabbit_cluster.urls
    first = await rig.start_worker()
    second = await rig.start_worker(amqp_url=",".join([*urls[1:], urls[0]]))
    assert node_of(first) != node_of(second)
    commands, ids = await rig.ticket_load(TWO_WORKER_COMMANDS, "two")

    started = time.monotonic()
    await rig.load.publish_many(commands)
    # A client on the third node: its direct reply-to tokens name that node.
    async with Client(urls[2], prefix=rig.settings.prefix) as client:
        replies = await asyncio.gather(
            *(
                client.call(
                    "ticket.new",
                    rig.auth,
                    {"channel": "ops", "ticket": {"title": f"direct {i}", "body": "load"}},
                    timeout=60,
                )
                for i in range(DIRECT_CALLS)
            )
        )
    direct_sids = frozenset(r.data.sid for r in replies if isinstance(r, SuccessReply))
    figures = await settled(rig, rabbit_cluster, ids, timeout=90, other_sids=direct_sids)

    by_worker = [sum(worker.processings(ids).values()) for worker in rig.workers]
    figure(
        "cluster two workers",
        commands=TWO_WORKER_COMMANDS,
        nodes=[node_of(first), node_of(second), rabbit_cluster.nodes[2].where],
        processed_by_worker=by_worker,
        direct_reply_to_calls_answered=len(direct_sids),
        total_s=round(time.monotonic() - started, 1),
        **figures,
    )
    assert DIRECT_CALLS == len(direct_sids)
    assert all(count > 0 for count in by_worker)
