"""A bare HTTP/1.1 client for the worker's endpoints: the request bytes are the test's to choose."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(port: int, raw: bytes, timeout: float = 10) -> Answer:
    """Sends `raw` to 127.0.0.1:`port` and reads the answer to the end of the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


async def get(port: int, path: str, method: str = "GET") -> Answer:
    return await request(port, f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    """`/metrics` as {(sample name, sorted labels): value}."""
    answer = await get(port, "/metrics")
    assert 200 == answer.status, answer
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
