"""A typed reply per command: a `SuccessReply` with the command's reply data, or an `ErrorReply`.

from schemas.replies import parse_reply
reply = parse_reply("ticket.new", raw_bytes)
if reply.status == "success":
    reply.data.sid          # reply is a TicketNewSuccess, a SuccessReply[TicketCreated]
else:
    reply.error.name
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, Union, cast

from pydantic import Field, TypeAdapter, ValidationError, create_model

from schemas.commands import COMMANDS, model_name
from schemas.envelope import ErrorReply, SuccessReply

Reply = SuccessReply[Any] | ErrorReply


def _success(type_: str, data: Any) -> type[SuccessReply[Any]]:
    tag: Any = Literal[type_]
    base: Any = SuccessReply[data]
    return cast(
        "type[SuccessReply[Any]]",
        create_model(model_name(type_, "Success"), __base__=base, type=(tag, ...)),
    )


REPLY_MODELS: dict[str, type[SuccessReply[Any]]] = {
    type_: _success(type_, data) for type_, (_, _, data) in COMMANDS.items()
}
"""The success reply of every command type, e.g. `TicketNewSuccess` for `ticket.new`."""

_any_reply: TypeAdapter[Reply] = TypeAdapter(
    Annotated[Union[SuccessReply, ErrorReply], Field(discriminator="status")]  # noqa: UP007
)


@cache
def reply_adapter(type_: str) -> TypeAdapter[Reply]:
    """Validates the reply to a command of `type_`, discriminated by `status`."""
    success = REPLY_MODELS.get(type_)
    if success is None:
        return _any_reply
    union: Any = Annotated[Union[success, ErrorReply], Field(discriminator="status")]  # noqa: UP007
    return TypeAdapter(union)


def parse_reply(type_: str, raw: bytes | str, *, lenient: bool = True) -> Reply:
    """The reply in `raw` to a command of `type_`, its success typed by the command.

    A success reply that does not match the command's model (a worker of another version) comes
    back as a plain `SuccessReply` when `lenient`; otherwise it raises pydantic's
    ValidationError. JSON that is no reply at all always raises.
    """
    try:
        return reply_adapter(type_).validate_json(raw)
    except ValidationError:
        if not lenient:
            raise
    return _any_reply.validate_json(raw)
