"""The Python client of smtp-worker: what an upstream service uses instead of raw AMQP.

    from worker.client import Client

    async with Client("amqp://guest:guest@localhost:5672/", prefix="smtp") as client:
        reply = await client.call("settings.smtp_user.list", owner_auth, {})
        reply = await client.ticket_new(user_auth, channel="ops", ticket={...})
        async with client.events("ticket.*") as events:
            async for event in events:
                print(event.type, event.data)

Replies and events are the `schemas` models (`schemas.replies`, `schemas.events`).
"""

from worker.client.commands import UNSET, Unset
from worker.client.connection import Client, EventStream
from worker.client.errors import (
    BadReply,
    BrokerUnreachable,
    ClientError,
    ConnectionLost,
    NoReply,
    NoWorker,
    Unroutable,
)
from worker.connection import split_urls

__all__ = [
    "UNSET",
    "BadReply",
    "BrokerUnreachable",
    "Client",
    "ClientError",
    "ConnectionLost",
    "EventStream",
    "NoReply",
    "NoWorker",
    "Unroutable",
    "Unset",
    "split_urls",
]
