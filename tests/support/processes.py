"""`smtp-worker run` in a process of its own: started, read, measured and stopped.

Its output goes to a log file (a pipe nobody reads would fill up and block it). The fault
scenarios and the two-worker tests read its JSON log lines; the benchmarks read its memory and
CPU time from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support.commandline import SMTP_WORKER
from tests.support.polling import wait_until

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Generous: the machine may be busy with other test runs.
START_TIMEOUT = 60.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process `pid` has used, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class WorkerProcess:
    """One `smtp-worker run` with `environment` (see `commandline.environment`), logging to
    `log_path`."""

    def __init__(
        self,
        environment: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        queues: Sequence[str] = (),
    ) -> None:
        self.environment = environment
        self.log_path = log_path
        self.cwd = cwd
        self.queues = tuple(queues)  # `--queues`: every queue when empty
        self.process: subprocess.Popen[bytes] | None = None
        self.terminated = False  # SIGTERM sent: a second one could land after its handler is gone
        # label ("start", "10%", …, "end", "drained") -> (VmRSS, VmHWM) in KiB
        self.memory: dict[str, tuple[int, int]] = {}

    def spawn(self) -> WorkerProcess:
        """Starts the process, without waiting for anything."""
        with self.log_path.open("ab") as log:
            queues = ["--queues", ",".join(self.queues)] if self.queues else []
            self.process = subprocess.Popen(
                [SMTP_WORKER, "run", *queues],
                env=self.environment,
                cwd=self.cwd,
                stdout=log,
                stderr=log,
            )
        return self

    async def start(self, timeout: float = START_TIMEOUT) -> WorkerProcess:
        """Starts the process and waits until it has started (see `wait_started`)."""
        return await self.spawn().wait_started(timeout)

    async def wait_started(self, timeout: float = START_TIMEOUT) -> WorkerProcess:
        """Waits until the process logs `worker.started`; it failing to start fails the test
        with its last log lines."""
        process = self.process
        assert process is not None
        started = await wait_until(
            lambda: self.count("worker.started") >= 1 or process.poll() is not None, timeout
        )
        assert started and process.poll() is None, f"worker did not start:\n{self.tail()}"
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- its log ----------------------------------------------------------------------------

    def text_lines(self) -> list[str]:
        """Its log as written, line by line."""
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def lines(self) -> list[dict[str, Any]]:
        """Its log lines, parsed; a line that is not JSON as {"event": "non-json", "line": …}."""
        parsed = []
        for raw in self.text_lines():
            try:
                parsed.append(json.loads(raw))
            except ValueError:
                parsed.append({"event": "non-json", "line": raw})
        return parsed

    def lines_of(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]

    def count(self, event: str, **fields: Any) -> int:
        return len(self.lines_of(event, **fields))

    def outcomes(self, event: str = "command.processed") -> Counter[str]:
        return Counter(line.get("outcome") for line in self.lines() if line.get("event") == event)

    def processings(self, message_ids: Iterable[str]) -> Counter[str]:
        """How many times the worker processed each of `message_ids` (any outcome)."""
        wanted = set(message_ids)
        return Counter(
            line["message_id"]
            for line in self.lines()
            if line.get("event") == "command.processed" and line.get("message_id") in wanted
        )

    def tail(self, count: int = 30) -> str:
        return "\n".join(self.text_lines()[-count:])

    # --- its resources ----------------------------------------------------------------------

    def read_memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB, from /proc/<pid>/status."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
        return values["VmRSS"], values["VmHWM"]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    # --- stopping it ------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL: no cleanup, no acks, connections dropped by the kernel."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    async def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; returns the exit code (None if still running after `timeout`) and seconds."""
        process = self.process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        self.terminated = True
        await wait_until(lambda: process.poll() is not None, timeout, step=0.05)
        return process.poll(), time.monotonic() - started

    def signal_stop(self) -> None:
        """SIGTERM, once, unless it has exited."""
        if self.process is not None and not self.terminated and self.process.poll() is None:
            self.process.terminate()
            self.terminated = True

    async def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM unless it has exited, then its exit code; None when it had to be killed
        after `timeout` seconds."""
        process = self.process
        if process is None:
            return None
        self.signal_stop()
        try:
            return await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            return None


async def stop_workers(workers: Sequence[WorkerProcess], timeout: float = 60) -> list[int | None]:
    """SIGTERM to every worker still running, then their exit codes (None: killed after
    `timeout` seconds)."""
    for worker in workers:
        worker.signal_stop()
    return [await worker.stop(timeout) for worker in workers]
