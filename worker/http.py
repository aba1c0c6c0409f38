"""The worker's HTTP endpoints (contract 9), served from the worker's own event loop.

    GET /metrics   the Prometheus text format
    GET /healthz   200 {"alive": true} while the process runs
    GET /readyz    200 {"ready": true, "down": []}, else 503 {"ready": false, "down": ["broker"]}

Three GET endpoints need no web framework: this is a small HTTP/1.1 server that answers one
request per connection and then closes it. What a client can cost is bounded: the request head
must arrive within REQUEST_TIMEOUT and fit in MAX_REQUEST_BYTES (a body is never read), and at
most MAX_CONNECTIONS are served at once, so a slow or oversized client cannot hold the probes up
for long.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from worker.health import Readiness
from worker.metrics import Metrics

log = structlog.get_logger("worker.http")

VARIABLE = "SMTP_WORKER_HTTP"
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 32
_JSON = "application/json"
_CHUNK = 65536


class HttpAddressError(Exception):
    """SMTP_WORKER_HTTP is not a `host:port` the worker can listen on."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _JSON

    @classmethod
    def json(cls, status: int, value: object) -> Response:
        return cls(status, json.dumps(value).encode())


Route = Callable[[], Awaitable[Response]]


def parse_address(value: str) -> tuple[str | None, int]:
    """`host:port` (`[::1]:9464` for IPv6; an empty host listens on every interface)."""
    host, colon, port = value.strip().rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise HttpAddressError(f"{VARIABLE}={value!r} is not host:port, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or None, int(port)


def endpoints(metrics: Metrics, readiness: Readiness) -> dict[str, Route]:
    async def metrics_text() -> Response:
        return Response(200, await metrics.exposition(), CONTENT_TYPE_LATEST)

    async def healthz() -> Response:
        return Response.json(200, {"alive": True})

    async def readyz() -> Response:
        down = await readiness.down()
        return Response.json(503 if down else 200, {"ready": not down, "down": down})

    return {"/metrics": metrics_text, "/healthz": healthz, "/readyz": readyz}


class HttpServer:
    def __init__(self, address: str, routes: Mapping[str, Route]) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise HttpAddressError(
                f"{VARIABLE}={self.address}: cannot listen there ({reason}); set {VARIABLE} "
                "to a free host:port, or to nothing to serve no HTTP"
            ) from exc
        # Port 0 asks the system for a free port: say which one it gave.
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http.listening", host=self.host or "*", port=self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for client in list(self._clients):
            client.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._clients.add(task)
        try:
            answer = await self._respond(reader)
            if answer is not None:
                await self._send(reader, writer, *answer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or would not take the answer: nothing to tell it
        finally:
            self._clients.discard(task)
            # After a clean close this does nothing; otherwise it drops what is left unsent.
            writer.transport.abort()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response, and whether its body is left out (HEAD); None to hang up at once."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE), False
        except (asyncio.IncompleteReadError, TimeoutError):
            return None  # gone, or too slow: hang up without a word
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
            return _error(HTTPStatus.BAD_REQUEST), False
        method, target, _version = request_line
        if method not in (b"GET", b"HEAD"):
            return _error(HTTPStatus.METHOD_NOT_ALLOWED), False
        head_only = method == b"HEAD"
        route = self.routes.get(target.split(b"?", 1)[0].decode("latin-1"))
        if route is None:
            return _error(HTTPStatus.NOT_FOUND), head_only
        try:
            return await route(), head_only
        except Exception:
            log.exception("http.route_failed")
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR), head_only

    @staticmethod
    async def _send(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: Response,
        head_only: bool,
    ) -> None:
        phrase = HTTPStatus(response.status).phrase
        head = (
            f"HTTP/1.1 {response.status} {phrase}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        writer.write(head if head_only else head + response.body)
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await writer.drain()
            writer.write_eof()
            # Closing a socket with unread input resets the connection, and a reset may discard
            # the answer before the client reads it: read what it still sends until it closes.
            while await reader.read(_CHUNK):
                pass
            writer.close()
            await writer.wait_closed()


def _error(status: HTTPStatus) -> Response:
    return Response.json(status.value, {"error": status.phrase})
