"""Every secret the tests see, every log line and event they capture, and the search of one in
the other at the end of the run.

The worker's log pipeline runs as configured (redaction and JSON rendering included); only its
output goes to a `structlog.testing.CapturingLogger` instead of stderr. Lines that other processes
logged (`smtp-worker` commands, worker processes) are added to `PROCESS_LINES`.
"""

from __future__ import annotations

import secrets
from typing import Any

import structlog
from structlog.testing import CapturingLoggerFactory

from worker import logs

SECRET_KEY = "test-secret-key-" + secrets.token_hex(8)
SECRETS: set[str] = {SECRET_KEY}
PROCESS_LINES: list[str] = []
EVENT_BODIES: list[bytes] = []
CAPTURED = CapturingLoggerFactory()


def capture_worker_logs() -> None:
    """The worker's real log pipeline, at DEBUG, rendered into `CAPTURED`."""
    logs.configure("DEBUG", "json")
    structlog.configure(logger_factory=CAPTURED, cache_logger_on_first_use=False)


def log_lines(start: int = 0) -> list[str]:
    """The lines the worker logged in this process, from the `start`-th on, as rendered."""
    return [str(call.args[0]) for call in CAPTURED.logger.calls[start:]]


def remember_secrets(value: Any) -> None:
    """Collects every secret-looking value of a request or reply, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in {"token", "password", "smtp_password", "pass"} and isinstance(item, str):
                if item != "********":
                    SECRETS.add(item)
            else:
                remember_secrets(item)
    elif isinstance(value, list):
        for item in value:
            remember_secrets(item)


def leaked_secrets() -> list[str]:
    """The secrets seen that reached a captured log line or an event received."""
    lines = [*log_lines(), *PROCESS_LINES]
    return sorted(
        {s for s in SECRETS if any(s in line for line in lines)}
        | {s for s in SECRETS if any(s.encode() in body for body in EVENT_BODIES)}
    )
