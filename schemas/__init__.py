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

__all__ = [
    "COMMANDS",
    "COMMAND_MODELS",
    "Command",
    "CommandBody",
    "ErrorBody",
    "ErrorDetail",
    "ErrorReply",
    "Event",
    "OwnerAuth",
    "SuccessReply",
    "UserAuth",
    "command_adapter",
]
