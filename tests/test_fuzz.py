"""Fuzzing the command consumer through the real broker (contract section 4).

Random bytes, random JSON and near-valid command bodies (a real type, random `auth` and `data`)
go to the worker in batches. Every message must get exactly one well-formed reply, none of them a
`GeneralError` (that would be a bug: nothing here is a passing fault), every message must end up
acked or in `P.dead` with its body untouched, and the worker must still answer at the end.

Hypothesis runs in a thread of its own, so that the world (worker, client, owner) is built once
and the event loop stays free to run it; each example is a batch published at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import COMMANDS, ErrorReply, SuccessReply
from tests.conftest import Client, Env, remember_secrets

MAX_EXAMPLES = 150
BATCH = 8
# The worker answers in milliseconds; a retried fault takes its delivery limit's worth.
REPLY_TIMEOUT = 5.0

TYPES = sorted(COMMANDS)
# Every routing key reaches a command queue (`settings.#`, `ticket.*`, `hit.*`): an unroutable
# message would be dropped by the broker, which is not what is tested here.
ROUTES = [*TYPES, "settings.nope", "settings.a.b.c", "ticket.nope", "hit.nope"]
REPLY = pydantic.TypeAdapter(SuccessReply | ErrorReply)


@dataclass
class Sent:
    body: bytes
    reply: aio_pika.abc.AbstractIncomingMessage | None = None


@dataclass
class Ledger:
    """Every message the fuzzer sent, by correlation id, with the reply it got."""

    sent: dict[str, Sent] = field(default_factory=dict)


# --- strategies ---------------------------------------------------------------------------------

# Text with lone surrogates too (json.dumps escapes them, and every parser must cope): st.text
# leaves them out, whatever its alphabet.
TEXT = st.lists(
    st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=20
).map("".join)
# A `type` is echoed in the reply's AMQP `type` property, which holds at most 255 bytes.
TYPES_TEXT = TEXT | st.text(min_size=80, max_size=300)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
VALUES = (
    JSON
    | st.integers(min_value=-2, max_value=2**64)
    | st.sampled_from(["ops", "ops@example.com", "example.com", "Enable", "Disable", "smtp"])
    | st.lists(st.sampled_from(["ops@example.com", "not-an-address", ""]), max_size=3)
)
# AMQP short strings hold 255 bytes of UTF-8; message ids past 128 characters are refused.
MESSAGE_IDS = st.none() | st.text(st.characters(codec="utf-8"), max_size=140).filter(
    lambda s: len(s.encode()) <= 255
)


def data_fields(type_: str) -> list[str]:
    model = COMMANDS[type_][1]
    return [info.alias or name for name, info in model.model_fields.items()] or ["extra"]


def near_valid(owner: dict[str, str]) -> st.SearchStrategy[tuple[str, bytes]]:
    """A real command type with random auth and data; sometimes the auth is the owner's."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, bytes]:
        type_ = draw(st.sampled_from(TYPES))
        auth = draw(
            st.just(owner)
            | st.fixed_dictionaries({"owner_id": st.just(owner["owner_id"]), "token": TEXT})
            | st.fixed_dictionaries({"owner_id": TEXT, "token": TEXT})
            | st.fixed_dictionaries({"login": TEXT, "password": TEXT})
            | JSON
        )
        data = draw(
            st.dictionaries(st.sampled_from(data_fields(type_)) | TEXT, VALUES, max_size=5) | JSON
        )
        body = {"type": type_, "auth": auth, "data": data}
        dropped = draw(st.sets(st.sampled_from(["auth", "data"]), max_size=1))
        return type_, json.dumps({k: v for k, v in body.items() if k not in dropped}).encode()

    return build()


def messages(owner: dict[str, str]) -> st.SearchStrategy[tuple[str, bytes, str | None]]:
    routed_anywhere = st.sampled_from(ROUTES)
    body = (
        st.tuples(routed_anywhere, st.binary(max_size=300))
        | st.tuples(routed_anywhere, JSON.map(lambda v: json.dumps(v).encode()))
        | st.tuples(
            routed_anywhere, st.builds(lambda t: json.dumps({"type": t}).encode(), TYPES_TEXT)
        )
        | near_valid(owner)
    )
    return st.tuples(body, MESSAGE_IDS).map(lambda pair: (*pair[0], pair[1]))


# --- the run ------------------------------------------------------------------------------------


async def throw(client: Client, ledger: Ledger, batch: list[tuple[str, bytes, str | None]]) -> None:
    """Publishes a batch at once, then checks the reply to each message."""
    futures = {}
    for routing_key, body, message_id in batch:
        correlation_id = uuid.uuid4().hex
        ledger.sent[correlation_id] = Sent(body)
        futures[correlation_id] = await client.publish(
            body, routing_key, message_id=message_id, correlation_id=correlation_id
        )
    for correlation_id, future in futures.items():
        sent = ledger.sent[correlation_id]
        assert future is not None
        try:
            sent.reply = await asyncio.wait_for(future, REPLY_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"no reply to {sent.body!r}") from None
        parsed = REPLY.validate_json(sent.reply.body)
        remember_secrets(json.loads(sent.reply.body))  # passwords of users the fuzzer made
        assert sent.reply.headers["status"] == parsed.status
        if isinstance(parsed, ErrorReply):
            assert parsed.error.name != "GeneralError", f"{sent.body!r} crashed the worker"


def run_hypothesis(
    loop: asyncio.AbstractEventLoop, client: Client, owner: Any, ledger: Ledger
) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(messages(owner), min_size=1, max_size=BATCH))
    def batches(batch: list[tuple[str, bytes, str | None]]) -> None:
        asyncio.run_coroutine_threadsafe(throw(client, ledger, batch), loop).result()

    batches()


async def settled_queue_depths(env: Env) -> dict[str, int]:
    """Messages left in each command queue once the worker is gone (unacked ones come back)."""
    channel = await env.client.connection.channel()
    try:
        return {
            short: (
                await channel.declare_queue(env.client.names.queue(short), passive=True)
            ).declaration_result.message_count
            for short in ("settings", "tickets", "hits")
        }
    finally:
        await channel.close()


def status_of(sent: Sent) -> str:
    assert sent.reply is not None
    return str(json.loads(sent.reply.body)["status"])


async def test_no_input_goes_unanswered_or_unsettled_or_stops_the_worker(env: Env) -> None:
    owner = await env.new_owner()
    ledger = Ledger()

    await asyncio.to_thread(run_hypothesis, asyncio.get_running_loop(), env.client, owner, ledger)

    # Still consuming, and not one reply too many.
    assert (await env.client.call("settings.smtp_user.list", owner, {}))["status"] == "success"
    await asyncio.sleep(0.5)
    assert env.client.orphan_replies == []
    # Nothing left unsettled: once the worker is gone, whatever it had not acked is back.
    while env.workers:
        await env.workers.pop().stop()
    assert await settled_queue_depths(env) == {"settings": 0, "tickets": 0, "hits": 0}
    # What was rejected is there untouched, and was answered with an error.
    dead = [(ledger.sent[m.correlation_id or ""], m.body) for m in await env.client.dead_letters()]
    assert [body for sent, body in dead] == [sent.body for sent, body in dead]
    assert {status_of(sent) for sent, _ in dead} <= {"error"}
