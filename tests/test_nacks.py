"""Publishes the broker nacks for a while (contract section 4: a passing fault, not a refusal).

While a node of a cluster restarts, the broker nacks publishes for a second or two (a queue they
route to is between leaders). The worker publishes a command's events and email jobs again
after a short pause, while it still holds the command, rather than requeueing it at once: ten
redeliveries in that second would dead-letter a command that ran, unanswered. Here a queue bound
to P.events that refuses every message (`reject-publish`, no room) makes the broker nack each
event, the way it does for a queue it cannot reach, until the queue goes away.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.support.environment import Env
from tests.support.logs import log_lines

ADD = "settings.smtp_user.add"
LIMITS = {"total_limit": 10, "hourly_limit": 10}


def nacked(message_id: str) -> int:
    return sum('"publish.nacked"' in line and message_id in line for line in log_lines())


async def test_a_command_whose_events_the_broker_nacks_for_a_while_is_answered_once(
    env: Env,
) -> None:
    owner = await env.new_owner()
    refusing = await env.client.channel.declare_queue(
        f"refusing-{uuid.uuid4().hex}",
        exclusive=True,
        arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    await refusing.bind(env.client.names.events, routing_key="#")
    message_id = f"nacked-{uuid.uuid4().hex}"
    body = json.dumps({"type": ADD, "auth": owner, "data": LIMITS}).encode()

    reply = await env.client.publish(body, ADD, message_id=message_id)
    assert reply is not None
    # The broker nacks its events for a second (the time ten redeliveries take), then no more.
    await asyncio.sleep(1.0)
    await refusing.delete(if_unused=False, if_empty=False)

    answer = json.loads((await asyncio.wait_for(reply, 20)).body)
    assert (answer["status"], answer["command_id"]) == ("success", message_id)
    users = (await env.client.ok("settings.smtp_user.list", owner, {}))["smtp_list"]
    assert [answer["data"]["smtp_user_name"]] == [user["smtp_user_name"] for user in users]
    # Each nacked try reached the other subscribers: an event comes at least once.
    created = await env.client.wait_events("smtp_user.created", count=1)
    assert {event["owner_id"] for event in created} == {owner["owner_id"]}
    assert [] == await env.client.dead_letters()
    assert nacked(message_id) >= 2  # the fault happened: its event was nacked, then sent again
