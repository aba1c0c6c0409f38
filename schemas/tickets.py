"""Ticket and hit commands (contract section 7)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas._types import BodyText, Count, Title
from schemas.settings import ChannelName

Severity = Literal["low", "medium", "high", "critical"]
TicketStatus = Literal["unacknowledged", "acknowledged", "closed"]
Sid = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Body = Annotated[str, StringConstraints(max_length=65536), BodyText]
Summary = Annotated[str, StringConstraints(min_length=1, max_length=1000), BodyText]
Comment = Annotated[str, StringConstraints(max_length=1000), BodyText]
DedupKey = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Sids = Annotated[list[Sid], Field(min_length=1, max_length=1000)]


class _Data(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class NewTicket(_Data):
    title: Title
    body: Body
    severity: Severity = "medium"
    dedup_key: DedupKey | None = None


class TicketNew(_Data):
    channel: ChannelName
    ticket: NewTicket


class TicketRef(_Data):
    sid: Sid


class TicketRefs(_Data):
    sids: Sids


class TicketClose(_Data):
    sid: Sid
    comment: Comment | None = None


class TicketCloseMany(_Data):
    sids: Sids
    comment: Comment | None = None


class NewHit(_Data):
    summary: Summary
    body: Body | None = None


class HitNew(_Data):
    sid: Sid
    hit: NewHit


class HitList(_Data):
    sid: Sid
    after_seq: Count = 0
    limit: int = Field(default=100, ge=1, le=1000)


class Delivery(BaseModel):
    status: Literal["pending", "sent", "failed"]
    attempts: int
    last_error: str | None


class Ticket(BaseModel):
    sid: str
    channel: str
    title: str
    body: str
    severity: Severity
    dedup_key: str | None
    status: TicketStatus
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None
    comment: str | None
    hit_count: int
    last_hit_at: datetime | None
    created_by: str
    delivery: Delivery


class TicketCreated(BaseModel):
    sid: str
    created: bool


class TicketOne(BaseModel):
    ticket: Ticket


class TicketMany(BaseModel):
    tickets: list[Ticket]


class Done(BaseModel):
    pass


class HitCreated(BaseModel):
    seq: int


class Hit(BaseModel):
    seq: int
    summary: str
    body: str | None
    created_at: datetime


class HitPage(BaseModel):
    hits: list[Hit]
    next_after_seq: int | None
