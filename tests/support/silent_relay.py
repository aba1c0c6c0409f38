"""A relay that accepts TCP connections and never says a word, counting how many it holds.

    async with SilentRelay() as relay:
        ... options {"host": "127.0.0.1", "port": relay.port, "timeout": 2} ...
        assert relay.peak <= 4

It runs on the test's event loop. A client that gives up (its timeout) closes its connection,
and the server learns of it a moment later; `peak` counts the connections still open
`SETTLE` seconds after each was accepted, so that a connection closed just as the next one
arrived is not counted as concurrent with it, while any real overlap (a client waits its whole
timeout) is.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

SETTLE = 0.2


class SilentRelay:
    def __init__(self) -> None:
        self.accepted = 0
        self.peak = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def open(self) -> int:
        return len(self._open)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._open.add(writer)
        counting = asyncio.ensure_future(self._count_after_settling())
        try:
            with contextlib.suppress(ConnectionError):
                while await reader.read(4096):  # whatever the client says, until it hangs up
                    pass
        finally:
            self._open.discard(writer)
            counting.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _count_after_settling(self) -> None:
        await asyncio.sleep(SETTLE)
        self.peak = max(self.peak, len(self._open))
