"""The broker: topology, confirmed publishing, replies and events.

Every name below carries the deployment's prefix `P`:

    P.commands (topic) --ticket.*--> P.tickets     (quorum) --+
                       --hit.*-----> P.hits        (quorum) --+
                       --settings.#> P.settings    (quorum) --+-- dead-letter --> P.dead (fanout)
                       --(no match)> P.unrouted (fanout)      |                     |
                                     `--> P.unrouted (quorum) +                  P.dead (queue)
                                     P.deliveries  (quorum) --+
                                     P.probes      (quorum, one active consumer) --+
    P.deliveries.wait.<ms> (quorum, TTL) -- dead-letter back to --> P.deliveries
    P.probes.wait.<ms>     (quorum, TTL) -- dead-letter back to --> P.probes
    P.events (topic): domain events, routing key = event type

P.unrouted is the alternate exchange of P.commands: a command whose routing key no queue is bound
to lands there, to be answered, instead of being dropped by the broker.

On a cluster (several node URLs) every queue but P.dead is a quorum queue, replicated across the
nodes: losing a node loses none of their messages. The delay queues dead-letter at least once
(their messages stay until P.deliveries or P.probes has them). P.dead is a classic queue unless
an operator declared it as a quorum queue before the first worker started: the worker takes it as
it finds it. A classic queue lives on one node; while that node is down it cannot be declared
(the worker logs `topology.queue_unavailable` and goes on) and what is dead-lettered to it is
lost. The connection moves to another node when its node is lost (worker.connection); the
queues are declared again there, and aio-pika restores the channels and their consumers.

Replies have confirming channels of their own, one reply at a time on each, so that a reply the
broker refuses (a nack, or the channel it closes over that reply) costs no other reply, event or
email job its publishing. One at a time, because a frame that reaches the broker on a channel after
it closed that channel costs the whole connection (504 CHANNEL_ERROR - expected 'channel.open'),
and aiormq lets a publish queued on a channel go out behind the close-ok it answers the broker's
close with (see Broker._reply_channel).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
from aiormq import spec
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.exceptions import (
    AMQPChannelError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    DeliveryError,
)
from aiormq.exceptions import AMQPError as AiormqError
from pamqp.common import FieldValue

from worker import reply_to as reply_names
from worker.config import Settings
from worker.connection import ClusterConnection, NoNodeAnswered, connect_first, open_first
from worker.errors import BrokerUnavailable

log = structlog.get_logger("worker.broker")

# Quorum queues count every return of a message (reject with requeue, a consumer's channel
# closing); past this many returns the broker dead-letters it. Changing it means redeclaring
# the queues, so it is a constant, not a setting.
DELIVERY_LIMIT = 10
COMMAND_QUEUES: Mapping[str, str] = {
    "tickets": "ticket.*",
    "hits": "hit.*",
    "settings": "settings.#",
}
PUBLISH_TIMEOUT = 15.0
# A publish the broker nacks while the connection stands is sent again after each of these
# (seconds). A node's restart makes the broker nack for a second or two (a queue it routes to is
# between leaders, or on a node still starting); requeueing the message at once instead would
# spend its DELIVERY_LIMIT attempts within that time and dead-letter a command that ran.
NACK_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
# How long a starting worker tries the broker's nodes before it gives up.
STARTUP_CONNECT_TIMEOUT = 30.0
# The delay queues a parked job waits in (its owner or relay had no turn for it soon:
# worker.gate), each job in the one that matches its place in its relay's line.
PARK_DELAYS = (1.0, 2.0, 5.0, 10.0)
# Replies to direct reply-to tokens of other nodes (Broker._reply_elsewhere): their connection is
# opened again at most this often, and a node found not running is taken for down this long.
ELSEWHERE_REOPEN_EVERY = 1.0
NODE_DOWN_FOR = 10.0
NODES_DOWN_KEPT = 1024
# Replies of the current connection go out on at most this many channels, one reply in flight on
# each (see Broker._reply_channel); a reply waits for one of them to be free.
REPLY_CHANNELS = 64


@dataclass(frozen=True, slots=True)
class Names:
    """The names of the exchanges and queues of contract section 2, under `prefix`."""

    prefix: str
    commands: str = field(init=False)
    events: str = field(init=False)
    dead: str = field(init=False)
    deliveries: str = field(init=False)
    unrouted: str = field(init=False)
    probes: str = field(init=False)

    def __post_init__(self) -> None:
        for short in ("commands", "events", "dead", "deliveries", "unrouted", "probes"):
            object.__setattr__(self, short, f"{self.prefix}.{short}")

    def queue(self, short: str) -> str:
        return f"{self.prefix}.{short}"

    def delay(self, seconds: float, short: str = "deliveries") -> str:
        # `wait`, not `delay`: the classic delay queues of earlier releases were named
        # P.<short>.delay.<ms>; they go on dead-lettering what they hold to the same queues.
        return f"{self.prefix}.{short}.wait.{round(seconds * 1000)}ms"


def _publish_errors() -> tuple[type[BaseException], ...]:
    return (
        AMQPError,
        AiormqError,
        ChannelInvalidStateError,
        ConnectionError,
        OSError,
        asyncio.TimeoutError,
        RuntimeError,
    )


async def settle(action: Awaitable[Any], event: str) -> None:
    """Awaits an ack or reject. On a dead channel it fails, and that is fine: the broker gives
    every unacked message back by itself, so the failure is logged as `event` and dropped."""
    try:
        await action
    except Exception:  # noqa: BLE001 - see the docstring
        structlog.get_logger("worker.broker").warning(event)


class _ElsewhereCooling(Exception):
    """The connection for other nodes' replies was lost a moment ago: not opened again yet."""


class Broker:
    """One robust connection; confirming channels to publish; one channel per consumer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        # Reply channels with no reply in flight, kept for the next ones (see _reply_channel).
        self._reply_channels: list[RawChannel] = []
        self._reply_slots = asyncio.Semaphore(REPLY_CHANNELS)
        self._exchanges: dict[str, AbstractExchange] = {}
        # Strong references: aio-pika restores channels and consumers after a reconnect only
        # while they are alive (aio-pika issues #231, #626).
        self._consumers: list[tuple[AbstractChannel, AbstractQueue, str]] = []
        # The broker node of the current connection, as direct reply-to tokens name it; learned
        # again after every reconnect, since the connection may then be on another node.
        self._reply_node: tuple[object, str | None] | None = None
        self._reply_node_lock = asyncio.Lock()
        # Replies to direct reply-to tokens of other nodes go out on a connection of their own
        # (see publish_reply), opened when first needed.
        self._elsewhere: tuple[AbstractConnection | None, AbstractChannel | None] = (None, None)
        self._elsewhere_lock = asyncio.Lock()
        self._elsewhere_opened = -ELSEWHERE_REOPEN_EVERY  # time.monotonic() of the last opening
        self._elsewhere_in_flight: collections.Counter[str] = collections.Counter()
        # Nodes whose tokens alone, in flight on it, cost that connection: not running.
        self._nodes_down: dict[str, float] = {}
        self._name = f"smtp-worker {socket.gethostname()}:{os.getpid()}"

    async def connect(self) -> None:
        try:
            connection = await connect_first(
                self.settings.node_urls(),
                timeout=STARTUP_CONNECT_TIMEOUT,
                client_properties={"connection_name": self._name},
            )
        except NoNodeAnswered as exc:
            raise BrokerUnavailable(str(exc)) from None
        self.connection = connection
        self._publisher = await connection.channel(publisher_confirms=True)
        await self._declare(self._publisher)
        connection.reconnect_callbacks.add(self._on_reconnected)

    async def _on_reconnected(self, connection: Any) -> None:
        """Back on a node (maybe another one): aio-pika has restored the channels, the
        exchanges and the consumers; the queues are declared again (none of them is restored by
        aio-pika, so that a classic queue whose node is down cannot hold the others back)."""
        try:
            await self._declare_queues()
        except Exception:
            log.warning("topology.redeclare_failed", exc_info=True)

    @property
    def _quorum(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.names.dead,
        }

    @property
    def _commands_arguments(self) -> dict[str, FieldValue]:
        return {"alternate-exchange": self.names.unrouted}

    def _arguments(self, short: str) -> dict[str, Any]:
        if short == "probes":
            # One worker at a time runs the probes, so their limit per owner holds for the
            # whole deployment; another takes over (with what was unacked) when it goes.
            return {**self._quorum, "x-single-active-consumer": True}
        return self._quorum

    async def _declare(self, channel: AbstractChannel) -> None:
        """The exchanges (on the publishing channel: restored with it after a reconnect), then
        the queues and their bindings."""
        names = self.names
        topic, fanout = aio_pika.ExchangeType.TOPIC, aio_pika.ExchangeType.FANOUT
        self._exchanges["events"] = await channel.declare_exchange(
            names.events, topic, durable=True
        )
        await channel.declare_exchange(names.dead, fanout, durable=True)
        await channel.declare_exchange(names.unrouted, fanout, durable=True)
        await self._upgrade_commands_exchange()
        self._exchanges["commands"] = await channel.declare_exchange(
            names.commands, topic, durable=True, arguments=self._commands_arguments
        )
        await self._declare_queues()

    def _queues(self) -> list[tuple[str, dict[str, Any] | None, str | None, str]]:
        """(queue, arguments, exchange to bind it to, binding key) of every queue; arguments
        None for P.dead: taken as it is found (see the module docstring)."""
        names = self.names
        queues: list[tuple[str, dict[str, Any] | None, str | None, str]] = [
            (names.dead, None, names.dead, ""),
            (names.unrouted, self._quorum, names.unrouted, ""),
        ]
        for short, pattern in COMMAND_QUEUES.items():
            queues.append((names.queue(short), self._quorum, names.commands, pattern))
        queues.append((names.deliveries, self._quorum, None, ""))
        queues.append((names.probes, self._arguments("probes"), None, ""))
        delays = [(d, "deliveries") for d in sorted({*self.settings.retry_delays, *PARK_DELAYS})]
        for delay, short in [*delays, *((d, "probes") for d in PARK_DELAYS)]:
            arguments = {
                "x-queue-type": "quorum",
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": names.queue(short),
                # Expired messages leave only once the queue they go back to has them.
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
            queues.append((names.delay(delay, short), arguments, None, ""))
        return queues

    async def _declare_queues(self) -> None:
        """Every queue and its binding, each on a plain channel of its own, all at once: a queue
        the broker refuses closes only that channel. A classic queue whose node is down is
        refused with NOT_FOUND: logged as `topology.queue_unavailable`, and the others are
        declared."""
        declared = await asyncio.gather(
            *(self._declare_queue(*queue) for queue in self._queues()), return_exceptions=True
        )
        for outcome in declared:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _declare_queue(
        self, name: str, arguments: dict[str, Any] | None, exchange: str | None, key: str
    ) -> None:
        try:
            async with self._raw_channel() as channel:
                if arguments is None:
                    await self._declare_as_found(name)
                else:
                    await channel.queue_declare(name, durable=True, arguments=arguments)
                if exchange is not None:
                    await channel.queue_bind(name, exchange, routing_key=key)
        except ChannelNotFoundEntity as exc:
            log.warning("topology.queue_unavailable", queue=name, reason=str(exc)[:200])

    async def _declare_as_found(self, name: str) -> None:
        """`name` as it exists (whatever its type), else a classic durable queue."""
        try:
            async with self._raw_channel() as channel:
                await channel.queue_declare(name, passive=True)
            return
        except ChannelNotFoundEntity:
            pass
        async with self._raw_channel() as channel:
            await channel.queue_declare(name, durable=True)

    async def _upgrade_commands_exchange(self) -> None:
        """Gives a P.commands declared by an earlier release its alternate exchange.

        An exchange's arguments cannot change, and declaring it with others is refused
        (PRECONDITION_FAILED, which closes the channel): the old exchange is deleted and declared
        anew. Its bindings go with it; `_declare` binds the command queues again right after.
        """
        name, arguments = self.names.commands, self._commands_arguments
        try:
            async with self._raw_channel() as channel:
                await channel.exchange_declare(
                    name, exchange_type="topic", durable=True, arguments=arguments
                )
            return
        except ChannelPreconditionFailed:
            pass
        log.warning("topology.commands_exchange_upgraded", exchange=name)
        async with self._raw_channel() as channel:
            await channel.exchange_delete(name)
            await channel.exchange_declare(
                name, exchange_type="topic", durable=True, arguments=arguments
            )

    @contextlib.asynccontextmanager
    async def _raw_channel(
        self, *, confirms: bool = False, transport: Any = None
    ) -> AsyncIterator[RawChannel]:
        """A plain channel of the current connection (or of `transport`'s, not waiting for
        another), for one-off work that the broker may refuse by closing it: unlike a robust
        channel, nothing tries to restore it."""
        assert self.connection is not None
        if transport is None:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self.connection.connected.wait()
            transport = self.connection.transport
        if transport is None:
            raise ConnectionError("the broker connection is down")
        channel = await transport.connection.channel(publisher_confirms=confirms)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def consume(
        self,
        short: str,
        callback: Callable[[AbstractIncomingMessage], Awaitable[None]],
        prefetch: int,
    ) -> None:
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        arguments = self._arguments(short)
        queue = await channel.declare_queue(
            self.names.queue(short), durable=True, arguments=arguments
        )
        tag = await queue.consume(callback)
        self._consumers.append((channel, queue, tag))

    async def stop_consuming(self) -> None:
        """Cancels every consumer: no new deliveries; what is in flight goes on."""
        for _channel, queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except _publish_errors():
                pass  # the channel is gone: the broker returns its messages anyway

    # --- publishing -----------------------------------------------------------------------------

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        type_: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publishes a persistent message and waits for the broker's confirm; a nack, sent again
        after each of NACK_RETRY_DELAYS on the same channel. BrokerUnavailable once that channel
        or the connection is lost, or past the last of them."""
        assert self._publisher is not None
        self._require_connection()
        properties = json_properties(
            message_id=message_id, correlation_id=correlation_id, type_=type_, headers=headers
        )
        target = "" if exchange == "" else self._exchanges[exchange].name
        raw: RawChannel | None = None
        for delay in (*NACK_RETRY_DELAYS, None):
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    if raw is None:
                        raw = await _ready(self._publisher)
                    elif raw.is_closed:
                        # A nacked publish goes out again on its channel or not at all: once
                        # that channel's connection is gone, the broker has given the message
                        # being processed back, and its next delivery publishes this again;
                        # publishing it on a channel restored since would send its reply twice.
                        raise ChannelInvalidStateError("the channel of a nacked publish closed")
                    # A nack raises DeliveryError.
                    await raw.basic_publish(
                        body, exchange=target, routing_key=routing_key, properties=properties
                    )
                return
            except DeliveryError as exc:
                if delay is None:
                    raise BrokerUnavailable(f"publish to {exchange or 'default'} nacked") from exc
                log.warning("publish.nacked", exchange=exchange or "default", retry_in=delay)
            except _publish_errors() as exc:
                raise BrokerUnavailable(f"publish to {exchange or 'default'} failed") from exc
            await asyncio.sleep(delay)

    async def publish_event(self, routing_key: str, body: bytes) -> None:
        await self.publish("events", routing_key, body)

    async def publish_delivery(self, body: bytes, *, delay: float | None = None) -> None:
        queue = self.names.deliveries if delay is None else self.names.delay(delay)
        await self.publish("", queue, body)

    async def publish_reply(
        self,
        reply_to: str,
        body: bytes,
        *,
        correlation_id: str | None,
        type_: str | None,
        status: str,
    ) -> None:
        """Publishes a reply and waits for the broker's confirm.

        A reply the broker refuses, by a nack or by closing the channel over it, is that reply's
        own problem: it is dropped, with a `reply.dropped` log line, and the command stands. So is
        a reply to a queue that no longer exists (the broker drops it). BrokerUnavailable only
        when the connection is down.
        """
        properties = self.reply_properties(correlation_id, type_, {"status": status})
        # A token of another node than the one of the current connection (which may have moved
        # since the command was accepted) goes out apart: see worker.reply_to.
        node = reply_names.token_node(reply_to)
        if node is not None and node != await self.reply_node():
            await self._reply_elsewhere(reply_to, node, body, properties)
            return
        self._require_connection()
        channel: RawChannel | None = None
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT), self._reply_channel() as channel:
                await channel.basic_publish(body, routing_key=reply_to, properties=properties)
        except DeliveryError:
            log.warning("reply.dropped", reason="nack")
        except (AMQPChannelError, ChannelInvalidStateError) as exc:
            # The broker closed the channel over this reply, alone on it. Unless the connection
            # went with it: then the command is requeued instead (its redelivery publishes the
            # stored reply once the broker is back).
            if channel is None or channel.connection.is_closed:
                raise BrokerUnavailable("the broker connection is down") from exc
            log.warning("reply.dropped", reason=type(exc).__name__)
        except _publish_errors() as exc:
            raise BrokerUnavailable("publish of a reply failed") from exc

    @contextlib.asynccontextmanager
    async def _reply_channel(self) -> AsyncIterator[RawChannel]:
        """A confirming channel of the current connection for one reply, no other in flight on it.

        The broker refuses a reply by closing its channel; aiormq answers with close-ok at once,
        but a publish already waiting for that channel's lock, or for room in the connection's
        write queue, still goes out after it, on a channel the broker no longer knows, and the
        broker closes the whole connection over that frame (504 CHANNEL_ERROR). One reply at a
        time on a channel, nothing follows the reply the broker refuses. The channel is kept for
        the next reply unless something but a nack went wrong on it."""
        async with self._reply_slots:
            assert self.connection is not None
            await self.connection.connected.wait()
            transport = self.connection.transport
            if transport is None:
                raise ConnectionError("the broker connection is down")
            connection, channel = transport.connection, None
            while self._reply_channels and channel is None:
                idle = self._reply_channels.pop()
                if not idle.is_closed and idle.connection is connection:
                    channel = idle
            if channel is None:
                channel = await connection.channel(publisher_confirms=True)
            kept = False
            try:
                yield channel
                kept = True
            except DeliveryError:
                kept = True
                raise
            finally:
                if kept and not channel.is_closed:
                    self._reply_channels.append(channel)
                elif not channel.is_closed:
                    await channel.close()

    async def _reply_elsewhere(
        self, reply_to: str, node: str, body: bytes, properties: spec.Basic.Properties
    ) -> None:
        """Publishes a reply to a direct reply-to token of another node on a connection kept for
        such replies. The broker routes it while that node runs; otherwise it closes the whole
        connection (worker.reply_to): then this reply, and any other such reply in flight with
        it, is dropped with a `reply.dropped` line, and a later one opens a new connection.

        What a flood of tokens naming nodes that do not run may cost is bounded: a node whose
        tokens alone were in flight when the connection closed is taken for down for
        NODE_DOWN_FOR, its replies dropped at once; and the connection is opened again at most
        every ELSEWHERE_REOPEN_EVERY, a reply that would need it sooner being dropped."""
        now = time.monotonic()
        if self._nodes_down.get(node, 0.0) > now:
            log.warning("reply.dropped", reason="token of a node that is not running")
            return
        self._elsewhere_in_flight[node] += 1
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                channel = await (await self._elsewhere_channel()).get_underlay_channel()
                await channel.basic_publish(body, routing_key=reply_to, properties=properties)
        except _ElsewhereCooling:
            log.warning("reply.dropped", reason="token of another node, connection cooling down")
        except _publish_errors() as exc:
            if set(self._elsewhere_in_flight) == {node}:
                self._node_down(node, now)
            log.warning("reply.dropped", reason="token of another node", error=type(exc).__name__)
        finally:
            self._elsewhere_in_flight[node] -= 1
            if not self._elsewhere_in_flight[node]:
                del self._elsewhere_in_flight[node]

    def _node_down(self, node: str, now: float) -> None:
        if len(self._nodes_down) >= NODES_DOWN_KEPT:
            self._nodes_down = {n: t for n, t in self._nodes_down.items() if t > now}
            if len(self._nodes_down) >= NODES_DOWN_KEPT:
                self._nodes_down.pop(next(iter(self._nodes_down)))
        self._nodes_down[node] = now + NODE_DOWN_FOR

    async def _elsewhere_channel(self) -> AbstractChannel:
        async with self._elsewhere_lock:
            connection, channel = self._elsewhere
            if channel is None or channel.is_closed or connection is None or connection.is_closed:
                if time.monotonic() - self._elsewhere_opened < ELSEWHERE_REOPEN_EVERY:
                    raise _ElsewhereCooling
                self._elsewhere_opened = time.monotonic()
                if connection is not None and not connection.is_closed:
                    await connection.close()
                assert isinstance(self.connection, ClusterConnection)
                # The node the worker is on: it answers, or the worker is reconnecting anyway.
                connection = await open_first(
                    [str(self.connection.url)],
                    client_properties={"connection_name": f"{self._name} replies"},
                )
                channel = await connection.channel(publisher_confirms=True)
                self._elsewhere = (connection, channel)
                log.info("broker.replies_connection_opened")
            return channel

    def _require_connection(self) -> None:
        """Fails fast while the connection is down: the consumer requeues the message (or its
        ack is lost with the connection, and the broker gives it back), rather than holding it
        until a reconnect that may come on another node."""
        connection = self.connection
        if connection is None or not connection.connected.is_set():
            raise BrokerUnavailable("the broker connection is down")

    @staticmethod
    def reply_properties(
        correlation_id: str | None, type_: str | None, headers: dict[str, Any]
    ) -> spec.Basic.Properties:
        return json_properties(correlation_id=correlation_id, type_=type_, headers=headers)

    # --- reply_to -------------------------------------------------------------------------------

    async def reply_to_refusal(self, reply_to: str) -> str | None:
        """Why a command may not name `reply_to` (see worker.reply_to); None when it may."""
        return reply_names.refusal(reply_to, self.names.prefix)

    async def reply_node(self) -> str | None:
        """The broker node of the current connection as direct reply-to tokens name it.

        Learned from the broker itself: a token it makes for a channel of ours. None when the
        broker forms its tokens in a way worker.reply_to does not know: tokens are then refused.
        """
        assert self.connection is not None
        async with self._reply_node_lock:
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await self.connection.connected.wait()
                transport = self.connection.transport
                if self._reply_node is None or self._reply_node[0] is not transport:
                    self._reply_node = (transport, await self._learn_reply_node(transport))
            except _publish_errors() as exc:
                raise BrokerUnavailable("the broker node is unknown") from exc
            return self._reply_node[1]

    async def _learn_reply_node(self, transport: Any) -> str | None:
        async with self._raw_channel(transport=transport) as channel:
            # A publish naming `amq.rabbitmq.reply-to` needs a consumer of it on its channel.
            await channel.basic_consume(reply_names.DIRECT_REPLY_TO, _ignore, no_ack=True)
            probe = (await channel.queue_declare(exclusive=True, auto_delete=True)).queue or ""
            try:
                await channel.basic_publish(
                    b"",
                    routing_key=probe,
                    properties=spec.Basic.Properties(reply_to=reply_names.DIRECT_REPLY_TO),
                )
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    got = await channel.basic_get(probe, no_ack=True)
                    while not isinstance(got.delivery, spec.Basic.GetOk):
                        await asyncio.sleep(0.01)
                        got = await channel.basic_get(probe, no_ack=True)
            finally:
                await channel.queue_delete(probe)
        token = got.header.properties.reply_to or ""
        node = reply_names.token_node(token)
        if node is None:
            log.warning("broker.direct_reply_to_unknown", token_length=len(token))
        return node

    async def consuming(self) -> int | None:
        """How many consumers are registered on open channels; None while the connection or the
        publishing channel is down (a reconnect reopens channels and consumers one by one)."""
        connection = self.connection
        if (
            connection is None
            or connection.is_closed
            or not connection.connected.is_set()
            or self._publisher is None
            or self._publisher.is_closed
        ):
            return None
        registered = 0
        for channel, _queue, tag in self._consumers:
            if not channel.is_closed:
                underlay = await channel.get_underlay_channel()
                registered += isinstance(underlay, aiormq.Channel) and tag in underlay.consumers
        return registered

    async def publish_probe(self, body: bytes, *, delay: float | None = None) -> None:
        queue = self.names.probes if delay is None else self.names.delay(delay, "probes")
        await self.publish("", queue, body)

    async def close(self) -> None:
        elsewhere, _ = self._elsewhere
        if elsewhere is not None and not elsewhere.is_closed:
            await elsewhere.close()
        if self.connection is not None:
            await self.connection.close()
        self._consumers.clear()


def json_message(
    body: bytes,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    type_: str | None = None,
    headers: dict[str, Any] | None = None,
    reply_to: str | None = None,
) -> aio_pika.Message:
    """A persistent `application/json` message, as the worker and its client publish them."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=correlation_id,
        type=type_,
        headers=headers,
        reply_to=reply_to,
    )


def json_properties(
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
    type_: str | None = None,
    headers: dict[str, Any] | None = None,
) -> spec.Basic.Properties:
    """The properties of `json_message`, built straight (aio-pika's Message costs ten times
    more, per publish)."""
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=0,
        message_id=message_id,
        correlation_id=correlation_id,
        message_type=type_,
        headers=headers or {},
    )


async def _ready(channel: AbstractRobustChannel) -> RawChannel:
    """`channel`'s AMQP channel, once aio-pika has it open. After a reconnect aio-pika restores
    channels one by one, in no fixed order: the consumers' may be back before this one. Waiting
    for it rather than failing spares a delivery attempt of the message being processed."""
    await channel.ready()
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    return await channel.get_underlay_channel()


async def _ignore(message: Any) -> None:
    """Consumer of the reply-node probe's pseudo-queue: nothing is ever sent to it."""
