"""Connections to the broker: one node, or the nodes of one cluster (contract section 1).

`SMTP_WORKER_AMQP_URL` may list several node URLs separated by commas:

    connect_first(urls)  the worker's connection: the first node that answers, tried in order
                         with backoff; when its node is lost it reconnects to the next node that
                         answers (round robin), and aio-pika then restores its channels, what
                         they declared and their consumers
    open_first(urls)     a one-off connection (the command line, the client): the first node
                         that answers, one round, no reconnecting

aio-pika's robust connection reconnects to its one URL only. `ClusterConnection` gives it a URL
per node and moves to the next one at every connection attempt after the first; after each
round in which no node answered, it waits longer (up to `MAX_PAUSE`). A node appears in logs
and errors as host:port only, never with its credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, UnderlayConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL

log = structlog.get_logger("worker.connection")

CONNECT_TIMEOUT = 10.0  # one attempt at one node
FIRST_PAUSE = 0.5  # between two attempts in the first round after a loss
MAX_PAUSE = 5.0


class NoNodeAnswered(ConnectionError):
    """No node of the list answered; the message says which were tried (host:port) and how
    each failed."""


def split_urls(amqp_url: str | Sequence[str]) -> list[str]:
    """The nodes of `amqp_url`: one URL, several separated by commas, or a list (one cluster)."""
    parts = amqp_url.split(",") if isinstance(amqp_url, str) else amqp_url
    urls = [url.strip() for url in parts if url.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


def where(url: str | URL) -> str:
    """A node as logs and errors may show it: host:port, no credentials."""
    parsed = URL(url) if isinstance(url, str) else url
    return f"{parsed.host}:{parsed.port}" if parsed.port else str(parsed.host)


class ClusterConnection(RobustConnection):
    """A robust connection over the nodes of one cluster; see the module docstring.

    The node is chosen where aio-pika starts each attempt: it sets `transport` to None, then
    connects to `url`. So `url` is the current node's, and clearing `transport` for an attempt
    (not for close()) moves to the next node, except for the very first attempt.
    """

    def __init__(self, urls: Sequence[str], *, first: int = 0, **kwargs: Any) -> None:
        self.nodes = [URL(url) for url in split_urls(urls)]
        self._node = first % len(self.nodes)
        self._attempts = 0  # since the last successful connection
        self._connected_once = False
        self._up = False  # connected now, as far as this connection knows
        self._transport: UnderlayConnection | None = None
        super().__init__(self.nodes[self._node], **kwargs)
        self.reconnect_interval = FIRST_PAUSE

    @property
    def url(self) -> URL:
        return self.nodes[self._node]

    @url.setter
    def url(self, value: URL) -> None:  # aio-pika's update_secret: the current node's URL
        self.nodes[self._node] = value

    @property
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # Connection.__init__ clears it too, before the connection's state exists.
        opened = hasattr(self, "_closed")
        attempt = value is None and opened and not self._close_called and not self.is_closed
        if attempt and (self._attempts or self._connected_once):
            self._node = (self._node + 1) % len(self.nodes)
        if attempt:
            self._attempts += 1
            rounds = (self._attempts - 1) // len(self.nodes)
            self.reconnect_interval = min(FIRST_PAUSE * 2**rounds, MAX_PAUSE)
        self._transport = value

    @property
    def node(self) -> str:
        """The node of this connection (or of its next attempt), as host:port."""
        return where(self.url)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        again = self._connected_once
        self._connected_once, self._up, self._attempts = True, True, 0
        self.reconnect_interval = FIRST_PAUSE
        log.info("broker.connected", node=self.node, reconnected=again)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._up and not self._close_called and not self.is_closed:
            log.warning("broker.connection_lost", node=self.node)
        self._up = False
        await super()._on_connection_close(closing)


async def connect_first(
    urls: str | Sequence[str],
    *,
    timeout: float,
    client_properties: dict[str, Any] | None = None,
) -> ClusterConnection:
    """The worker's connection: tries the nodes in order, round after round with backoff, for
    up to `timeout` seconds; NoNodeAnswered if none did."""
    nodes = split_urls(urls)
    failures: dict[str, str] = {}
    pause = FIRST_PAUSE
    try:
        async with asyncio.timeout(timeout):
            while True:
                for index, url in enumerate(nodes):
                    connection = ClusterConnection(
                        nodes, first=index, client_properties=client_properties
                    )
                    try:
                        await connection.connect(timeout=CONNECT_TIMEOUT)
                    except CONNECTION_EXCEPTIONS as exc:
                        failures[where(url)] = type(exc).__name__
                        log.warning(
                            "broker.node_unreachable", node=where(url), error=type(exc).__name__
                        )
                        await connection.close()
                        continue
                    except BaseException:  # out of time: no attempt may go on behind our back
                        await connection.close()
                        raise
                    return connection
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)
    except TimeoutError:
        raise _no_node(failures) from None


async def open_first(
    urls: str | Sequence[str],
    *,
    timeout: float = CONNECT_TIMEOUT,
    client_properties: dict[str, Any] | None = None,
) -> AbstractConnection:
    """A plain connection to the first node of `urls` that answers; NoNodeAnswered if none."""
    failures: dict[str, str] = {}
    for url in split_urls(urls):
        connection = aio_pika.Connection(URL(url), client_properties=client_properties)
        try:
            await connection.connect(timeout=timeout)
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            failures[where(url)] = type(exc).__name__
            # Closed now: left to its __del__, the close would be scheduled at any time.
            await connection.close()
            continue
        return connection
    raise _no_node(failures)


def _no_node(failures: dict[str, str]) -> NoNodeAnswered:
    tried = "; ".join(f"{node}: {error}" for node, error in failures.items())
    return NoNodeAnswered(f"no broker node answered ({tried or 'none tried'})")
