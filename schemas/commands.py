"""Every command of the contract, and the command body as one union discriminated by `type`.

from schemas import command_adapter
command = command_adapter.validate_json(raw_bytes)
command.type, command.auth, command.data
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from schemas import settings as s
from schemas import tickets as t
from schemas.envelope import OwnerAuth, UserAuth

# type -> (auth, data, data of the success reply)
COMMANDS: dict[str, tuple[type[BaseModel], type[BaseModel], type[BaseModel]]] = {
    "settings.email.create": (OwnerAuth, s.EmailSettingsCreate, s.EmailSettings),
    "settings.email.get": (OwnerAuth, s.DomainRef, s.EmailSettings),
    "settings.email.update": (OwnerAuth, s.EmailSettingsUpdate, s.EmailSettings),
    "settings.email.delete": (OwnerAuth, s.DomainRef, s.Removed),
    "settings.email.test": (OwnerAuth, s.DomainRef, s.EmailTestResult),
    "settings.smtp_user.add": (OwnerAuth, s.SmtpUserAdd, s.SmtpUserCreated),
    "settings.smtp_user.edit": (OwnerAuth, s.SmtpUserEdit, s.SmtpUser),
    "settings.smtp_user.reset_password": (OwnerAuth, s.SmtpUserRef, s.SmtpUserPassword),
    "settings.smtp_user.list": (OwnerAuth, s.Empty, s.SmtpUserList),
    "settings.smtp_user.delete": (OwnerAuth, s.SmtpUserRef, s.Removed),
    "settings.channel.put": (OwnerAuth, s.ChannelPut, s.Channel),
    "settings.channel.get": (OwnerAuth, s.ChannelRef, s.Channel),
    "settings.channel.list": (OwnerAuth, s.Empty, s.ChannelList),
    "settings.channel.delete": (OwnerAuth, s.ChannelRef, s.Removed),
    "ticket.new": (UserAuth, t.TicketNew, t.TicketCreated),
    "ticket.get": (UserAuth, t.TicketRef, t.TicketOne),
    "ticket.get_many": (UserAuth, t.TicketRefs, t.TicketMany),
    "ticket.close": (UserAuth, t.TicketClose, t.Done),
    "ticket.close_many": (UserAuth, t.TicketCloseMany, t.Done),
    "ticket.ack": (UserAuth, t.TicketRef, t.Done),
    "ticket.ack_many": (UserAuth, t.TicketRefs, t.Done),
    "ticket.unack": (UserAuth, t.TicketRef, t.Done),
    "ticket.unack_many": (UserAuth, t.TicketRefs, t.Done),
    "hit.new": (UserAuth, t.HitNew, t.HitCreated),
    "hit.list": (UserAuth, t.HitList, t.HitPage),
}


class CommandBody(BaseModel):
    """Fields every command body has; the models below narrow `type`, `auth` and `data`."""

    model_config = ConfigDict(frozen=True)

    type: str
    auth: Any
    data: Any


def model_name(type_: str, suffix: str) -> str:
    """`settings.smtp_user.add`, `Command` -> `SettingsSmtpUserAddCommand`."""
    return "".join(part.title() for part in type_.replace("_", ".").split(".")) + suffix


def _model(type_: str, auth: type[BaseModel], data: type[BaseModel]) -> type[CommandBody]:
    name = model_name(type_, "Command")
    # Commands whose data has no required field may leave `data` out.
    empty = all(not field.is_required() for field in data.model_fields.values())
    tag: Any = Literal[type_]
    return create_model(
        name,
        __base__=CommandBody,
        type=(tag, ...),
        auth=(auth, ...),
        data=(data, data() if empty else ...),
    )


COMMAND_MODELS: dict[str, type[CommandBody]] = {
    type_: _model(type_, auth, data) for type_, (auth, data, _) in COMMANDS.items()
}

# Built from the table above, so a type checker sees it as Any; at run time it is the union.
Command: Any = Annotated[
    Union[tuple(COMMAND_MODELS.values())],  # noqa: UP007
    Field(discriminator="type"),
]

command_adapter: TypeAdapter[CommandBody] = TypeAdapter(Command)
