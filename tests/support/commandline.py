"""Running `smtp-worker` as a user does: a subprocess configured by SMTP_WORKER_* variables."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import LOG_LINES

SMTP_WORKER = str(Path(sys.executable).with_name("smtp-worker"))


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
    LOG_LINES.extend(stderr.decode().splitlines())  # searched for secrets at the end of the run
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())
