"""Fixtures of the fault-injection scenarios, built on tests/support (rig.py, cluster.py).

Scenarios that stop or kill a broker do it to private nodes (tests/support/cluster.py): a
three-node cluster started once per session (`rabbit_cluster`, `cluster_rig`), or one node of
a test's own (`private_broker`). No test stops, restarts or reconfigures the shared broker.

The figures every scenario records (`tests.support.rig.figure`) are repeated in a
"fault-injection figures" section of the terminal summary, so CI logs show them (tests/conftest.py).
The scenarios run one after another in one test process (`xdist_group("faults")`): each loads
the machine, and two at once would measure each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.cluster import PrivateNodes, private_nodes
from tests.support.rig import Rig, build_rig


@pytest.fixture
async def rig(amqp_url: str, postgres_admin_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    async with build_rig(amqp_url, postgres_admin_url, tmp_path) as world:
        yield world


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNodes]:
    """Three private RabbitMQ nodes in one cluster, for the whole session (~30 s to start)."""
    with private_nodes(tmp_path_factory.mktemp("rabbit-cluster"), 3) as nodes:
        yield nodes


@pytest.fixture
async def cluster_rig(
    rabbit_cluster: PrivateNodes, postgres_admin_url: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    """A rig on the private cluster: workers list the nodes first to last, the load client last
    to first (so it starts on another node than a worker started first)."""
    await asyncio.to_thread(rabbit_cluster.ensure_running)
    urls = rabbit_cluster.urls
    async with build_rig(
        ",".join(urls), postgres_admin_url, tmp_path, load_url=",".join(reversed(urls))
    ) as world:
        yield world


@pytest.fixture
async def private_broker(tmp_path: Path) -> AsyncIterator[PrivateNodes]:
    """One private RabbitMQ node of the test's own (~10 s to start)."""
    with private_nodes(tmp_path / "rabbit", 1) as nodes:
        yield nodes
