"""An SMTP sink in its own process: accepts every email and counts them.

    python -m benchmarks.sink

Listens on two free ports of 127.0.0.1 and prints them on its first line, `SMTP_PORT
CONTROL_PORT`. Whoever connects to CONTROL_PORT reads one line, `COUNT LAST`: the emails accepted
so far, and the wall-clock time (`time.time()`) the last one was accepted at. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import time

from aiosmtpd.smtp import SMTP, Envelope, Session


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0

    # aiosmtpd's hook names are fixed.
    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.count += 1
        self.last = time.time()
        return "250 OK"

    async def report(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{self.count} {self.last}\n".encode())
        await writer.drain()
        writer.close()


async def read_sink(control_port: int) -> tuple[int, float]:
    """(emails accepted, wall-clock time of the last) from the sink at `control_port`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", control_port)
    count, last = (await reader.readline()).split()
    writer.close()
    await writer.wait_closed()
    return int(count), float(last)


async def main() -> None:
    sink = Sink()
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(lambda: SMTP(sink, hostname="sink"), "127.0.0.1", 0)
    control = await asyncio.start_server(sink.report, "127.0.0.1", 0)
    ports = [server.sockets[0].getsockname()[1] for server in (smtp, control)]
    print(*ports, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    smtp.close()
    control.close()


if __name__ == "__main__":
    asyncio.run(main())
