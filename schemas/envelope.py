"""The envelope of every message: command bodies, replies, error bodies, events.

`SuccessReply` and `Event` are generic in their `data`: unparametrized, `data` is a JSON object;
`SuccessReply[TicketCreated]` or an event of `schemas.events` types it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeVar

# A default keeps `SuccessReply` and `Event` usable unparametrized, as they were before they
# became generic. typing_extensions is a dependency of pydantic itself.
DataT = TypeVar("DataT", default=dict[str, Any])


class OwnerAuth(BaseModel):
    """`auth` of settings commands: an owner and its token."""

    model_config = ConfigDict(strict=True, frozen=True)

    owner_id: str = Field(min_length=1, max_length=64)
    token: str = Field(min_length=1, max_length=256, repr=False)


class UserAuth(BaseModel):
    """`auth` of ticket and hit commands: an SMTP user's login and password."""

    model_config = ConfigDict(strict=True, frozen=True)

    login: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256, repr=False)


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    """Why a command was refused: `name` says what kind of refusal (contract section 4)."""

    name: Literal[
        "ValidationError",
        "AuthenticationError",
        "Forbidden",
        "NotFound",
        "Conflict",
        "QuotaExceeded",
        "GeneralError",
    ]
    message: str
    details: Any = None


class SuccessReply(BaseModel, Generic[DataT]):
    """The reply to a command that succeeded; `command_id` is its `message_id`."""

    status: Literal["success"] = "success"
    type: str | None
    command_id: str | None
    data: DataT


class ErrorReply(BaseModel):
    """The reply to a command that was refused or could not be read; it changed nothing."""

    status: Literal["error"] = "error"
    type: str | None
    command_id: str | None
    error: ErrorBody


class Event(BaseModel, Generic[DataT]):
    """A domain event on `P.events`, routing key = `type`."""

    type: str
    id: str
    time: datetime
    owner_id: str | None
    data: DataT
