"""A TCP proxy the fault tests put between the worker and a service, to cut and restore.

    proxy = Proxy(port_of_rabbitmq).start()     # listens on 127.0.0.1:proxy.port
    ... point the worker at proxy.port ...
    proxy.cut()                 # every connection reset; new ones refused (nothing listens)
    proxy.cut(blackhole=True)   # every connection reset; new ones accepted and never answered
    proxy.mute()                # requests still reach the service; its answers are dropped
    proxy.restore()             # forwards again
    proxy.close()

It runs its own event loop in a thread, as aiosmtpd's Controller does: forwarding never waits
for the test's loop, and `cut` and `restore` are plain calls that return once they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Self

__all__ = ["Proxy"]

_CHUNK = 65536


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.target = (target_host, target_port)
        self.accepted = 0
        self.cuts = 0
        self.state = "closed"  # "open", "muted", "refusing", "blackholed", "closed"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._held: set[asyncio.StreamWriter] = set()

    # --- called from the test ---------------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._listen())
        self.state = "open"
        return self

    def cut(self, *, blackhole: bool = False) -> None:
        """Resets every connection; new ones are refused, or held silent with `blackhole`."""
        self._call(self._cut(blackhole))

    def mute(self) -> None:
        """Connections stay up and what clients send is delivered, but no answer comes back:
        a request whose answer the network lost (a COMMIT done, and never confirmed)."""
        self._call(self._mute())

    def restore(self) -> None:
        """Forwards new connections again; held (blackholed) ones are reset."""
        self._call(self._restore())

    def close(self) -> None:
        if self.state == "closed":
            return
        self._call(self._cut(blackhole=False))
        self.state = "closed"
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    # --- in the proxy's loop ----------------------------------------------------------------

    async def _listen(self) -> None:
        # The same port again after a cut: the worker's configuration names it.
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, blackhole: bool) -> None:
        self.cuts += 1
        if blackhole:
            self.state = "blackholed"
            if self._server is None:
                await self._listen()
        else:
            self.state = "refusing"
            if self._server is not None:
                self._server.close()
                self._server = None
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        self._reset_held()

    async def _mute(self) -> None:
        self.state = "muted"

    async def _restore(self) -> None:
        self._reset_held()
        if self._server is None:
            await self._listen()
        self.state = "open"

    def _reset_held(self) -> None:
        for writer in self._held:
            writer.transport.abort()
        self._held.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.state == "blackholed":
            self._held.add(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            pipes = [
                asyncio.ensure_future(_pipe(reader, upstream, lambda: False)),
                asyncio.ensure_future(_pipe(up_reader, writer, lambda: self.state == "muted")),
            ]
            try:
                await asyncio.gather(*pipes)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(task)
            # abort(), not close(): a cut is a reset, with nothing flushed.
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, muted: Callable[[], bool]
) -> None:
    while data := await reader.read(_CHUNK):
        if muted():
            continue
        writer.write(data)
        await writer.drain()
    # One side finished: half-close the other so it sees the end of the stream too.
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
