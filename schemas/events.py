"""A typed model per domain event of `P.events` (contract section 8), and its `data` payload.

from schemas.events import parse_event, TicketCreatedEvent
event = parse_event(raw_bytes)            # the model of its `type`, or a plain `Event`
if isinstance(event, TicketCreatedEvent):
    event.data.sid, event.data.severity

Each model says exactly what the worker publishes: the tests validate the events of a real run
against them, strictly, and compare what they dump with what was received.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from schemas.envelope import ErrorBody, Event
from schemas.settings import Channel, EmailSettings, SmtpUser, UserStatus
from schemas.tickets import Severity

# --- payloads -----------------------------------------------------------------------------------


class TicketCreatedData(BaseModel):
    sid: str
    channel: str
    title: str
    severity: Severity


class TicketClosedData(BaseModel):
    sid: str
    comment: str | None


class TicketStatusData(BaseModel):
    """`ticket.acked` and `ticket.unacked`."""

    sid: str


class HitCreatedData(BaseModel):
    sid: str
    seq: int
    summary: str


class EmailSentData(BaseModel):
    """An email the relay accepted; `seq` is null for a ticket's own email, set for a hit's."""

    sid: str
    seq: int | None
    recipients: list[str]
    message_id: str
    attempts: int


class EmailFailedData(BaseModel):
    """An email that will not be sent: refused for good, or still failing after every retry."""

    sid: str
    seq: int | None
    error: str
    permanent: bool
    attempts: int


class DomainData(BaseModel):
    """`email_settings.deleted`."""

    domain: str


class SmtpUserCreatedData(BaseModel):
    """`smtp_user.created`: the user as `settings.smtp_user.add` answers, but its password."""

    smtp_user_name: str
    status: UserStatus
    total_limit: int
    hourly_limit: int


class SmtpUserNameData(BaseModel):
    """`smtp_user.password_reset` and `smtp_user.deleted`."""

    smtp_user_name: str


class ChannelNameData(BaseModel):
    """`channel.deleted`."""

    name: str


class CommandFailedData(BaseModel):
    """A command refused by the rules: its type, its `message_id` and the error it was answered."""

    type: str
    command_id: str | None
    error: ErrorBody


# --- events -------------------------------------------------------------------------------------


class TicketCreatedEvent(Event[TicketCreatedData]):
    type: Literal["ticket.created"]
    owner_id: str


class TicketClosedEvent(Event[TicketClosedData]):
    type: Literal["ticket.closed"]
    owner_id: str


class TicketAckedEvent(Event[TicketStatusData]):
    type: Literal["ticket.acked"]
    owner_id: str


class TicketUnackedEvent(Event[TicketStatusData]):
    type: Literal["ticket.unacked"]
    owner_id: str


class HitCreatedEvent(Event[HitCreatedData]):
    type: Literal["hit.created"]
    owner_id: str


class EmailSentEvent(Event[EmailSentData]):
    type: Literal["email.sent"]
    owner_id: str


class EmailFailedEvent(Event[EmailFailedData]):
    type: Literal["email.failed"]
    owner_id: str


class EmailSettingsCreatedEvent(Event[EmailSettings]):
    type: Literal["email_settings.created"]
    owner_id: str


class EmailSettingsUpdatedEvent(Event[EmailSettings]):
    type: Literal["email_settings.updated"]
    owner_id: str


class EmailSettingsDeletedEvent(Event[DomainData]):
    type: Literal["email_settings.deleted"]
    owner_id: str


class SmtpUserCreatedEvent(Event[SmtpUserCreatedData]):
    type: Literal["smtp_user.created"]
    owner_id: str


class SmtpUserUpdatedEvent(Event[SmtpUser]):
    type: Literal["smtp_user.updated"]
    owner_id: str


class SmtpUserPasswordResetEvent(Event[SmtpUserNameData]):
    type: Literal["smtp_user.password_reset"]
    owner_id: str


class SmtpUserDeletedEvent(Event[SmtpUserNameData]):
    type: Literal["smtp_user.deleted"]
    owner_id: str


class ChannelUpdatedEvent(Event[Channel]):
    type: Literal["channel.updated"]
    owner_id: str


class ChannelDeletedEvent(Event[ChannelNameData]):
    type: Literal["channel.deleted"]
    owner_id: str


class CommandFailedEvent(Event[CommandFailedData]):
    """`owner_id` is null when the command's credentials were wrong: nobody is known to own it."""

    type: Literal["command.failed"]
    owner_id: str | None


EVENTS: dict[str, type[Event[Any]]] = {
    "ticket.created": TicketCreatedEvent,
    "ticket.closed": TicketClosedEvent,
    "ticket.acked": TicketAckedEvent,
    "ticket.unacked": TicketUnackedEvent,
    "hit.created": HitCreatedEvent,
    "email.sent": EmailSentEvent,
    "email.failed": EmailFailedEvent,
    "email_settings.created": EmailSettingsCreatedEvent,
    "email_settings.updated": EmailSettingsUpdatedEvent,
    "email_settings.deleted": EmailSettingsDeletedEvent,
    "smtp_user.created": SmtpUserCreatedEvent,
    "smtp_user.updated": SmtpUserUpdatedEvent,
    "smtp_user.password_reset": SmtpUserPasswordResetEvent,
    "smtp_user.deleted": SmtpUserDeletedEvent,
    "channel.updated": ChannelUpdatedEvent,
    "channel.deleted": ChannelDeletedEvent,
    "command.failed": CommandFailedEvent,
}
"""Every event type of the contract and its model."""

# Built from the table above, so a type checker sees it as Any; at run time it is the union.
AnyEvent: Any = Annotated[
    Union[tuple(EVENTS.values())],  # noqa: UP007
    Field(discriminator="type"),
]

event_adapter: TypeAdapter[Event[Any]] = TypeAdapter(AnyEvent)
_generic: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(raw: bytes | str, *, lenient: bool = True) -> Event[Any]:
    """The event in `raw`, as the model of its `type`.

    An event of a type this version does not know, or that does not match its model (a worker
    of another version), comes back as a plain `Event` when `lenient`, so a subscriber keeps
    going; otherwise it raises pydantic's ValidationError. JSON that is no event at all always
    raises.
    """
    try:
        return event_adapter.validate_json(raw)
    except ValidationError:
        if not lenient:
            raise
    return _generic.validate_json(raw)
