"""Running `smtp-worker` as a user does: a subprocess configured by SMTP_WORKER_* variables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.logs import PROCESS_LINES, SECRETS
from worker.config import Settings

SMTP_WORKER = str(Path(sys.executable).with_name("smtp-worker"))


def settings_variables(settings: Settings) -> dict[str, str]:
    """The variables (as `environment` takes them) of a test's settings: its broker, store,
    prefix, secret key, retry delays and relay allow list."""
    assert settings.secret_key is not None
    return {
        "amqp_url": settings.amqp_url,
        "database_url": settings.database_url,
        "prefix": settings.prefix,
        "secret_key": settings.secret_key.get_secret_value(),
        "retry_delays": ",".join(str(delay) for delay in settings.retry_delays),
        "relay_allow": ",".join(str(network) for network in settings.relay_allow),
    }


def environment(**variables: str) -> dict[str, str]:
    """This process's environment with these SMTP_WORKER_* variables, and no others of the kind."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_WORKER_")}
    # Several workers run at once in the tests: none serves HTTP unless a test asks for it.
    variables = {"http": ""} | {name.lower(): value for name, value in variables.items()}
    return environ | {f"SMTP_WORKER_{name.upper()}": value for name, value in variables.items()}


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def spawn(*args: str, cwd: Path, **variables: str) -> asyncio.subprocess.Process:
    """Starts `smtp-worker ARGS`, its stdout and stderr piped to the test."""
    return await asyncio.create_subprocess_exec(
        SMTP_WORKER,
        *args,
        cwd=cwd,
        env=environment(**variables),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def smtp_worker(*args: str, cwd: Path, timeout: float = 30, **variables: str) -> Ran:
    """Runs `smtp-worker ARGS` to its end, leaving the event loop free (a worker may run on it)."""
    process = await spawn(*args, cwd=cwd, **variables)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    PROCESS_LINES.extend(stderr.decode().splitlines())  # searched for secrets at the end of the run
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def create_owner(name: str, cwd: Path, **variables: str) -> dict[str, str]:
    """A new owner, made by `smtp-worker owner create` as an operator does; its token is a
    secret of the run."""
    ran = await smtp_worker("owner", "create", "--name", name, cwd=cwd, timeout=60, **variables)
    assert 0 == ran.code, ran.stderr
    owner: dict[str, str] = ran.json()
    SECRETS.add(owner["token"])
    return owner
