"""The client's connection: commands with their replies, and event streams.

call:   publish to P.commands (confirmed, mandatory, reply_to = direct reply-to)
        --> wait for the reply whose correlation_id is this attempt's
        connection lost? reconnect (first node that answers) and publish again, same
        message_id, until the timeout: the worker runs a message_id once
events: exclusive server-named queue bound to P.events --> typed events, acked as read
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self

import pydantic
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    PublishError,
)

from schemas import Event, Reply, parse_event
from worker.broker import Names, json_message
from worker.client.commands import Commands
from worker.client.errors import (
    BrokerUnreachable,
    ConnectionLost,
    NoReply,
    NoWorker,
    Unroutable,
)
from worker.connection import NoNodeAnswered, open_first, split_urls

log = structlog.get_logger("worker.client")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONNECT_TIMEOUT = 10.0
# Between two attempts of a call whose connection broke: long enough not to spin while a node
# restarts, short next to a call's timeout.
RETRY_PAUSE = 0.5
# Failures after which a call reconnects and resends: the connection or channel broke, or the
# broker refused the message (a nack) without saying it was wrong. aiormq raises RuntimeError
# for a channel asked of a connection that has just closed.
_RETRIED = (
    AMQPConnectionError,
    ConnectionError,
    ChannelInvalidStateError,
    ChannelClosed,
    DeliveryError,
    RuntimeError,
)


def _alive(connection: AbstractConnection) -> bool:
    # A connection the broker or the network broke is not `is_closed` (that is for close()),
    # but it is no longer `connected`.
    return not connection.is_closed and connection.connected.is_set()


class _Opened:
    """`async with` opens it (`_open`) and closes it."""

    async def _open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Client(Commands, _Opened):
    """A connection to the worker's broker, as an upstream service uses it.

    async with Client("amqp://guest:guest@localhost:5672/", prefix="smtp") as client:
        reply = await client.ticket_new(auth, channel="ops", ticket={"title": ..., "body": ...})
        async with client.events("ticket.*") as events:
            async for event in events:
                ...

    One connection, opened on the first node of `amqp_url` that answers (several URLs separated
    by commas are the nodes of one cluster), and reopened by the next call after it breaks.
    Calls may run concurrently.
    """

    def __init__(
        self,
        amqp_url: str | Sequence[str],
        prefix: str = "smtp",
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.urls = split_urls(amqp_url)
        self.names = Names(prefix)
        self.connect_timeout = connect_timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._commands: AbstractExchange | None = None
        # correlation_id -> (the channel the command went out on, the future of its reply)
        self._pending: dict[str, tuple[AbstractChannel, asyncio.Future[bytes]]] = {}
        self._streams: set[EventStream] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    async def _open(self) -> None:
        await self.connect()

    async def connect(self) -> None:
        """Opens the connection now rather than at the first call; BrokerUnreachable if no node
        answers."""
        self._closed = False
        async with self._lock:
            await self._connect()

    async def close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            await stream.close()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            await connection.close()
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("the client was closed"))

    # --- commands -------------------------------------------------------------------------------

    async def call(
        self,
        type: str,
        auth: Any,
        data: Any = None,
        message_id: str | None = None,
        timeout: float = 30,
    ) -> Reply:
        """Sends one command and returns its reply: a `SuccessReply` typed by the command (a
        `TicketNewSuccess` for `ticket.new`: `reply.data.sid`), or an `ErrorReply`.

        `auth` and `data` are mappings or `schemas` models (sent as the fields that were set).
        The command's `message_id` (a new one unless given) makes it idempotent: when the
        connection breaks before the reply came, the call reconnects and sends it again, and
        the worker answers a repeat with the first reply. Raises NoReply when no reply comes
        within `timeout` seconds, NoWorker when no worker ever ran with this prefix, Unroutable
        when no queue takes the type.
        """
        return await self._call(type, auth, data, message_id, timeout, lenient=True)

    async def _request(self, type_: str, body: bytes, message_id: str, timeout: float) -> bytes:
        lost: BaseException | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        return await self._attempt(type_, body, message_id)
                    except (ConnectionLost, BrokerUnreachable) as exc:
                        if self._closed:
                            raise
                        lost = exc
                        log.info("client.call_retried", error=str(exc))
                        await asyncio.sleep(RETRY_PAUSE)
        except TimeoutError:
            raise NoReply(f"no reply within {timeout:g} s") from lost

    async def _attempt(self, type_: str, body: bytes, message_id: str) -> bytes:
        channel = await self._reply_channel()
        # Each attempt its own correlation_id, so that two calls given one message_id, or a
        # late reply to an attempt given up, never answer another attempt.
        correlation_id = uuid.uuid4().hex
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = (channel, reply)
        try:
            exchange = await self._commands_exchange(channel)
            await exchange.publish(
                json_message(
                    body,
                    message_id=message_id,
                    correlation_id=correlation_id,
                    reply_to=DIRECT_REPLY_TO,
                ),
                routing_key=type_,
                mandatory=True,
            )
            return await reply
        except ConnectionLost:
            raise  # set on the reply by _on_close
        except PublishError as exc:
            raise Unroutable(f"no queue of {self.names.commands} takes {type_!r}") from exc
        except ChannelNotFoundEntity as exc:
            self._commands = None
            raise self._no_worker(self.names.commands) from exc
        except _RETRIED as exc:
            raise ConnectionLost(f"{type(exc).__name__} while sending {type_}") from exc
        finally:
            self._pending.pop(correlation_id, None)

    async def _connect(self) -> AbstractConnection:
        if self._connection is not None:
            if _alive(self._connection):
                return self._connection
            # Closed here, with the loop running, rather than by its __del__ at any time later.
            with contextlib.suppress(*_RETRIED):
                await self._connection.close()
            self._connection = None
        name = f"smtp-worker client {socket.gethostname()}:{os.getpid()}"
        try:
            connection = await open_first(
                self.urls, timeout=self.connect_timeout, client_properties={"connection_name": name}
            )
        except NoNodeAnswered as exc:
            raise BrokerUnreachable(str(exc)) from None
        connection.close_callbacks.add(self._on_close)
        self._connection, self._channel, self._commands = connection, None, None
        return connection

    async def _reply_channel(self) -> AbstractChannel:
        """The channel commands go out on: direct reply-to answers on the publishing channel."""
        async with self._lock:
            connection = await self._connect()
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                channel.close_callbacks.add(self._on_close)
                # Direct reply-to: consume the pseudo-queue, without acks, before publishing.
                replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
                await replies.consume(self._on_reply, no_ack=True)
            except _RETRIED as exc:
                raise ConnectionLost(f"{type(exc).__name__} while opening a channel") from exc
            self._channel, self._commands = channel, None
            return channel

    async def _commands_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        if self._commands is None:
            await self._require(self.names.commands)
            self._commands = await channel.get_exchange(self.names.commands, ensure=False)
        return self._commands

    async def _require(self, exchange: str) -> None:
        """NoWorker unless `exchange` exists. Asked on a channel of its own, since asking for a
        missing exchange closes the channel that asked."""
        connection = await self._connect()
        try:
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.get_exchange(exchange, ensure=True)
            finally:
                if not channel.is_closed:
                    await channel.close()
        except ChannelNotFoundEntity as exc:
            raise self._no_worker(exchange) from exc
        except _RETRIED as exc:
            raise ConnectionLost(f"{type(exc).__name__} while looking for {exchange}") from exc

    @staticmethod
    def _no_worker(exchange: str) -> NoWorker:
        return NoWorker(f"no exchange {exchange}: no worker has run with this prefix")

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        pending = self._pending.get(message.correlation_id or "")
        if pending is not None and not pending[1].done():
            pending[1].set_result(message.body)

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        """A channel or the connection closed: the replies of its commands cannot come."""
        for channel, future in list(self._pending.values()):
            if (sender is self._connection or sender is channel) and not future.done():
                future.set_exception(ConnectionLost(f"{type(sender).__name__} closed"))
        if sender is self._channel:
            self._channel = None

    # --- events ---------------------------------------------------------------------------------

    def events(self, *patterns: str, prefetch: int = 100) -> EventStream:
        """The events whose type matches one of the topic `patterns` (default: every event).

        Subscribes on `async with`, or at the first iteration; what was published before that
        is not seen. Events of a type this version does not know come as a plain `Event`.
        """
        return EventStream(self, patterns or ("#",), prefetch)

    async def _open_events(
        self, patterns: Iterable[str], prefetch: int, stream: EventStream
    ) -> tuple[AbstractChannel, AbstractQueue]:
        await self._require(self.names.events)
        connection = await self._connect()
        try:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            exchange = await channel.get_exchange(self.names.events, ensure=False)
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in patterns:
                await queue.bind(exchange, pattern)
            await queue.consume(stream._on_message)
        except _RETRIED as exc:
            raise ConnectionLost(f"{type(exc).__name__} while subscribing to events") from exc
        channel.close_callbacks.add(stream._on_close)
        self._streams.add(stream)
        return channel, queue


class EventStream(_Opened):
    """Typed events of `P.events`, from a queue of the stream's own that lives as long as it.

    async with client.events("ticket.*", "hit.*") as events:
        async for event in events:      # TicketCreatedEvent, HitCreatedEvent, ...
            ...

    Each event is acked when the next is asked for, so at most `prefetch` wait in this process.
    It ends (StopAsyncIteration) when closed, and raises ConnectionLost when its connection
    breaks: a new stream sees only events published after it subscribed.
    """

    def __init__(self, client: Client, patterns: Iterable[str], prefetch: int) -> None:
        self.patterns = tuple(patterns)
        self._client = client
        self._prefetch = prefetch
        self._inbox: asyncio.Queue[AbstractIncomingMessage | BaseException | None] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._last: AbstractIncomingMessage | None = None
        self._closed = False

    async def _open(self) -> None:
        await self.start()

    def __aiter__(self) -> Self:
        return self

    async def start(self) -> None:
        """Subscribes: every matching event published from now on will be seen."""
        if self._channel is None and not self._closed:
            self._channel, _ = await self._client._open_events(self.patterns, self._prefetch, self)

    async def __anext__(self) -> Event[Any]:
        await self.start()
        while True:
            await self._ack_last()
            item = await self._inbox.get()
            if item is None or isinstance(item, BaseException):
                self._inbox.put_nowait(item)  # so that the next call ends or fails alike
                if item is None:
                    raise StopAsyncIteration
                raise item
            self._last = item
            try:
                return parse_event(item.body)
            except pydantic.ValidationError:
                # Not an event at all: someone else publishes to P.events. Skip it.
                log.warning("client.event_unreadable", routing_key=item.routing_key)

    async def _ack_last(self) -> None:
        last, self._last = self._last, None
        if last is not None and not self._closed:
            try:
                await last.ack()
            except _RETRIED as exc:
                raise ConnectionLost("the event stream's channel closed") from exc

    async def close(self) -> None:
        """Unsubscribes; its queue goes with its channel."""
        if self._closed:
            return
        self._closed = True
        self._client._streams.discard(self)
        self._inbox.put_nowait(None)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_RETRIED):  # already gone, and its queue with it
                await channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        if not self._closed:
            self._inbox.put_nowait(ConnectionLost("the event stream's connection closed"))
