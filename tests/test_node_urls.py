"""SMTP_WORKER_AMQP_URL listing a cluster's nodes (contract section 1), and what is said of them.

The fault scenarios (tests/faults/test_cluster.py) lose nodes of a real cluster; here: the list
is read in order, the first node that answers is the one used, and no password reaches an
error or a log line.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import pydantic
import pytest
from structlog.testing import capture_logs

from worker.config import Settings
from worker.connection import NoNodeAnswered, connect_first, open_first

PASSWORD = "pw-" + "x7Kq9"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_the_nodes_are_read_in_order() -> None:
    settings = Settings(amqp_url=" amqp://a:b@n1:5672/ ,amqp://a:b@n2:5673/,, amqps://n3/ ")

    assert settings.node_urls() == ["amqp://a:b@n1:5672/", "amqp://a:b@n2:5673/", "amqps://n3/"]


@pytest.mark.parametrize(
    "value",
    [f"amqp://u:{PASSWORD}@n1/,http://u:{PASSWORD}@n2/", f"{PASSWORD}", f"amqp://u:{PASSWORD}@"],
)
def test_a_wrong_url_is_refused_without_repeating_it(value: str) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        Settings(amqp_url=value)

    assert PASSWORD not in str(raised.value)
    assert "is not an amqp:// or amqps:// URL" in str(raised.value)


async def test_the_first_node_that_answers_is_used_and_the_others_named_without_secrets(
    amqp_url: str,
) -> None:
    dead = f"amqp://guest:{PASSWORD}@127.0.0.1:{closed_port()}/"
    parts = urlsplit(amqp_url)

    with capture_logs() as logs:
        connection = await connect_first([dead, amqp_url], timeout=30)
    try:
        assert connection.node == f"{parts.hostname}:{parts.port or 5672}"
        assert connection.connected.is_set()
    finally:
        await connection.close()

    events = [entry["event"] for entry in logs]
    assert events == ["broker.node_unreachable", "broker.connected"]
    assert PASSWORD not in repr(logs)


async def test_no_node_answering_is_an_error_naming_each_node_by_host_and_port() -> None:
    ports = [closed_port(), closed_port()]
    urls = ",".join(f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/" for port in ports)

    with pytest.raises(NoNodeAnswered) as raised:
        await open_first(urls)
    with pytest.raises(NoNodeAnswered) as again:
        await connect_first(urls, timeout=1.5)

    for error in (raised.value, again.value):
        assert all(f"127.0.0.1:{port}: " in str(error) for port in ports)
        assert PASSWORD not in str(error)
