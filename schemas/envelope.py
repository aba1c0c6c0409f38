"""The envelope of every message: command bodies, replies, error bodies, events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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


class SuccessReply(BaseModel):
    status: Literal["success"] = "success"
    type: str | None
    command_id: str | None
    data: dict[str, Any]


class ErrorReply(BaseModel):
    status: Literal["error"] = "error"
    type: str | None
    command_id: str | None
    error: ErrorBody


class Event(BaseModel):
    """A domain event on `P.events`, routing key = `type`."""

    type: str
    id: str
    time: datetime
    owner_id: str | None
    data: dict[str, Any]
