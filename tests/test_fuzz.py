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
import base64
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aio_pika
import aiormq.channel
import pydantic
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from schemas import COMMANDS, ErrorReply, SuccessReply
from tests.support.client import Client
from tests.support.environment import Env
from tests.support.hostile import HIT_HEADERS, TICKET_HEADERS, defects, quoted, read, text_of
from tests.support.logs import remember_secrets
from tests.support.smtp_servers import SmtpServer
from tests.support.world import World, configure

MAX_EXAMPLES = 150
BATCH = 8
# The worker answers in milliseconds; a retried fault takes its delivery limit's worth.
REPLY_TIMEOUT = 5.0

TYPES = sorted(COMMANDS)
# Routing keys of every command queue (`settings.#`, `ticket.*`, `hit.*`), and some no queue
# takes, which reach the worker through P.unrouted.
ROUTES = [
    *TYPES,
    "settings.nope",
    "settings.a.b.c",
    "ticket.nope",
    "hit.nope",
    "nothing.here",
    "ticket",
    "hit.a.b",
]
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
# Integers around the contract's bounds (0..2**53 - 1) and far past them, and floats that are
# integers to JSON readers.
HUGE = (
    st.sampled_from([2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64, 10**400, -1, -(2**63), 1e300])
    | st.integers(min_value=2**53 - 2, max_value=2**80)
    | st.integers(max_value=-1)
)
VALUES = (
    JSON
    | HUGE
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
        fields = st.sampled_from(data_fields(type_))
        data = draw(
            st.dictionaries(fields | TEXT, VALUES, max_size=5)
            | st.dictionaries(fields, HUGE, min_size=1, max_size=3)
            | JSON
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
        # A near-valid body under a routing key that may not be its type.
        | st.tuples(routed_anywhere, near_valid(owner).map(lambda pair: pair[1]))
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


def examples_of(max_examples: int, *also_suppressed: HealthCheck) -> settings:
    """Hypothesis settings of a fuzz test: no deadline, no example database, a blob to replay a
    failure with, and examples as slow as a broker round trip makes them."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, *also_suppressed],
    )


def run_hypothesis(
    loop: asyncio.AbstractEventLoop, client: Client, owner: Any, ledger: Ledger
) -> None:
    @examples_of(MAX_EXAMPLES, HealthCheck.data_too_large)
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
            for short in ("settings", "tickets", "hits", "unrouted")
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
    assert await settled_queue_depths(env) == {
        "settings": 0,
        "tickets": 0,
        "hits": 0,
        "unrouted": 0,
    }
    # What was rejected is there untouched, and was answered with an error.
    dead = [(ledger.sent[m.correlation_id or ""], m.body) for m in await env.client.dead_letters()]
    assert [body for sent, body in dead] == [sent.body for sent, body in dead]
    assert {status_of(sent) for sent, _ in dead} <= {"error"}


# --- hostile text: text never changes an email's structure (contract section 5) -----------------

MAX_TEXT_EXAMPLES = 100
# What a line break or a header smuggled in an encoded word would carry.
INJECTIONS = st.sampled_from(
    [
        "\r\nBcc: x@evil.example",
        "\nReply-To: x@evil.example",
        "\r\nX-Injected: 1",
        "\r\nContent-Type: text/html\r\n\r\n<b>pwned</b>",
        "\r\n--boundary\r\n",
        "\r\n.\r\n",
    ]
)
CHARSETS = {"utf-8": "utf-8", "UTF-8": "utf-8", "iso-8859-1": "latin-1", "us-ascii": "ascii"}


def encoded_word(charset: str, text: str, base64_: bool) -> str:
    """`text` as an RFC 2047 encoded word, as an attacker would write it."""
    data = text.encode(CHARSETS[charset], "replace")
    if base64_:
        return f"=?{charset}?B?{base64.b64encode(data).decode()}?="
    quoted = "".join(
        chr(byte) if chr(byte).isalnum() and byte < 128 else "_" if byte == 32 else f"={byte:02X}"
        for byte in data
    )
    return f"=?{charset}?q?{quoted}?="


ENCODED_WORDS = st.builds(
    encoded_word, st.sampled_from(sorted(CHARSETS)), INJECTIONS | st.text(max_size=8), st.booleans()
)
BIDI = st.sampled_from("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BREAKS = st.sampled_from(["\r\n", "\n", "\r", "\x85", "\u2028", "\u2029", "\v", "\f", "\x1c"])
MIME_BITS = st.sampled_from(
    ["--boundary", "Content-Type: text/html", "MIME-Version: 1.0", "=?", "?=", '"', "\\", " "]
)
# Any character but those contract section 5 refuses in a header.
ALLOWED_CHARACTERS = st.text(
    st.characters(
        exclude_categories=("Cc", "Cs", "Zl", "Zp"),
        exclude_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    ),
    max_size=6,
)
HOSTILE_TEXT = (
    # Hostile but allowed everywhere: encoded words, MIME lines, quotes, any printable character.
    st.lists(ENCODED_WORDS | MIME_BITS | ALLOWED_CHARACTERS, max_size=6).map("".join)
    # Anything: line breaks, bidirectional and other controls too.
    | st.lists(
        ENCODED_WORDS | BIDI | BREAKS | MIME_BITS | st.just("\t") | st.text(max_size=6),
        max_size=6,
    ).map("".join)
).filter(lambda text: len(text) <= 120)
TEXT_FIELDS = [
    "title",
    "subject_prefix",
    "display_name",
    "body",
    "summary",
    "hit_body",
    "comment",
    "description",
]
# The rules of contract section 5, written from the contract rather than taken from the schemas.
HEADER_REFUSES = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# A body keeps TAB and line breaks: CR, LF and the line and paragraph separators (no controls).
BODY_REFUSES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def acceptable(field: str, text: str) -> bool:
    in_header = field in ("title", "subject_prefix", "display_name")
    if (HEADER_REFUSES if in_header else BODY_REFUSES).search(text):
        return False
    if field in ("title", "summary") and not text:
        return False
    if field == "display_name" and "  " in text and ("=?" in text or not text.isascii()):
        return False  # encoded, its spaces would read as one (contract 6 leaves this open)
    return not (field == "display_name" and set("@<>") & set(text))


async def email_of(world: World, sid: str, seq: int | None = None) -> EmailMessage:
    """The email of ticket `sid` (or of its hit `seq`), once the relay has it."""
    wanted = (sid, None if seq is None else str(seq))
    for _ in range(500):
        for received in list(world.smtp.messages):
            message = read(received.raw)
            if (message["X-Ticket-SID"], message["X-Ticket-Hit-Seq"]) == wanted:
                assert [] == defects(message)
                assert (HIT_HEADERS if seq else TICKET_HEADERS) == message.keys()
                return message
        await asyncio.sleep(0.02)
    raise AssertionError(f"no email for {wanted}")


async def put_text(world: World, field: str, text: str) -> None:
    """Puts `text` in `field` of a command; checks the verdict, and the email shows it literally."""
    sid = await world.new_ticket() if field in ("summary", "hit_body", "comment") else ""
    summary, body = (text, "b") if field == "summary" else ("s", text)
    if field == "title":
        reply = await world.call("ticket.new", world.ticket_data(text))
    elif field == "body":
        reply = await world.call("ticket.new", world.ticket_data(body=text))
    elif field in ("summary", "hit_body"):
        reply = await world.call("hit.new", {"sid": sid, "hit": {"summary": summary, "body": body}})
    elif field == "comment":
        reply = await world.call("ticket.close", {"sid": sid, "comment": text})
    elif field == "subject_prefix":
        put = {"name": "fz", "domain": world.domain, "recipients": world.recipients}
        reply = await world.env.client.call(
            "settings.channel.put", world.owner, put | {"subject_prefix": text}
        )
    elif field == "description":
        reply = await world.env.client.call(
            "settings.email.update", world.owner, {"domain": world.domain, "description": text}
        )
    else:
        sender = f"{quoted(text)} <alerts@{world.domain}>"
        reply = await world.env.client.call(
            "settings.email.update", world.owner, {"domain": world.domain, "from": sender}
        )
    if not acceptable(field, text):
        assert ("error", "ValidationError") == (reply["status"], reply["error"]["name"]), reply
        return
    assert "success" == reply["status"], reply
    data = reply["data"]
    if field == "title":
        assert f"[ops] {text}" == (await email_of(world, data["sid"]))["Subject"]
    elif field == "body":
        expected = f"{text}\n\nSeverity: medium\nTicket: {data['sid']}\n"
        assert expected == text_of(await email_of(world, data["sid"]))
    elif field in ("summary", "hit_body"):
        shown = f"{summary}\n\n" + (f"{body}\n\n" if body else "")
        expected = f"{shown}Ticket: {sid}\nHit: {data['seq']}\n"
        assert expected == text_of(await email_of(world, sid, data["seq"]))
    elif field == "comment":
        assert text == (await world.ticket(sid))["comment"]
    elif field == "subject_prefix":
        ticket = {"title": "T", "body": ""}
        created = await world.ok("ticket.new", {"channel": "fz", "ticket": ticket})
        expected = f"{text} T" if text else "T"
        assert expected == (await email_of(world, created["sid"]))["Subject"]
    elif field == "description":
        assert text == data["description"]
    else:
        (address,) = (await email_of(world, await world.new_ticket()))["From"].addresses
        assert (text, f"alerts@{world.domain}") == (address.display_name, address.addr_spec)


async def test_hostile_text_in_any_field_is_refused_or_shown_literally(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiormq gives a message published without a message_id one drawn from the `random` module,
    # which Hypothesis seeds alike for every example: the ids would recur, and the worker would
    # answer the commands from its idempotency records instead of running them.
    monkeypatch.setattr(aiormq.channel, "getrandbits", random.SystemRandom().getrandbits)
    async with SmtpServer() as smtp:
        world = await configure(env, smtp)
        loop = asyncio.get_running_loop()

        @examples_of(MAX_TEXT_EXAMPLES, HealthCheck.filter_too_much)
        @given(field=st.sampled_from(TEXT_FIELDS), text=HOSTILE_TEXT)
        def examples(field: str, text: str) -> None:
            event(f"{field}: {'accepted' if acceptable(field, text) else 'refused'}")
            asyncio.run_coroutine_threadsafe(put_text(world, field, text), loop).result()

        await asyncio.to_thread(examples)

        # Every email the relay received, whatever made it, has exactly the contract's headers.
        for received in smtp.messages:
            message = read(received.raw)
            expected = HIT_HEADERS if message["X-Ticket-Hit-Seq"] else TICKET_HEADERS
            assert (expected, []) == (message.keys(), defects(message))
