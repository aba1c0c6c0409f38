"""`worker.client` (contract section 9) against a real worker: typed replies for every command,
typed event streams, idempotent retries, cluster URL lists, and the errors of a missing worker.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from yarl import URL

from schemas import COMMANDS, REPLY_MODELS, ErrorReply, SuccessReply, UserAuth
from schemas import events as e
from schemas import settings as s
from schemas import tickets as t
from tests.support.environment import Env
from tests.support.logs import remember_secrets
from tests.support.payloads import relay_options
from tests.support.polling import eventually
from tests.support.proxy import Proxy
from tests.support.smtp_servers import SmtpServer, closed_port
from tests.support.tenants import unique_domain
from worker.client import (
    UNSET,
    BrokerUnreachable,
    Client,
    ConnectionLost,
    NoReply,
    NoWorker,
)

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
RECIPIENTS = ["oncall@example.com", "ops@example.org"]


@pytest.fixture
async def client(env: Env) -> AsyncIterator[Client]:
    async with Client(env.amqp_url, prefix=env.settings.prefix) as opened:
        yield opened


def ok(reply: SuccessReply[Any] | ErrorReply) -> Any:
    """The data of a reply that must be a success; its secrets join the session's scan."""
    assert isinstance(reply, SuccessReply), reply
    remember_secrets(reply.model_dump(mode="json", by_alias=True))
    return reply.data


async def users_of(env: Env, owner: dict[str, str]) -> list[str]:
    rows = await env.query(
        "SELECT name FROM smtp_users WHERE owner_id = :owner", owner=owner["owner_id"]
    )
    return [row[0] for row in rows]


# --- the shortcuts --------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(COMMANDS))
def test_there_is_a_shortcut_per_command_taking_its_data_fields_as_keywords(type_: str) -> None:
    shortcut = getattr(Client, type_.replace(".", "_"))
    keywords = {
        name.rstrip("_")
        for name, parameter in inspect.signature(shortcut).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    data = COMMANDS[type_][1]

    assert {f.alias or name for name, f in data.model_fields.items()} | {
        "message_id",
        "timeout",
    } == keywords


@ON_SQLITE
async def test_every_command_gets_its_typed_reply(
    env: Env, client: Client, smtp: SmtpServer
) -> None:
    owner = await env.new_owner()
    domain = unique_domain()
    answered: list[str] = []

    def typed(reply: SuccessReply[Any] | ErrorReply, data: type[Any]) -> Any:
        assert isinstance(reply, REPLY_MODELS[reply.type or ""]), reply
        assert isinstance(reply.data, data)
        answered.append(reply.type or "")
        return ok(reply)

    created = typed(
        await client.settings_email_create(
            owner,
            domain=domain,
            from_=f"Alerts <alerts@{domain}>",
            options=relay_options(smtp),
        ),
        s.EmailSettings,
    )
    assert (domain, f"Alerts <alerts@{domain}>") == (created.domain, created.from_)
    got = typed(await client.settings_email_get(owner, domain=domain), s.EmailSettings)
    assert created.id == got.id
    updated = typed(
        await client.settings_email_update(owner, domain=domain, description="main relay"),
        s.EmailSettings,
    )
    assert "main relay" == updated.description
    probe = typed(await client.settings_email_test(owner, domain=domain), s.EmailTestResult)
    assert (True, "done") == (probe.ok, probe.stage)

    user = typed(
        await client.settings_smtp_user_add(owner, total_limit=100, hourly_limit=10),
        s.SmtpUserCreated,
    )
    edited = typed(
        await client.settings_smtp_user_edit(
            owner, smtp_user_name=user.smtp_user_name, hourly_limit=20
        ),
        s.SmtpUser,
    )
    assert (100, 20) == (edited.total_limit, edited.hourly_limit)
    reset = typed(
        await client.settings_smtp_user_reset_password(owner, smtp_user_name=user.smtp_user_name),
        s.SmtpUserPassword,
    )
    listed = typed(await client.settings_smtp_user_list(owner), s.SmtpUserList)
    assert [user.smtp_user_name] == [u.smtp_user_name for u in listed.smtp_list]

    channel = typed(
        await client.settings_channel_put(owner, name="ops", domain=domain, recipients=RECIPIENTS),
        s.Channel,
    )
    assert ("[ops]", RECIPIENTS) == (channel.subject_prefix, channel.recipients)
    assert "ops" == typed(await client.settings_channel_get(owner, name="ops"), s.Channel).name
    channels = typed(await client.settings_channel_list(owner), s.ChannelList)
    assert ["ops"] == [c.name for c in channels.channels]

    auth = UserAuth(login=reset.smtp_user_name, password=reset.smtp_password)
    sid = typed(
        await client.ticket_new(
            auth, channel="ops", ticket=t.NewTicket(title="Disk full", body="97% used")
        ),
        t.TicketCreated,
    ).sid
    assert "[ops] Disk full" == (await smtp.wait_for(1))[0].message["Subject"]
    other = typed(
        await client.ticket_new(auth, channel="ops", ticket={"title": "Load", "body": ""}),
        t.TicketCreated,
    ).sid
    seq = typed(
        await client.hit_new(auth, sid=sid, hit={"summary": "still full"}), t.HitCreated
    ).seq
    assert 1 == seq
    page = typed(await client.hit_list(auth, sid=sid), t.HitPage)
    assert ([1], None) == ([h.seq for h in page.hits], page.next_after_seq)
    assert sid == typed(await client.ticket_get(auth, sid=sid), t.TicketOne).ticket.sid

    typed(await client.ticket_ack(auth, sid=sid), t.Done)
    typed(await client.ticket_unack(auth, sid=sid), t.Done)
    typed(await client.ticket_ack_many(auth, sids=[sid, other]), t.Done)
    typed(await client.ticket_unack_many(auth, sids=[sid, other]), t.Done)
    typed(await client.ticket_close(auth, sid=sid, comment="cleaned up"), t.Done)
    typed(await client.ticket_close_many(auth, sids=[other]), t.Done)
    many = typed(await client.ticket_get_many(auth, sids=[other, sid]), t.TicketMany)
    assert [(other, "closed", None), (sid, "closed", "cleaned up")] == [
        (ticket.sid, ticket.status, ticket.comment) for ticket in many.tickets
    ]

    assert 1 == typed(await client.settings_channel_delete(owner, name="ops"), s.Removed).removed
    typed(await client.settings_email_delete(owner, domain=domain), s.Removed)
    typed(
        await client.settings_smtp_user_delete(owner, smtp_user_name=user.smtp_user_name),
        s.Removed,
    )
    assert sorted(COMMANDS) == sorted(set(answered))


@ON_SQLITE
async def test_a_refused_command_is_an_error_reply_not_an_exception(
    env: Env, client: Client
) -> None:
    owner = await env.new_owner()

    reply = await client.settings_channel_get(owner, name="nope")

    assert isinstance(reply, ErrorReply)
    assert ("NotFound", "settings.channel.get") == (reply.error.name, reply.type)


@ON_SQLITE
async def test_an_optional_field_left_out_is_not_sent_and_none_is_sent_as_null(
    client: Client, owner: dict[str, str], domain: str
) -> None:
    options = {"host": "smtp.example.com", "port": 587}
    from_ = f"alerts@{domain}"
    ok(
        await client.settings_email_create(
            owner, domain=domain, from_=from_, options=options, description="kept"
        )
    )

    kept = ok(await client.settings_email_update(owner, domain=domain, description=UNSET))
    cleared = ok(await client.settings_email_update(owner, domain=domain, description=None))

    assert ("kept", None) == (kept.description, cleared.description)


# --- call -----------------------------------------------------------------------------------------


@ON_SQLITE
async def test_call_returns_the_success_typed_by_its_command(env: Env, client: Client) -> None:
    owner = await env.new_owner()

    reply = await client.call("settings.smtp_user.list", owner, {})

    assert isinstance(reply, REPLY_MODELS["settings.smtp_user.list"])
    assert s.SmtpUserList(smtp_list=[]) == reply.data


@ON_SQLITE
async def test_call_takes_its_arguments_in_the_contracts_order(env: Env, client: Client) -> None:
    # call(type, auth, data, message_id=None, timeout=30), each by position or by name.
    owner, message_id = await env.new_owner(), uuid.uuid4().hex

    first = await client.call("settings.smtp_user.list", owner, {}, message_id, 10)
    again = await client.call("settings.smtp_user.list", owner, {}, message_id=message_id)

    assert isinstance(first, SuccessReply)
    assert first.command_id == again.command_id == message_id


@ON_SQLITE
async def test_call_returns_an_error_reply_for_wrong_credentials(env: Env, client: Client) -> None:
    reply = await client.call("settings.smtp_user.list", {"owner_id": "x", "token": "y"}, {})

    assert isinstance(reply, ErrorReply)
    assert "AuthenticationError" == reply.error.name


@ON_SQLITE
async def test_call_sends_a_model_as_the_fields_that_were_set(
    client: Client, owner: dict[str, str], domain: str
) -> None:
    options = {"host": "smtp.example.com", "port": 587}
    ok(await client.call("settings.email.create", owner, {"domain": domain, "provider": "smtp",
                                                          "from": f"alerts@{domain}",
                                                          "options": options}))  # fmt: skip
    patch = s.EmailSettingsUpdate(domain=domain, options=s.SmtpOptionsPatch(port=2525))

    # Sent with its unset fields, the patch would say `"host": null`: a ValidationError.
    updated = ok(await client.call("settings.email.update", owner, patch))

    assert ("smtp.example.com", 2525) == (updated.options.host, updated.options.port)


@ON_SQLITE
async def test_a_call_repeated_with_its_message_id_runs_once_and_gets_the_first_reply(
    env: Env, client: Client
) -> None:
    owner = await env.new_owner()
    message_id = uuid.uuid4().hex

    first = ok(await client.settings_smtp_user_add(owner, total_limit=5, hourly_limit=5,
                                                    message_id=message_id))  # fmt: skip
    again = ok(await client.settings_smtp_user_add(owner, total_limit=5, hourly_limit=5,
                                                    message_id=message_id))  # fmt: skip

    assert first == again
    assert [first.smtp_user_name] == await users_of(env, owner)


@ON_SQLITE
async def test_a_call_whose_connection_breaks_before_its_reply_is_sent_again_and_runs_once(
    env: Env,
) -> None:
    owner = await env.new_owner()
    broker = URL(env.amqp_url)
    with Proxy(broker.port or 5672, broker.host or "127.0.0.1") as proxy:
        url = str(broker.with_host(proxy.host).with_port(proxy.port))
        async with Client(url, prefix=env.settings.prefix) as client:
            ok(await client.settings_smtp_user_list(owner))  # its channel is open
            proxy.mute()  # the command reaches the worker; its reply never reaches the client
            call = asyncio.ensure_future(
                client.settings_smtp_user_add(owner, total_limit=5, hourly_limit=5, timeout=30)
            )

            async def ran() -> bool:
                return len(await users_of(env, owner)) == 1

            await eventually(ran)
            proxy.cut()
            await asyncio.sleep(0.3)
            proxy.restore()
            reply = ok(await asyncio.wait_for(call, 20))

    assert [reply.smtp_user_name] == await users_of(env, owner)


@ON_SQLITE
async def test_concurrent_calls_each_get_their_own_reply(env: Env, client: Client) -> None:
    owner = await env.new_owner()
    names = [f"c{i}" for i in range(30)]

    replies = await asyncio.gather(*(client.settings_channel_get(owner, name=n) for n in names))

    assert [{"missing": [name]} for name in names] == [
        reply.error.details for reply in replies if isinstance(reply, ErrorReply)
    ]


@ON_SQLITE
async def test_a_call_gets_no_reply_in_time_raises_no_reply(env: Env, client: Client) -> None:
    while env.workers:  # the queues stay, nobody consumes them
        await env.workers.pop().stop()

    with pytest.raises(NoReply, match=r"no reply within 0\.5 s"):
        await client.call("settings.smtp_user.list", {}, {}, timeout=0.5)


async def test_a_call_on_a_prefix_no_worker_ran_with_raises_no_worker(amqp_url: str) -> None:
    prefix = f"nobody{uuid.uuid4().hex[:10]}"

    async with Client(amqp_url, prefix=prefix) as client:
        with pytest.raises(NoWorker, match=f"no exchange {prefix}.commands"):
            await client.call("settings.smtp_user.list", {}, {})


# --- connecting -----------------------------------------------------------------------------------


@ON_SQLITE
async def test_the_client_uses_the_first_node_of_a_list_that_answers(env: Env) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    owner = await env.new_owner()

    async with Client(f"{dead}, {env.amqp_url}", prefix=env.settings.prefix) as client:
        reply = await client.settings_smtp_user_list(owner)

    assert [] == ok(reply).smtp_list


@ON_SQLITE
async def test_the_nodes_may_be_given_as_a_list(env: Env) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    owner = await env.new_owner()

    async with Client([dead, env.amqp_url], prefix=env.settings.prefix) as client:
        reply = await client.settings_smtp_user_list(owner)

    assert isinstance(reply, SuccessReply)


async def test_no_node_answering_raises_broker_unreachable_without_the_password() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    urls = ",".join(f"amqp://guest:{password}@127.0.0.1:{closed_port()}/" for _ in range(2))

    with pytest.raises(BrokerUnreachable) as raised:
        await Client(urls).connect()

    assert password not in str(raised.value)
    assert 2 == str(raised.value).count("127.0.0.1:")


# --- events ---------------------------------------------------------------------------------------


@ON_SQLITE
async def test_events_streams_the_ticket_events_of_a_scenario_typed_and_in_order(
    env: Env, client: Client, smtp: SmtpServer
) -> None:
    from tests.support.world import configure  # noqa: PLC0415 - only this test needs a configured owner

    world = await configure(env, smtp)
    async with client.events("ticket.*") as events:
        sid = await world.new_ticket()
        await world.ok("hit.new", {"sid": sid, "hit": {"summary": "again"}})
        for type_ in ("ticket.ack", "ticket.unack", "ticket.close"):
            await world.ok(type_, {"sid": sid})
        await smtp.wait_for(2)  # the emails went out: email.sent was published meanwhile
        seen = [await asyncio.wait_for(anext(events), 10) for _ in range(4)]

    assert [
        e.TicketCreatedEvent,
        e.TicketAckedEvent,
        e.TicketUnackedEvent,
        e.TicketClosedEvent,
    ] == [type(event) for event in seen]
    assert {sid} == {event.data.sid for event in seen}
    assert {world.owner["owner_id"]} == {event.owner_id for event in seen}
    assert ("Disk full", "medium") == (seen[0].data.title, seen[0].data.severity)


@ON_SQLITE
async def test_an_event_stream_sees_no_event_outside_its_patterns(env: Env, client: Client) -> None:
    owner = await env.new_owner()
    async with client.events("smtp_user.deleted") as events:
        user = ok(await client.settings_smtp_user_add(owner, total_limit=1, hourly_limit=1))
        ok(await client.settings_smtp_user_delete(owner, smtp_user_name=user.smtp_user_name))
        event = await asyncio.wait_for(anext(events), 10)

    assert isinstance(event, e.SmtpUserDeletedEvent)
    assert user.smtp_user_name == event.data.smtp_user_name


@ON_SQLITE
async def test_an_event_stream_ends_once_closed(env: Env, client: Client) -> None:
    events = client.events()
    await events.start()

    await events.close()

    assert [] == [event async for event in events]


@ON_SQLITE
async def test_an_event_stream_whose_connection_breaks_raises_connection_lost(env: Env) -> None:
    broker = URL(env.amqp_url)
    with Proxy(broker.port or 5672, broker.host or "127.0.0.1") as proxy:
        url = str(broker.with_host(proxy.host).with_port(proxy.port))
        async with Client(url, prefix=env.settings.prefix) as client:
            events = client.events()
            await events.start()
            proxy.cut()

            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(anext(events), 10)
            with pytest.raises(ConnectionLost):  # and again: it does not hang
                await asyncio.wait_for(anext(events), 10)


async def test_events_on_a_prefix_no_worker_ran_with_raise_no_worker(amqp_url: str) -> None:
    prefix = f"nobody{uuid.uuid4().hex[:10]}"

    async with Client(amqp_url, prefix=prefix) as client:
        with pytest.raises(NoWorker, match=f"no exchange {prefix}.events"):
            await client.events("#").start()
