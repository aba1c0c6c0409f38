"""The jobs the worker queues for itself: emails to send (P.deliveries), relay probes (P.probes).

Their shape is internal and may change between releases; a reader accepts the older shapes that
may still sit in a queue when a new release starts (a delivery job that names only its email).
Neither ever holds a secret: a job says what to do, and its consumer reads the rest from the store.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    # How many times the job has been parked: put back for later because its relay or its owner
    # had no free turn. It chooses how long the next park lasts.
    parked: int = Field(default=0, ge=0)

    def dump(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def load(cls, body: bytes) -> Self:
        """The job in `body`; pydantic.ValidationError when it is not one."""
        return cls.model_validate_json(body)

    def parked_again(self) -> Self:
        return self.model_copy(update={"parked": self.parked + 1})


class DeliveryJob(_Job):
    """Send one email. Its owner and domain let the consumer see whose relay it needs before it
    touches the store; jobs queued by older releases carry the email's id only."""

    email_id: str
    owner_id: str | None = None
    domain: str | None = None


class ProbeJob(_Job):
    """Run the slow part of a command that was authenticated and checked, and answer it.

    Everything the reply needs travels with the job; the relay password does not: the probe
    consumer reads and decrypts the settings when the probe runs.
    """

    type: str
    owner_id: str
    user: str | None = None  # the SMTP user who sent the command; None for the owner's token
    data: dict[str, Any]
    message_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
