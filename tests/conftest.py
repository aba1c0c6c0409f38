"""Fixtures only: real RabbitMQ, real PostgreSQL and SQLite, workers in-process, a broker client.

Services come from environment variables when given (`.ci/run` sets them):
    SMTP_WORKER_TEST_AMQP_URL       amqp://guest:guest@127.0.0.1:5672/
    SMTP_WORKER_TEST_POSTGRES_URL   postgresql+asyncpg://postgres@127.0.0.1:5432/postgres
Otherwise testcontainers starts them when a Docker engine answers, and the tests that need them
are skipped when none does. Every test gets its own exchange prefix; every session its own
databases. Every secret the tests see is collected, and at the end of the run the captured logs
and every event received are searched for them (tests/support/logs.py). What the fixtures are
made of is in tests/support.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest

from tests.support.databases import create_database, drop_database
from tests.support.environment import Env, running_env
from tests.support.logs import capture_worker_logs, leaked_secrets
from tests.support.rig import FIGURES
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import World, configure

# --- test processes (pytest-xdist) and the fault figures ---------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The fault scenarios load the machine: one process runs them all, one after another.
    for item in items:
        if item.get_closest_marker("faults") is not None:
            item.add_marker(pytest.mark.xdist_group("faults"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    # In a test process of pytest-xdist: its figures go to the controller with its results.
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["figures"] = list(FIGURES)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    FIGURES.extend(getattr(node, "workeroutput", {}).get("figures", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# --- services ---------------------------------------------------------------------------------


def _docker_answers() -> bool:
    try:
        import docker  # noqa: PLC0415

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


def _service(
    variable: str, name: str, container: Callable[[], AbstractContextManager[str]]
) -> Iterator[str]:
    """The URL in `variable` when set, else that of a `container` started for the session."""
    url = os.environ.get(variable)
    if url:
        yield url
        return
    if not _docker_answers():
        pytest.skip(f"no {name}: set {variable} or run a Docker engine")
    with container() as url:
        yield url


@contextmanager
def _rabbitmq_container() -> Iterator[str]:
    from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415

    with RabbitMqContainer("rabbitmq:3.13") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@contextmanager
def _postgres_container() -> Iterator[str]:
    from testcontainers.postgres import PostgresContainer  # noqa: PLC0415

    with PostgresContainer("postgres:16", driver="asyncpg") as container:
        yield container.get_connection_url()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    yield from _service("SMTP_WORKER_TEST_AMQP_URL", "RabbitMQ", _rabbitmq_container)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    yield from _service("SMTP_WORKER_TEST_POSTGRES_URL", "PostgreSQL", _postgres_container)


@pytest.fixture(scope="session")
async def postgres_url(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url)
    yield url
    await drop_database(postgres_admin_url, url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('store') / 'smtp-worker.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The store a test runs on: each test that uses it runs once on each."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


# --- logs and secrets ---------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def captured_logs() -> Iterator[None]:
    """The worker's real log pipeline (redaction included), captured; no secret may reach it."""
    capture_worker_logs()
    yield
    leaked = leaked_secrets()
    assert not leaked, f"{len(leaked)} secrets reached a log line or an event"


# --- the worker, its client, and a configured owner ---------------------------------------------


@pytest.fixture
async def env(amqp_url: str, database_url: str) -> AsyncIterator[Env]:
    """A started worker on its own prefix, over the parametrized store."""
    async with running_env(amqp_url, database_url) as world:
        yield world


@pytest.fixture
def domain() -> str:
    return unique_domain()


@pytest.fixture
async def owner(env: Env) -> dict[str, str]:
    """A new owner, without settings."""
    return await env.new_owner()


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    """A plain SMTP server (no TLS, no login) that accepts every email."""
    async with SmtpServer() as server:
        yield server


@pytest.fixture
async def world(env: Env, smtp: SmtpServer) -> World:
    """An owner whose domain is relayed to `smtp`, with channel "ops" and an SMTP user."""
    return await configure(env, smtp)
