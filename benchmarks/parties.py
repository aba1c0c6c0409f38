"""What the benchmark and the soak run share: the services, and how their workers are set up.

Each worker is `smtp-worker run` (tests.support.processes.WorkerProcess), consuming every queue,
deliveries included; an owner is created with `smtp-worker owner create`, as an operator does.
Worker processes, readiness, owners, tenants and the broker's clean-up are the tests' own
(tests/support): the benchmarks import the tests' support, never the other way round.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.support.commandline import environment, smtp_worker
from tests.support.processes import WorkerProcess

AMQP_URL = os.environ.get("SMTP_WORKER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "SMTP_WORKER_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def worker_variables(prefix: str, database_url: str, secret_key: str) -> dict[str, str]:
    """The settings of a worker at `prefix` on `database_url` (as `environment` takes them):
    relays on 127.0.0.1 allowed, warnings and errors logged, no HTTP endpoints."""
    return {
        "amqp_url": AMQP_URL,
        "database_url": database_url,
        "secret_key": secret_key,
        "prefix": prefix,
        "log_level": "WARNING",
        "relay_allow": "127.0.0.0/8",
    }


def start_workers(
    variables: dict[str, str], logs: Path, count: int, queues: Sequence[str] = ()
) -> list[WorkerProcess]:
    """`count` workers with these settings, consuming `queues` (every queue when empty), logging
    to `logs`/PREFIX-N.log; not waited for."""
    prefix = variables["prefix"]
    name = "-".join(queues) if len(queues) == 1 else ""
    return [
        WorkerProcess(
            environment(**variables), logs / f"{prefix}-{name or n}.log", logs, queues
        ).spawn()
        for n in range(count)
    ]


async def worker_command(variables: dict[str, str], cwd: Path, *args: str) -> str:
    """Runs `smtp-worker ARGS` to completion; its standard output."""
    ran = await smtp_worker(*args, cwd=cwd, timeout=60, **variables)
    if ran.code != 0:
        raise RuntimeError(f"smtp-worker {' '.join(args)} exited with {ran.code}: {ran.stderr}")
    return ran.stdout
