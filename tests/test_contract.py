"""The machine-readable contract (contract section 9): `schemas/asyncapi.yaml` and `schemas/json/`
are what the models generate, and the document is valid AsyncAPI 3.0.

After a change to the models: `make contract` (`smtp-worker asyncapi --write`) and commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml

from schemas import COMMANDS, EVENTS
from tests.support.commandline import smtp_worker
from worker import contract

ASYNCAPI_SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"
# Contract section 8, as written there.
EVENT_TYPES = {
    "ticket.created",
    "ticket.closed",
    "ticket.acked",
    "ticket.unacked",
    "hit.created",
    "email.sent",
    "email.failed",
    "email_settings.created",
    "email_settings.updated",
    "email_settings.deleted",
    "smtp_user.created",
    "smtp_user.updated",
    "smtp_user.password_reset",
    "smtp_user.deleted",
    "channel.updated",
    "channel.deleted",
    "command.failed",
}
QUORUM = {
    "x-queue-type": "quorum",
    "x-delivery-limit": 10,
    "x-dead-letter-exchange": "{prefix}.dead",
}


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((contract.DIRECTORY / contract.ASYNCAPI).read_text())
    return document


def test_the_schemas_package_imports_with_pydantic_alone() -> None:
    code = (
        "import sys, schemas, schemas.events, schemas.replies; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'worker', 'aio_pika', "
        "'aiormq', 'sqlalchemy', 'yaml', 'structlog', 'pydantic_settings'}))"
    )

    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert "[]" == ran.stdout.strip()


@pytest.mark.parametrize("type_", sorted(EVENTS))
def test_each_event_model_is_filed_under_its_type(type_: str) -> None:
    assert (type_,) == get_args(EVENTS[type_].model_fields["type"].annotation)


def test_the_committed_files_are_what_the_models_generate() -> None:
    assert [] == contract.differences(), "run `make contract` and commit what it wrote"


def test_the_document_is_valid_asyncapi_3(committed: dict[str, Any]) -> None:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(committed)
    ]

    assert [] == errors


def test_the_validation_of_the_document_catches_a_broken_one(committed: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(committed))
    broken["operations"]["send.ticket.new"]["action"] = "publish"  # AsyncAPI 2's word
    broken["channels"]["tickets"]["bindings"]["amqp"]["is"] = "exchange"

    errors = list(
        jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text())).iter_errors(broken)
    )

    assert 2 == len(errors)


def test_every_command_is_a_send_operation_with_its_routing_key_and_reply(
    committed: dict[str, Any],
) -> None:
    operations = committed["operations"]
    for type_ in COMMANDS:
        operation = operations[f"send.{type_}"]
        assert ("send", {"$ref": "#/channels/commands"}) == (
            operation["action"],
            operation["channel"],
        )
        assert [type_] == operation["bindings"]["amqp"]["cc"]
        reply = operation["reply"]
        assert "$message.header#/reply_to" == reply["address"]["location"]
        assert [{"$ref": f"#/channels/replies/messages/{type_}"}] == reply["messages"]


def test_every_event_of_the_contract_is_a_receive_operation_on_the_events_exchange(
    committed: dict[str, Any],
) -> None:
    receive = {
        operation["title"]
        for operation in committed["operations"].values()
        if operation["action"] == "receive"
    }

    assert EVENT_TYPES == set(EVENTS) == receive
    assert {"$ref": "#/channels/events"} == committed["operations"]["receive.email.sent"]["channel"]


def test_a_reply_is_the_commands_success_or_the_error_reply(committed: dict[str, Any]) -> None:
    message = committed["components"]["messages"]["reply.ticket.new"]

    assert {
        "oneOf": [
            {"$ref": "#/components/schemas/TicketNewSuccess"},
            {"$ref": "#/components/schemas/ErrorReply"},
        ]
    } == message["payload"]
    assert ["status"] == committed["components"]["schemas"]["ReplyHeaders"]["required"]


@pytest.mark.parametrize("queue", ["tickets", "hits", "settings", "deliveries", "unroutedQueue"])
def test_the_worker_queues_are_quorum_queues_that_dead_letter_to_p_dead(
    committed: dict[str, Any], queue: str
) -> None:
    binding = committed["channels"][queue]["bindings"]["amqp"]

    assert ("queue", QUORUM) == (binding["is"], binding["x-arguments"])


def test_the_commands_exchange_has_p_unrouted_as_alternate_exchange(
    committed: dict[str, Any],
) -> None:
    binding = committed["channels"]["commands"]["bindings"]["amqp"]

    assert {"name": "{prefix}.commands", "type": "topic"}.items() <= binding["exchange"].items()
    assert {"alternate-exchange": "{prefix}.unrouted"} == binding["x-arguments"]
    assert "fanout" == committed["channels"]["unrouted"]["bindings"]["amqp"]["exchange"]["type"]


def test_every_channel_name_takes_the_prefix_parameter_whose_default_is_smtp(
    committed: dict[str, Any],
) -> None:
    named = {k: v for k, v in committed["channels"].items() if v["address"] is not None}

    assert all(channel["address"].startswith("{prefix}.") for channel in named.values())
    assert "smtp" == committed["components"]["parameters"]["prefix"]["default"]


def test_there_is_a_json_schema_per_command_body_reply_and_event() -> None:
    files = {
        path.relative_to(contract.DIRECTORY / contract.JSON_DIR).as_posix()
        for path in (contract.DIRECTORY / contract.JSON_DIR).rglob("*.json")
    }

    assert (
        {f"commands/{t}.json" for t in COMMANDS}
        | {f"replies/{t}.json" for t in COMMANDS}
        | {f"events/{t}.json" for t in EVENT_TYPES}
    ) == files
    for path in files:
        jsonschema.Draft202012Validator.check_schema(
            json.loads((contract.DIRECTORY / contract.JSON_DIR / path).read_text())
        )


@pytest.mark.parametrize(
    ("pattern", "routing_key", "routed"),
    [
        ("ticket.*", "ticket.new", True),
        ("ticket.*", "ticket.new.x", False),
        ("settings.#", "settings.smtp_user.add", True),
        ("settings.#", "settings", True),
        ("settings.#", "ticket.new", False),
        ("a.#.b", "a.x.y.b", True),
    ],
)
def test_topic_matching_follows_rabbitmq(pattern: str, routing_key: str, routed: bool) -> None:
    assert routed == contract.topic_matches(pattern, routing_key)


async def test_smtp_worker_asyncapi_prints_the_committed_document(tmp_path: Path) -> None:
    # Another process, another hash seed: the output depends on the models alone.
    ran = await smtp_worker("asyncapi", cwd=tmp_path)

    assert (0, (contract.DIRECTORY / contract.ASYNCAPI).read_text()) == (ran.code, ran.stdout)


def test_write_regenerates_every_file_and_removes_stale_ones(tmp_path: Path) -> None:
    (tmp_path / "json" / "events").mkdir(parents=True)
    (tmp_path / "json" / "events" / "gone.json").write_text("{}")

    contract.write(tmp_path)

    assert [] == contract.differences(tmp_path)
    assert not (tmp_path / "json" / "events" / "gone.json").exists()
    assert (contract.DIRECTORY / "json/commands/ticket.new.json").read_text() == (
        tmp_path / "json/commands/ticket.new.json"
    ).read_text()


async def test_smtp_worker_asyncapi_check_fails_on_an_outdated_file(tmp_path: Path) -> None:
    contract.write(tmp_path)
    (tmp_path / "json/replies/hit.new.json").write_text("{}\n")

    check = await smtp_worker("asyncapi", "--check", "--directory", str(tmp_path), cwd=tmp_path)

    assert (1, "outdated: json/replies/hit.new.json") == (check.code, check.stderr.strip())
