"""Events and the other effects of a message: what is published once its transaction commits.

Handlers add effects to their Context, the store keeps them with a command's idempotency record
(a redelivery publishes them again), and the consumers publish them; none of these imports
another for them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic_core import to_json

EffectKind = Literal["event", "delivery", "probe"]


@dataclass(frozen=True, slots=True)
class Effect:
    """Something to publish after commit: an event, an email job for the delivery queue, or a
    probe job for the probe queue."""

    kind: EffectKind
    routing_key: str
    body: bytes

    def dump(self) -> dict[str, str]:
        return {"kind": self.kind, "routing_key": self.routing_key, "body": self.body.decode()}

    @classmethod
    def load(cls, raw: dict[str, str]) -> Effect:
        kind: Any = raw["kind"]
        return cls(kind, raw["routing_key"], raw["body"].encode())


def event_body(type_: str, owner_id: str | None, now: datetime, data: Any) -> bytes:
    return to_json(
        {"type": type_, "id": uuid.uuid4().hex, "time": now, "owner_id": owner_id, "data": data},
        by_alias=True,
    )


def event(type_: str, owner_id: str | None, now: datetime, data: Any) -> Effect:
    """The event `type_` as an effect."""
    return Effect("event", type_, event_body(type_, owner_id, now, data))


def command_failed(
    type_: str, command_id: str | None, owner_id: str | None, now: datetime, error: dict[str, Any]
) -> Effect:
    """`command.failed`: a command refused by the rules; `error` is its reply's `error`."""
    failed = {"type": type_, "command_id": command_id, "error": error}
    return event("command.failed", owner_id, now, failed)
