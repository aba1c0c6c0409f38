"""The machine-readable contract, generated from the `schemas` models and the broker's topology.

    schemas/asyncapi.yaml               AsyncAPI 3.0: channels, operations, messages, schemas
    schemas/json/commands/<type>.json   JSON Schema of a command body
    schemas/json/replies/<type>.json    ... of its reply (success or error)
    schemas/json/events/<type>.json     ... of an event

`smtp-worker asyncapi` prints the document; `smtp-worker asyncapi --write` (`make contract`)
rewrites every file. The output depends on the models alone: keys of every map are sorted, so
the committed files change only when the contract does, and the tests compare them with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema
from pydantic_core import core_schema

import schemas
from schemas import COMMAND_MODELS, COMMANDS, EVENTS, REPLY_MODELS, ErrorReply, OwnerAuth
from schemas.replies import reply_adapter
from worker.broker import COMMAND_QUEUES, DELIVERY_LIMIT, Names

ASYNCAPI = "asyncapi.yaml"
JSON_DIR = "json"
# The contract's revision (the title of CONTRACT.md's page): the API version of the document.
REVISION = "2"
DIRECTORY = Path(schemas.__file__).resolve().parent
"""Where the generated files live: next to the models they come from."""

P = Names("{prefix}")
AMQP = "0.3.0"  # the version of AsyncAPI's AMQP bindings used below
COMPONENT = "#/components/schemas/{model}"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

COMMAND_SUMMARIES = {
    "settings.email.create": "Configure a domain's relay and sender (one per domain).",
    "settings.email.get": "Read a domain's email settings.",
    "settings.email.update": "Change a domain's email settings; options merge key by key.",
    "settings.email.delete": "Remove a domain's email settings no channel uses.",
    "settings.email.test": "Probe a domain's relay: connect, TLS, login, sender; sends no mail.",
    "settings.smtp_user.add": "Create an SMTP user; its password is shown only in this reply.",
    "settings.smtp_user.edit": "Change an SMTP user's limits or status.",
    "settings.smtp_user.reset_password": "Give an SMTP user a new password; the old one stops.",
    "settings.smtp_user.list": "List the owner's SMTP users.",
    "settings.smtp_user.delete": "Delete an SMTP user.",
    "settings.channel.put": "Create or replace a channel: a domain and its recipients.",
    "settings.channel.get": "Read a channel.",
    "settings.channel.list": "List the owner's channels.",
    "settings.channel.delete": "Delete a channel.",
    "ticket.new": "Open a ticket and email it, or add a hit to the open ticket of its dedup_key.",
    "ticket.get": "Read a ticket.",
    "ticket.get_many": "Read up to 1000 tickets, in the order asked.",
    "ticket.close": "Close a ticket; closing a closed ticket is not an error.",
    "ticket.close_many": "Close several tickets.",
    "ticket.ack": "Acknowledge a ticket: its later hits send no email.",
    "ticket.ack_many": "Acknowledge several tickets.",
    "ticket.unack": "Take a ticket's acknowledgement back.",
    "ticket.unack_many": "Take several tickets' acknowledgement back.",
    "hit.new": "Append a hit to an open ticket and email it, threaded under the ticket.",
    "hit.list": "Page through a ticket's hits, oldest first.",
}
EVENT_SUMMARIES = {
    "ticket.created": "A ticket was opened.",
    "ticket.closed": "A ticket was closed.",
    "ticket.acked": "A ticket was acknowledged.",
    "ticket.unacked": "A ticket's acknowledgement was taken back.",
    "hit.created": "A hit was appended to a ticket.",
    "email.sent": "The relay accepted an email of a ticket (`seq` null) or of a hit.",
    "email.failed": "An email will not be sent: refused for good, or failing after every retry.",
    "email_settings.created": "A domain's email settings were created.",
    "email_settings.updated": "A domain's email settings were changed.",
    "email_settings.deleted": "A domain's email settings were removed.",
    "smtp_user.created": "An SMTP user was created.",
    "smtp_user.updated": "An SMTP user's limits or status changed.",
    "smtp_user.password_reset": "An SMTP user got a new password.",
    "smtp_user.deleted": "An SMTP user was deleted.",
    "channel.updated": "A channel was created or replaced.",
    "channel.deleted": "A channel was deleted.",
    "command.failed": "A command was refused by the rules (not an unreadable one).",
}

INFO = """\
smtp-worker runs alert tickets and their hits through SMTP relays. Upstream services publish
commands to `{prefix}.commands` with the command's `type` as routing key, get a reply on the
queue of their `reply_to` (direct reply-to works), and subscribe to domain events on
`{prefix}.events`. `{prefix}` is the deployment's prefix (`SMTP_WORKER_PREFIX`, default `smtp`).

Settings commands authenticate an owner (`{"owner_id", "token"}`), ticket and hit commands an
SMTP user (`{"login", "password"}`). A command's `message_id` is its idempotency key: a repeat
from the same principal within `SMTP_WORKER_IDEMPOTENCY_TTL` is answered with the first reply and
not executed again. A command that fails changes nothing.

Error names (`error.name` of an error reply):

| name | when |
|---|---|
| ValidationError | an unreadable body, an unknown or unroutable type, `data` breaking the rules |
| AuthenticationError | `auth` is missing or wrong |
| Forbidden | the SMTP user is disabled |
| NotFound | the named object does not exist for this owner; `details.missing` |
| Conflict | the state forbids it |
| QuotaExceeded | an SMTP user's limit would be passed; `details`: limit, max, used, resets_at |
| GeneralError | anything unexpected; the message reveals nothing internal |
"""


class WireJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema, but in serialization mode every field is required: the worker
    writes every field of a reply or event, defaults and nulls included."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        return self.mode == "serialization" or super().field_is_required(field, total)


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(path)}


def _sorted(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: mapping[key] for key in sorted(mapping)}


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a topic exchange routes `routing_key` through a binding with `pattern`."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        if pattern[0] == "#":  # zero or more words
            return any(match(pattern[1:], words[i:]) for i in range(len(words) + 1))
        return bool(words) and pattern[0] in ("*", words[0]) and match(pattern[1:], words[1:])

    return match(pattern.split("."), routing_key.split("."))


# --- JSON Schemas ---------------------------------------------------------------------------------


def _wire_models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every model on the wire: command bodies as read, replies and events as written."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation") for model in COMMAND_MODELS.values()
    ]
    models += [(model, "serialization") for model in REPLY_MODELS.values()]
    models += [(ErrorReply, "serialization")]
    models += [(model, "serialization") for model in EVENTS.values()]
    return models


def _component_schemas() -> tuple[dict[Any, dict[str, Any]], dict[str, Any]]:
    """The `$ref` of every wire model, and every schema they use, referenced as components."""
    refs, top = models_json_schema(
        _wire_models(), ref_template=COMPONENT, schema_generator=WireJsonSchema
    )
    return refs, _sorted(top["$defs"])


def _standalone(schema: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def json_schemas() -> dict[str, dict[str, Any]]:
    """A standalone JSON Schema (draft 2020-12) per command body, reply and event, by path."""
    files: dict[str, dict[str, Any]] = {}
    for type_, model in COMMAND_MODELS.items():
        schema = model.model_json_schema(mode="validation", schema_generator=WireJsonSchema)
        files[f"commands/{type_}.json"] = _standalone(schema)
    for type_ in COMMANDS:
        adapter: TypeAdapter[Any] = reply_adapter(type_)
        schema = adapter.json_schema(mode="serialization", schema_generator=WireJsonSchema)
        schema["title"] = f"Reply to {type_}"
        files[f"replies/{type_}.json"] = _standalone(schema)
    for type_, event in EVENTS.items():
        schema = event.model_json_schema(mode="serialization", schema_generator=WireJsonSchema)
        files[f"events/{type_}.json"] = _standalone(schema)
    return _sorted(files)


# --- the AsyncAPI document ------------------------------------------------------------------------


def _channel(
    name: str, description: str, binding: dict[str, Any], messages: dict[str, Any] | None
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": name,
        "title": name.replace("{prefix}", "P"),
        "description": description,
        "parameters": {"prefix": _ref("components", "parameters", "prefix")},
    }
    if messages:
        channel["messages"] = _sorted(messages)
    channel["bindings"] = {"amqp": binding | {"bindingVersion": AMQP}}
    return channel


def _exchange(
    name: str,
    kind: str,
    description: str,
    *,
    arguments: dict[str, Any] | None = None,
    messages: dict[str, Any] | None = None,
) -> dict[str, Any]:
    binding: dict[str, Any] = {
        "is": "routingKey",
        "exchange": {
            "name": name,
            "type": kind,
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        },
    }
    if arguments:
        binding["x-arguments"] = arguments
    return _channel(name, description, binding, messages)


def _queue(
    name: str,
    description: str,
    *,
    arguments: dict[str, Any] | None,
    bound: Iterable[tuple[str, str]] = (),
    messages: dict[str, Any] | None = None,
) -> dict[str, Any]:
    queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"}
    binding: dict[str, Any] = {"is": "queue", "queue": queue}
    if arguments:
        binding["x-arguments"] = arguments
    bindings = [{"exchange": exchange, "routingKey": key} for exchange, key in bound]
    if bindings:
        binding["x-bindings"] = bindings
    return _channel(name, description, binding, messages)


def _quorum() -> dict[str, Any]:
    """The arguments of every command queue, `P.unrouted` and `P.deliveries` (contract 2)."""
    return {
        "x-dead-letter-exchange": P.dead,
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-queue-type": "quorum",
    }


def _channels() -> dict[str, Any]:
    commands = {type_: _ref("components", "messages", f"command.{type_}") for type_ in COMMANDS}
    unrouted = P.queue("unrouted")
    channels: dict[str, Any] = {
        "commands": _exchange(
            P.commands,
            "topic",
            "Every command, routing key = its `type`. A command no queue is bound for goes to "
            f"the alternate exchange `{unrouted}`.",
            arguments={"alternate-exchange": unrouted},
            messages=commands,
        ),
        "replies": {
            "address": None,
            "title": "reply_to",
            "description": "The queue a command's `reply_to` names, reached through the default "
            "exchange; `amq.rabbitmq.reply-to` (direct reply-to) works.",
            "messages": {
                type_: _ref("components", "messages", f"reply.{type_}")
                for type_ in sorted(COMMANDS)
            },
        },
        "events": _exchange(
            P.events,
            "topic",
            "Domain events, routing key = the event's `type`. Bind a queue of your own.",
            messages={type_: _ref("components", "messages", f"event.{type_}") for type_ in EVENTS},
        ),
        "dead": _exchange(
            P.dead,
            "fanout",
            "Every message that could not be processed, body untouched.",
        ),
        "deadQueue": _queue(
            P.dead,
            "What `P.dead` received, for an operator to inspect or replay "
            "(`smtp-worker dead list`, `smtp-worker dead replay`).",
            arguments=None,
            bound=[(P.dead, "")],
            messages={"dead": _ref("components", "messages", "dead")},
        ),
        "unrouted": _exchange(
            unrouted,
            "fanout",
            f"The alternate exchange of `{P.commands}`.",
        ),
        "unroutedQueue": _queue(
            unrouted,
            "Commands whose routing key no queue is bound to: answered with a ValidationError "
            "and dead-lettered.",
            arguments=_quorum(),
            bound=[(unrouted, "")],
        ),
        "deliveries": _queue(
            P.deliveries,
            "Internal: one message per email to send. Its messages may change between "
            "releases; its arguments are these, so a client may declare it too.",
            arguments=_quorum(),
        ),
    }
    for short, pattern in COMMAND_QUEUES.items():
        channels[short] = _queue(
            P.queue(short),
            f"The commands whose type matches `{pattern}`.",
            arguments=_quorum(),
            bound=[(P.commands, pattern)],
            messages={
                type_: _ref("components", "messages", f"command.{type_}")
                for type_ in COMMANDS
                if topic_matches(pattern, type_)
            },
        )
    return _sorted(channels)


def _operation(action: str, channel: str, type_: str, summaries: dict[str, str]) -> dict[str, Any]:
    """The operation of the messages of `type_` on `channel`, before its bindings and reply."""
    return {
        "action": action,
        "channel": _ref("channels", channel),
        "title": type_,
        "summary": summaries.get(type_, type_),
        "messages": [_ref("channels", channel, "messages", type_)],
    }


def _operations() -> dict[str, Any]:
    operations: dict[str, Any] = {}
    for type_ in COMMANDS:
        command = _operation("send", "commands", type_, COMMAND_SUMMARIES)
        command["bindings"] = {"amqp": {"cc": [type_], "deliveryMode": 2, "bindingVersion": AMQP}}
        command["reply"] = {
            "address": {
                "location": "$message.header#/reply_to",
                "description": "The command's AMQP property `reply_to`.",
            },
            "channel": _ref("channels", "replies"),
            "messages": [_ref("channels", "replies", "messages", type_)],
        }
        operations[f"send.{type_}"] = command
    for type_ in EVENTS:
        event = _operation("receive", "events", type_, EVENT_SUMMARIES)
        event["bindings"] = {"amqp": {"cc": [type_], "bindingVersion": AMQP}}
        operations[f"receive.{type_}"] = event
    return _sorted(operations)


def _properties(description: str, **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "description": description, "properties": properties}


def _property_schemas() -> dict[str, Any]:
    json_type = {"const": "application/json", "type": "string"}
    return {
        "CommandProperties": _properties(
            "AMQP properties of a command (basic properties, not the headers table).",
            content_type=json_type,
            message_id={
                "type": "string",
                "maxLength": 128,
                "description": "The idempotency key. Without one the command runs every time "
                "it is delivered.",
            },
            reply_to={
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "description": "The queue to reply to: `amq.rabbitmq.reply-to`, or a queue "
                "of the client's that is not one of the worker's and does not start with "
                "`amq.`. A command with another `reply_to` is dead-lettered unanswered.",
            },
            correlation_id={
                "type": "string",
                "description": "Copied to the reply; the reply carries the `message_id` when "
                "it is absent.",
            },
            delivery_mode={"enum": [1, 2], "description": "2: persistent."},
        ),
        "ReplyProperties": _properties(
            "AMQP properties of a reply.",
            content_type=json_type,
            correlation_id={
                "type": "string",
                "description": "The command's `correlation_id`, or its `message_id`.",
            },
            type={"type": "string", "description": "The command's `type`."},
        ),
        "ReplyHeaders": {
            "type": "object",
            "properties": {
                "status": {
                    "enum": ["success", "error"],
                    "description": "The reply's `status`, readable without parsing the body.",
                }
            },
            "required": ["status"],
        },
        "EventProperties": _properties(
            "AMQP properties of an event: persistent, JSON.",
            content_type=json_type,
            delivery_mode={"const": 2},
        ),
    }


def _messages(refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    correlation = _ref("components", "correlationIds", "command")
    messages: dict[str, Any] = {}
    for type_, model in COMMAND_MODELS.items():
        auth = "owner" if COMMANDS[type_][0] is OwnerAuth else "SMTP user"
        messages[f"command.{type_}"] = {
            "name": type_,
            "title": f"{type_} command",
            "summary": f"{COMMAND_SUMMARIES.get(type_, type_)} Authenticates an {auth}.",
            "contentType": "application/json",
            "correlationId": correlation,
            "payload": refs[(model, "validation")],
            "bindings": {
                "amqp": {
                    "bindingVersion": AMQP,
                    "x-properties": _ref("components", "schemas", "CommandProperties"),
                }
            },
        }
        messages[f"reply.{type_}"] = {
            "name": f"{type_} reply",
            "title": f"Reply to {type_}",
            "summary": "Sent only after the command's effects are durable.",
            "contentType": "application/json",
            "correlationId": correlation,
            "headers": _ref("components", "schemas", "ReplyHeaders"),
            "payload": {
                "oneOf": [
                    refs[(REPLY_MODELS[type_], "serialization")],
                    refs[(ErrorReply, "serialization")],
                ]
            },
            "bindings": {
                "amqp": {
                    "messageType": type_,
                    "bindingVersion": AMQP,
                    "x-properties": _ref("components", "schemas", "ReplyProperties"),
                }
            },
        }
    for type_, event in EVENTS.items():
        messages[f"event.{type_}"] = {
            "name": type_,
            "title": f"{type_} event",
            "summary": EVENT_SUMMARIES.get(type_, type_),
            "contentType": "application/json",
            "payload": refs[(event, "serialization")],
            "bindings": {
                "amqp": {
                    "bindingVersion": AMQP,
                    "x-properties": _ref("components", "schemas", "EventProperties"),
                }
            },
        }
    messages["dead"] = {
        "name": "dead letter",
        "summary": "A message that could not be processed, body and properties untouched; "
        "RabbitMQ's `x-death` header says where it came from.",
        "payload": {},
    }
    return _sorted(messages)


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the contract."""
    refs, component_schemas = _component_schemas()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "smtp-worker",
            "version": REVISION,
            "description": INFO,
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "The RabbitMQ broker of `SMTP_WORKER_AMQP_URL`; several URLs "
                "separated by commas are the nodes of one cluster.",
            }
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": {
            "schemas": _sorted(component_schemas | _property_schemas()),
            "messages": _messages(refs),
            "parameters": {
                "prefix": {
                    "default": "smtp",
                    "description": "The deployment's prefix of every exchange and queue name "
                    "(`SMTP_WORKER_PREFIX`).",
                }
            },
            "correlationIds": {
                "command": {
                    "location": "$message.header#/correlation_id",
                    "description": "The AMQP property `correlation_id`: the reply carries the "
                    "command's, or the command's `message_id` when it had none.",
                }
            },
        },
    }


# --- files ----------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line text as literal blocks, so descriptions read as written."""

    def ignore_aliases(self, data: Any) -> bool:
        # The document shares its `$ref` objects; written out each time, not as YAML anchors,
        # which some AsyncAPI tools do not follow.
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render_yaml(value: Any) -> str:
    return yaml.dump(
        value, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=100, indent=2
    )


def render_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def render() -> dict[str, str]:
    """Every generated file, by its path relative to DIRECTORY, and its text."""
    files = {ASYNCAPI: render_yaml(document())}
    for path, schema in json_schemas().items():
        files[f"{JSON_DIR}/{path}"] = render_json(schema)
    return files


def differences(directory: Path = DIRECTORY, files: dict[str, str] | None = None) -> list[str]:
    """The generated files (`files`, else rendered now) that are missing, outdated or left over
    in `directory`."""
    files = render() if files is None else files
    found = {
        path.relative_to(directory).as_posix()
        for path in (directory / JSON_DIR).rglob("*.json")
        if path.is_file()
    }
    stale = [
        path
        for path, text in files.items()
        if not (directory / path).is_file() or (directory / path).read_text() != text
    ]
    return sorted(stale + [path for path in found if path not in files])


def write(directory: Path = DIRECTORY) -> list[str]:
    """Writes every generated file into `directory` and removes stale ones; returns the paths
    that changed."""
    files = render()
    changed = differences(directory, files)
    for path in changed:
        target = directory / path
        if path in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[path])
        else:
            target.unlink()
    return changed
