"""The worker's exceptions, and what each one means for a message.

    WorkerError
    ├── CommandError ............ refused by the rules: error reply, ack, `command.failed` event
    │   ├── ValidationError ..... `data` breaks the rules
    │   ├── AuthenticationError . `auth` missing or wrong
    │   ├── Forbidden ........... the SMTP user is disabled
    │   ├── NotFound ............ no such object for this owner
    │   ├── Conflict ............ the state forbids it
    │   └── QuotaExceeded ....... a sending limit would be passed
    ├── UnreadableMessage ....... not JSON, not an object, too large, unknown type:
    │                             error reply, reject without requeue (lands in `P.dead`)
    ├── TransientError .......... a passing fault: retried, then requeued
    │   ├── StoreUnavailable
    │   │   └── CommitUnknown ... the connection broke during COMMIT: done or not, unknown
    │   ├── ConcurrentWrite ..... a unique violation or serialization failure: retried at once
    │   ├── BrokerUnavailable
    │   └── SmtpTransientError .. 4xx, refused or dropped connection, timeout
    └── SmtpPermanentError ...... 5xx, rejected login: delivery ends

Anything else is unexpected: the message is requeued, and on its last delivery attempt the
sender gets a `GeneralError` reply and the message is dead-lettered.

Library errors (aio-pika, aiosmtplib, SQLAlchemy) are translated into this tree at the boundary,
with `raise ... from exc`, so that the consumer decides a message's fate from our types alone.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class CommandError(WorkerError):
    """A command refused by the rules. `name` is the error name of the contract."""

    name: ClassVar[str] = "GeneralError"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ValidationError(CommandError):
    name = "ValidationError"


class AuthenticationError(CommandError):
    name = "AuthenticationError"

    def __init__(self, message: str = "authentication failed") -> None:
        super().__init__(message)


class Forbidden(CommandError):
    name = "Forbidden"


class NotFound(CommandError):
    name = "NotFound"

    def __init__(self, kind: str, missing: list[str]) -> None:
        shown = ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        super().__init__(f"{kind} not found: {shown}", {"missing": missing})


class Conflict(CommandError):
    name = "Conflict"


class QuotaExceeded(CommandError):
    name = "QuotaExceeded"


class UnreadableMessage(WorkerError):
    """The body cannot be read as a command at all."""

    name: ClassVar[str] = "ValidationError"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details if details is not None else []


class TransientError(WorkerError):
    """A fault that may pass: the work is retried later."""


class StoreUnavailable(TransientError):
    pass


class CommitUnknown(StoreUnavailable):
    """The store became unavailable while committing: the transaction may have been committed."""


class ConcurrentWrite(TransientError):
    """Another transaction wrote first; running the command again sees its result."""


class BrokerUnavailable(TransientError):
    pass


class SmtpTransientError(TransientError):
    pass


class SmtpPermanentError(WorkerError):
    pass


GENERAL_ERROR_MESSAGE = "the command could not be processed; try again later"
