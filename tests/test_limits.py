"""What one message may cost (contract sections 3, 4): bounded errors, replies and integers.

A body with wrong credentials costs no more than its size to refuse, whatever its `data` holds;
error details stop at 20; no reply is larger than 16 MiB; every integer of `data` lies in
0..2**53 - 1, and one outside is a ValidationError, never a GeneralError.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import delete_prefix
from tests.support.client import Client
from tests.support.commandline import environment
from tests.support.environment import Env, make_settings, running_env
from tests.support.logs import SECRET_KEY
from tests.support.processes import WorkerProcess
from tests.support.smtp_servers import SmtpServer
from tests.support.tenants import unique_domain
from tests.support.world import World, configure

MAX_BODY = 1024 * 1024
SMALL = 4096  # bytes: what a refusal may take, whatever it refuses


def wide_body(type_: str, auth: Any, size: int = MAX_BODY) -> bytes:
    """A command whose `data` is nothing but unknown fields, as many as `size` bytes hold."""
    head = json.dumps({"type": type_, "auth": auth})[:-1] + ', "data": {'
    field = '"f%06d": 1, '
    count = (size - len(head) - 20) // len(field % 0)
    fields = "".join(field % i for i in range(count)).removesuffix(", ")
    body = (head + fields + "}}").encode()
    assert len(body) <= size
    return body


class Module:
    """A worker shared by the module's tests, and a configured owner."""

    def __init__(self, env: Env, world: World) -> None:
        self.env, self.client, self.world = env, env.client, world


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared_database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="module")
async def module(amqp_url: str, shared_database_url: str) -> AsyncIterator[Module]:
    # No delivery consumer: the tickets' emails wait in P.deliveries, sent nowhere.
    queues = ("tickets", "hits", "settings")
    async with (
        running_env(amqp_url, shared_database_url, queues=queues) as env,
        SmtpServer() as smtp,
    ):
        yield Module(env, await configure(env, smtp))


async def failed_event(client: Client, command_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for event in client.events:
            if event["type"] == "command.failed" and event["data"]["command_id"] == command_id:
                return event
        await asyncio.sleep(0.02)
    raise AssertionError(f"no command.failed event for {command_id}")


# --- wide bodies ----------------------------------------------------------------------------------


async def test_a_wide_body_with_a_wrong_password_gets_a_small_authentication_error(
    module: Module,
) -> None:
    auth = {"login": module.world.user_name, "password": "wrong-" + uuid.uuid4().hex}

    reply = await module.client.call_raw(wide_body("ticket.get", auth), "ticket.get")

    assert json.loads(reply.body)["error"]["name"] == "AuthenticationError"
    assert len(reply.body) < SMALL


async def test_a_wide_body_with_the_right_password_gets_20_details_at_most(module: Module) -> None:
    message_id = uuid.uuid4().hex
    body = wide_body("ticket.get", module.world.auth)

    reply = await module.client.call_raw(body, "ticket.get", message_id=message_id)

    error = json.loads(reply.body)["error"]
    assert error["name"] == "ValidationError"
    assert error["details"][:2] == [
        {"loc": ["data", "sid"], "msg": "Field required"},
        {"loc": ["data", "f000000"], "msg": "Extra inputs are not permitted"},
    ]
    assert len(error["details"]) == 20
    assert len(reply.body) < SMALL
    event = await failed_event(module.client, message_id)
    assert len(event["data"]["error"]["details"]) == 20
    assert len(json.dumps(event)) < SMALL
    rows = await module.env.query(
        "SELECT count(*) FROM processed_commands WHERE message_id = :id", id=message_id
    )
    assert rows[0][0] == 0


async def test_unknown_fields_are_found_at_any_depth(module: Module) -> None:
    data = {
        "channel": module.world.channel,
        "ticket": {"title": "t", "body": "b", "extra": 1},
        "also": 2,
    }

    reply = await module.world.call("ticket.new", data)

    assert [d["loc"] for d in reply["error"]["details"]] == [
        ["data", "ticket", "extra"],
        ["data", "also"],
    ]


async def test_a_large_valid_body_is_read_in_full_after_its_credentials(module: Module) -> None:
    body = "x" * 65536

    created = await module.world.ok("ticket.new", module.world.ticket_data(body=body))

    assert (await module.world.ticket(created["sid"]))["body"] == body


# --- replies ----------------------------------------------------------------------------------

TICKET_BODY = "x" * 60_000


async def test_a_reply_over_16_mib_is_refused_and_records_nothing(module: Module) -> None:
    world = module.world
    sids: list[str] = []
    for _ in range(15):  # 300 tickets of 60 KB: 18 MB
        created = await asyncio.gather(
            *(world.ok("ticket.new", world.ticket_data(body=TICKET_BODY)) for _ in range(20))
        )
        sids += [ticket["sid"] for ticket in created]
    message_id = uuid.uuid4().hex

    refused = await world.call("ticket.get_many", {"sids": sids}, message_id=message_id)
    fitting = await world.call("ticket.get_many", {"sids": sids[:250]})

    assert refused["error"]["name"] == "ValidationError"
    assert "16 MiB" in refused["error"]["message"]
    assert fitting["status"] == "success"
    assert len(fitting["data"]["tickets"]) == 250
    rows = await module.env.query(
        "SELECT count(*) FROM processed_commands WHERE message_id = :id", id=message_id
    )
    assert rows[0][0] == 0


# --- integers -----------------------------------------------------------------------------------

OUT_OF_RANGE = [2**53, 2**63, 2**64, -1, 1e300]


def smtp_user_add(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    return (
        "settings.smtp_user.add",
        module.world.owner,
        {"total_limit": value, "hourly_limit": 1},
        ["data", "total_limit"],
    )


def smtp_user_edit(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    data = {"smtp_user_name": module.world.user_name, "hourly_limit": value}
    return ("settings.smtp_user.edit", module.world.owner, data, ["data", "hourly_limit"])


def hit_list_after(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    data = {"sid": "s" * 22, "after_seq": value}
    return ("hit.list", module.world.auth, data, ["data", "after_seq"])


def hit_list_limit(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    return ("hit.list", module.world.auth, {"sid": "s" * 22, "limit": value}, ["data", "limit"])


def email_port(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    domain = unique_domain()
    data = {
        "domain": domain,
        "provider": "smtp",
        "from": f"alerts@{domain}",
        "options": {"host": "relay.example.com", "port": value},
    }
    return ("settings.email.create", module.world.owner, data, ["data", "options", "port"])


def email_timeout(module: Module, value: Any) -> tuple[str, Any, Any, list[Any]]:
    data = {"domain": module.world.domain, "options": {"timeout": value}}
    return ("settings.email.update", module.world.owner, data, ["data", "options", "timeout"])


FIELDS = [smtp_user_add, smtp_user_edit, hit_list_after, hit_list_limit, email_port, email_timeout]


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=["2^53", "2^63", "2^64", "-1", "1e300"])
@pytest.mark.parametrize("field", FIELDS, ids=[field.__name__ for field in FIELDS])
async def test_an_integer_out_of_range_is_a_validation_error(
    module: Module, field: Any, value: Any
) -> None:
    type_, auth, data, loc = field(module, value)

    reply = await module.client.call(type_, auth, data)

    assert reply["error"]["name"] == "ValidationError", reply
    assert loc in [detail["loc"] for detail in reply["error"]["details"]]


async def test_the_largest_integer_is_stored_and_read_back(module: Module) -> None:
    top = 2**53 - 1
    owner = module.world.owner

    added = await module.client.ok(
        "settings.smtp_user.add", owner, {"total_limit": top, "hourly_limit": top}
    )
    sid = await module.world.new_ticket()
    page = await module.world.ok("hit.list", {"sid": sid, "after_seq": top})

    assert (added["total_limit"], added["hourly_limit"]) == (top, top)
    assert page == {"hits": [], "next_after_seq": None}


# --- a burst of wide bodies, against a worker process -------------------------------------------

BURST = 40
RSS_GROWTH_MAX = 150 * 1024 * 1024


async def test_a_burst_of_wide_bodies_with_a_wrong_password_leaves_the_worker_small(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = make_settings(amqp_url, f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    variables = {
        "amqp_url": amqp_url,
        "database_url": settings.database_url,
        "prefix": settings.prefix,
        "secret_key": SECRET_KEY,
    }
    process = WorkerProcess(environment(**variables), tmp_path / "worker.log", tmp_path).spawn()
    client = await Client.connect(settings)
    try:
        await process.wait_started()
        auth = {"login": "smtp_nobody", "password": "wrong-" + uuid.uuid4().hex}
        await client.call_raw(wide_body("ticket.get", auth, 1000), "ticket.get")  # warmed up
        before = process.read_memory()[0] * 1024  # VmRSS
        body = wide_body("ticket.get", auth)

        futures = [await client.publish(body, "ticket.get") for _ in range(BURST)]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 120)  # type: ignore[arg-type]

        after = process.read_memory()[0] * 1024
        names = {json.loads(reply.body)["error"]["name"] for reply in replies}
        assert names == {"AuthenticationError"}
        assert after - before < RSS_GROWTH_MAX, f"{before >> 20} MiB -> {after >> 20} MiB"
        answer = await client.call_raw(wide_body("ticket.get", auth, 1000), "ticket.get")
        assert json.loads(answer.body)["error"]["name"] == "AuthenticationError"
    finally:
        await client.close()
        assert await process.stop() == 0
        await delete_prefix(amqp_url, settings)
