"""smtp-worker's wire contract as pydantic models: importable with pydantic alone."""

from schemas.commands import COMMAND_MODELS, COMMANDS, Command, CommandBody, command_adapter
from schemas.envelope import (
    ErrorBody,
    ErrorDetail,
    ErrorReply,
    Event,
    OwnerAuth,
    SuccessReply,
    UserAuth,
)
from schemas.events import EVENTS, AnyEvent, event_adapter, parse_event
from schemas.replies import REPLY_MODELS, Reply, parse_reply, reply_adapter

__all__ = [
    "COMMANDS",
    "COMMAND_MODELS",
    "EVENTS",
    "REPLY_MODELS",
    "AnyEvent",
    "Command",
    "CommandBody",
    "ErrorBody",
    "ErrorDetail",
    "ErrorReply",
    "Event",
    "OwnerAuth",
    "Reply",
    "SuccessReply",
    "UserAuth",
    "command_adapter",
    "event_adapter",
    "parse_event",
    "parse_reply",
    "reply_adapter",
]
