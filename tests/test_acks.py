"""Acks gathered per channel (worker.acks), against the broker: every message acked is one its
consumer settled, and none other, whatever order they are settled in.

Each test consumes a quorum queue of its own, as the worker's queues are, holds the messages it
is given, settles them as it says, then closes the channel: what the broker delivers again is
what was not acked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import MessageProcessError

from worker import acks

COUNT = 10


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(amqp_url)
    yield connection
    await connection.close()


@pytest.fixture
async def queue(connection: AbstractRobustConnection) -> AsyncIterator[str]:
    """A quorum queue of the test's own holding COUNT messages, bodies b"1" to b"10"."""
    name = f"t{uuid.uuid4().hex[:10]}.acks"
    async with connection.channel() as channel:
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        for n in range(1, COUNT + 1):
            await channel.default_exchange.publish(
                aio_pika.Message(str(n).encode()), routing_key=name
            )
    yield name
    async with connection.channel() as channel:
        await channel.queue_delete(name)


async def delivered(
    channel: AbstractChannel, queue: str, count: int
) -> list[AbstractIncomingMessage]:
    """The first `count` messages of `queue`, consumed on `channel` and not settled."""
    got: list[AbstractIncomingMessage] = []
    enough = asyncio.Event()

    async def hold(message: AbstractIncomingMessage) -> None:
        if len(got) < count:
            got.append(message)
        if len(got) == count:
            enough.set()

    await channel.set_qos(prefetch_count=COUNT)
    await (await channel.get_queue(queue)).consume(hold)
    await asyncio.wait_for(enough.wait(), 10)
    return got


async def left_in(connection: AbstractRobustConnection, queue: str) -> list[bytes]:
    """The bodies the broker delivers again, once the consuming channel is closed."""
    async with connection.channel() as channel:
        again = await channel.get_queue(queue)
        bodies = []
        while (message := await again.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


def sent_alone(messages: list[AbstractIncomingMessage]) -> list[bytes]:
    """The messages whose own ack went out (a `multiple` ack is the last one's of its run)."""
    return [message.body for message in messages if message.processed]


async def test_acks_asked_together_go_out_as_one_up_to_a_message_still_being_processed(
    connection: AbstractRobustConnection, queue: str
) -> None:
    channel = await connection.channel()
    messages = await delivered(channel, queue, COUNT)
    still_processed = messages[3]

    await asyncio.gather(*(acks.ack(m) for m in messages if m is not still_processed))
    await asyncio.sleep(0.2)  # the acks reach the broker before the channel closes
    await channel.close()

    # 1-3 in one ack (3's), 5-10 one by one: 4 stops the run.
    assert [b"3", b"5", b"6", b"7", b"8", b"9", b"10"] == sent_alone(messages)
    assert [b"4"] == await left_in(connection, queue)


async def test_a_run_passes_a_rejected_message_and_acks_settled_earlier(
    connection: AbstractRobustConnection, queue: str
) -> None:
    channel = await connection.channel()
    messages = await delivered(channel, queue, COUNT)

    await acks.ack(messages[0])
    await acks.reject(messages[4], requeue=False)
    await asyncio.gather(*(acks.ack(m) for m in messages[1:4]))
    await asyncio.gather(*(acks.ack(m) for m in messages[5:]))
    await asyncio.sleep(0.2)
    await channel.close()

    # 1 alone, 2-4 in 4's ack, 6-10 in 10's, running past the rejected 5 (dropped).
    assert [b"1", b"4", b"5", b"10"] == sent_alone(messages)
    assert [] == await left_in(connection, queue)


async def test_acks_past_a_message_never_settled_go_one_by_one(
    connection: AbstractRobustConnection, queue: str
) -> None:
    channel = await connection.channel()
    messages = await delivered(channel, queue, COUNT)

    # 1 is never settled.
    await asyncio.gather(*(acks.ack(m) for m in messages[1:]))
    await asyncio.sleep(0.2)
    await channel.close()

    assert [m.body for m in messages[1:]] == sent_alone(messages)
    assert [b"1"] == await left_in(connection, queue)


async def test_a_message_acked_in_another_ones_multiple_ack_is_not_settled_again(
    connection: AbstractRobustConnection, queue: str
) -> None:
    """aio-pika cannot tell such a message was acked: a second settle sent to the broker would
    name a tag it no longer knows, and it would close the channel over it (406)."""
    channel = await connection.channel()
    messages = await delivered(channel, queue, COUNT)
    await asyncio.gather(*(acks.ack(m) for m in messages[:3]))  # one ack, 3's

    with pytest.raises(MessageProcessError):
        await acks.reject(messages[0], requeue=True)
    with pytest.raises(MessageProcessError):
        await acks.ack(messages[1])
    await acks.ack(messages[3])
    await asyncio.sleep(0.2)

    assert [b"3", b"4"] == sent_alone(messages)
    assert not (await channel.get_underlay_channel()).is_closed
    await channel.close()
    assert [m.body for m in messages[4:]] == await left_in(connection, queue)
