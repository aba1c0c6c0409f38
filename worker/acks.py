"""Acks, gathered: what a channel's consumer acks in one turn of the event loop goes out as one
`multiple` ack where the delivery tags run on from those settled before, one by one elsewhere.

A quorum queue writes each ack it is sent into its log: consuming a quorum queue on this
machine, RabbitMQ spent 65-131 µs of CPU per message acked alone, and 23-43 µs acked sixteen at a
time (README, Speed). The commands of a batch, and the emails recorded together, finish in the
same turn: their acks are one frame.

A `multiple` ack settles every outstanding delivery of its channel up to its tag, so it is sent
only for a run of tags each of which is settled here: acked now, or acked or rejected before,
through this module, since the channel's first delivery (tag 1). A tag this module has not seen
settled (a message still being processed, or one that never reached the consumer) ends the run,
and the acks after it go one by one: no message is acked that its consumer did not settle.

Every ack and reject of a consumer's channel must go through here (`ack`, `reject`), or its
tag ends every run from then on: a missed one only costs the gathering, never a message.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import MessageProcessError

__all__ = ["ack", "reject"]

log = structlog.get_logger("worker.acks")

# Tags settled past one that is not: past this many, that one is taken for never to be settled
# (its message never reached the consumer), and the channel's acks go one by one from then on.
# An email held by a slow relay for its 30 s timeout sees about 6,000 settled past it at 200
# emails a second; this many take about a megabyte.
MAX_SETTLED_AHEAD = 16384


class _Channel:
    """What one channel's consumer settled, and the acks asked for in the current turn."""

    def __init__(self) -> None:
        self.settled_upto = 0  # every delivery tag up to this one is settled
        self.settled: set[int] = set()  # settled tags past it
        self.asked: dict[int, AbstractIncomingMessage] = {}
        self.flush: asyncio.Task[dict[int, BaseException | None]] | None = None
        self.gathering = True

    def settling(self, message: AbstractIncomingMessage) -> int:
        """The tag of `message`, which is to be settled now; MessageProcessError if it was
        settled before, or is being acked: aio-pika cannot tell of a message whose ack was another
        one's `multiple` ack, and a second settle would cost the channel (406 unknown tag)."""
        tag = message.delivery_tag
        assert tag is not None
        if tag <= self.settled_upto or tag in self.settled or tag in self.asked:
            raise MessageProcessError("Message already processed", message)
        return tag

    def done(self, tag: int) -> None:
        if not self.gathering:
            return
        self.settled.add(tag)
        while self.settled_upto + 1 in self.settled:
            self.settled_upto += 1
            self.settled.remove(self.settled_upto)
        if len(self.settled) > MAX_SETTLED_AHEAD:
            log.warning("acks.one_by_one", unsettled=self.settled_upto + 1)
            self.gathering = False
            self.settled.clear()

    async def send(self) -> dict[int, BaseException | None]:
        """Sends the acks asked for: the run of them that follows what was settled before as
        one `multiple` ack, the others one by one. What became of each tag's ack: None when it
        went out (and is settled), else why not."""
        asked, self.asked, self.flush = self.asked, {}, None
        top, tag = 0, self.settled_upto
        while self.gathering and (tag + 1 in asked or tag + 1 in self.settled):
            tag += 1
            if tag in asked:
                top = tag
        # Each frame on its own, the run's as its last tag's: what a tag's ack became.
        frames = [tag for tag in asked if tag > top] + ([top] if top else [])
        sent = await asyncio.gather(
            *(asked[tag].ack(multiple=tag == top) for tag in frames), return_exceptions=True
        )
        became = dict(zip(frames, sent, strict=True))
        outcomes: dict[int, BaseException | None] = {}
        for tag in sorted(asked):
            outcome = became[tag if tag > top else top]
            outcomes[tag] = outcome
            if outcome is None:
                self.done(tag)
        return outcomes


# Per AMQP channel (aiormq's): a channel opened again after a reconnect starts its tags at 1.
_channels: weakref.WeakKeyDictionary[Any, _Channel] = weakref.WeakKeyDictionary()


def _of(message: AbstractIncomingMessage) -> _Channel:
    found = _channels.get(message.channel)
    if found is None:
        found = _channels[message.channel] = _Channel()
    return found


async def ack(message: AbstractIncomingMessage) -> None:
    """Acks `message`, with whatever else its channel acks in this turn of the event loop."""
    channel = _of(message)
    tag = channel.settling(message)
    channel.asked[tag] = message
    if channel.flush is None:
        # A task's first step runs after every callback ready now: the acks asked for in this
        # turn are gathered, and none waits for a later one.
        channel.flush = asyncio.get_running_loop().create_task(channel.send())
    outcome = (await asyncio.shield(channel.flush))[tag]
    if outcome is not None:
        raise outcome


async def reject(message: AbstractIncomingMessage, *, requeue: bool) -> None:
    """Rejects `message` at once; a later `multiple` ack may then run past its tag."""
    channel = _of(message)
    tag = channel.settling(message)
    await message.reject(requeue=requeue)
    channel.done(tag)
