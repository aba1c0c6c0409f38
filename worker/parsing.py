"""Reading a command body, at a cost bounded by its size, whatever it holds.

    body --small, valid---------------------------------------------> CommandBody   (fast path)
         --otherwise: its type and auth only--> Envelope
                      --the consumer authenticates, then complete()--> CommandBody
                                                                  or ValidationError (<= 20)

`data` is read in full only once its sender is authenticated, so a body with wrong credentials
costs no more than its size to refuse. And no error list grows with the body: pydantic reports
one error per unknown field (a 1 MB `data` of 100,000 unknown fields makes as many, 7 MB of
reply), so `complete` validates with unknown fields ignored, and a walk that stops at
MAX_DETAILS finds them. Whatever is parsed here is dropped before the consumer next awaits.
"""

from __future__ import annotations

import itertools
import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel, TypeAdapter, create_model

from schemas import COMMAND_MODELS, COMMANDS, CommandBody, OwnerAuth, UserAuth, command_adapter
from worker.errors import UnreadableMessage, ValidationError

MAX_DETAILS = 20
# A valid body up to this size is read at once; a larger one, or any invalid one, goes through
# its envelope first, so that a wide body pays for its `data` only with valid credentials.
FAST_PATH_BYTES = 64 * 1024
_MAX_SHORTSTR = 255
_UNREADABLE_TYPES = frozenset({"json_invalid", "json_type", "dict_type", "model_type"})
_EXTRA_MSG = "Extra inputs are not permitted"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A body of a known type whose `data` is still to be read; `auth` None when unusable."""

    type: str
    auth: OwnerAuth | UserAuth | None


def _envelope_model(type_: str, auth: type[BaseModel]) -> type[BaseModel]:
    tag: Any = Literal[type_]
    name = COMMAND_MODELS[type_].__name__.removesuffix("Command") + "Envelope"
    # `data` is no field: pydantic skips it without building Python objects for it.
    return create_model(name, type=(tag, ...), auth=(auth, ...))


_ENVELOPES: Any = Annotated[
    Union[tuple(_envelope_model(t, auth) for t, (auth, _, _) in COMMANDS.items())],  # noqa: UP007
    pydantic.Field(discriminator="type"),
]
_envelope_adapter: TypeAdapter[Any] = TypeAdapter(_ENVELOPES)


def read(body: bytes, routing_key: str | None, max_bytes: int) -> CommandBody | Envelope:
    """The command, or its envelope when its `data` must wait; UnreadableMessage if neither."""
    if len(body) > max_bytes:
        raise UnreadableMessage(
            f"the body is larger than {max_bytes} bytes", [{"loc": [], "msg": "too large"}]
        )
    if len(body) <= FAST_PATH_BYTES:
        try:
            command = command_adapter.validate_json(body)
        except pydantic.ValidationError:
            pass  # read below, without listing every error
        else:
            _check_route(command.type, routing_key)
            # In valid JSON, U+0000 can only be written as this escape.
            if b"\\u0000" not in body:
                return command
    envelope = _read_envelope(body)
    _check_route(envelope.type, routing_key)
    return envelope


def _read_envelope(body: bytes) -> Envelope:
    try:
        parsed = _envelope_adapter.validate_json(body)
    except pydantic.ValidationError as exc:
        # At most a few errors: only `type` and the two fields of `auth` are validated.
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        _raise_if_unreadable(errors[0])
        return Envelope(str(errors[0]["loc"][0]), None)
    auth = parsed.auth
    # PostgreSQL text cannot hold U+0000; no login or token holds it.
    if any("\x00" in value for value in auth.model_dump().values()):
        auth = None
    return Envelope(parsed.type, auth)


def _raise_if_unreadable(first: Any) -> None:
    """The first validation error of a body that cannot be read as a command at all."""
    if first["type"] in _UNREADABLE_TYPES and not first["loc"]:
        raise UnreadableMessage("the body is not a JSON object", [{"loc": [], "msg": first["msg"]}])
    if first["type"] == "union_tag_not_found":
        raise UnreadableMessage(
            "the body has no command type", [{"loc": ["type"], "msg": "Field required"}]
        )
    if first["type"] == "union_tag_invalid":
        raise UnreadableMessage(
            "unknown command type", [{"loc": ["type"], "msg": "unknown command type"}]
        )


def _check_route(type_: str, routing_key: str | None) -> None:
    # A command's type picks its handler, its routing key the queue and whoever consumes it: a
    # body of one type under another's key would run where nobody expects it.
    if routing_key != type_:
        raise UnreadableMessage(
            "the routing key is not the command's type",
            [{"loc": ["type"], "msg": "must equal the routing key"}],
        )


def complete(body: bytes, envelope: Envelope) -> CommandBody:
    """The command of an authenticated envelope, or ValidationError with <= MAX_DETAILS details."""
    model = COMMAND_MODELS[envelope.type]
    command: CommandBody | None = None
    errors: list[dict[str, Any]] = []
    try:
        command = model.model_validate_json(body, extra="ignore")
    except pydantic.ValidationError as exc:
        # Bounded without unknown fields: the longest lists of `data` hold 1000 items.
        errors = [
            {"loc": list(e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ][:MAX_DETAILS]
    if len(errors) < MAX_DETAILS:
        errors += _walk_errors(body, COMMANDS[envelope.type][1], MAX_DETAILS - len(errors))
    if command is not None and not errors:
        return command
    raise ValidationError("the command's data is invalid", errors)


def _walk_errors(body: bytes, model: type[BaseModel], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` errors pydantic leaves out: unknown fields, and strings holding U+0000.

    A function of its own, so that the parsed body is gone once it returns: it is not kept by
    the traceback of the ValidationError raised with its result.
    """
    data = json.loads(body).get("data")
    errors = list(itertools.islice(_unknown_fields(model, data, ("data",)), limit))
    if b"\\u0000" in body:
        errors += _nul_errors(data, ("data",))[: limit - len(errors)]
    return errors


def _unknown_fields(model: type[BaseModel], value: Any, loc: tuple[Any, ...]) -> Iterator[Any]:
    """An error, located and worded as pydantic's, for each unknown field, depth first."""
    if not isinstance(value, dict):
        return  # pydantic has said what is wrong with it
    config = model.model_config
    by_name = bool(config.get("validate_by_name") or config.get("populate_by_name"))
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.alias is not None:
            fields[info.alias] = info.annotation
        if info.alias is None or by_name:
            fields[name] = info.annotation
    for key, item in value.items():
        if key not in fields:
            if config.get("extra") == "forbid":
                yield {"loc": [*loc, key], "msg": _EXTRA_MSG}
            continue
        nested, many = _nested_model(fields[key])
        if nested is None:
            continue
        if many and isinstance(item, list):
            for index, element in enumerate(item):
                yield from _unknown_fields(nested, element, (*loc, key, index))
        elif not many:
            yield from _unknown_fields(nested, item, (*loc, key))


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field's annotation holds, and whether as the items of a list."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _nested_model(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _nested_model(arg)
            if found[0] is not None:
                return found
        return None, False
    if origin is list:
        nested, _ = _nested_model(get_args(annotation)[0])
        return nested, nested is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _nul_errors(value: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    """An error for every string holding U+0000.

    PostgreSQL text cannot hold that character (SQLite can): refusing it here, before any query
    sees it, answers the same on both stores instead of failing in the store on one.
    """
    found: list[dict[str, Any]] = []

    def walk(value: Any, loc: tuple[Any, ...]) -> None:
        if len(found) >= MAX_DETAILS:
            return
        if isinstance(value, str) and "\x00" in value:
            found.append({"loc": list(loc), "msg": "must not contain the NUL character"})
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*loc, index))

    walk(value, loc)
    return found


def guess_type(body: bytes) -> str | None:
    """The `type` of an unreadable body, as its reply can carry it back."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    type_ = value.get("type") if isinstance(value, dict) else None
    if not isinstance(type_, str):
        return None
    # The reply's `type` property is an AMQP short string, at most 255 bytes of UTF-8, and JSON
    # escapes may hold lone surrogates, which neither UTF-8 nor the reply's JSON encode.
    return type_.encode(errors="ignore")[:_MAX_SHORTSTR].decode(errors="ignore")
