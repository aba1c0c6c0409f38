"""`smtp-worker demo`: an owner's whole setup, then a ticket and its hits, end to end.

    owner create -> settings.email.create (the relay) -> settings.channel.put
    -> settings.smtp_user.add -> ticket.new -> (its email sent) -> hit.new, hit.new
    -> (their emails, threaded under the ticket's) -> ticket.ack

It talks to a worker like any upstream service does, over the broker: one already running on the
same broker, prefix and store (`smtp-worker run`, or the compose stack's workers), or one it
starts in its own process with `--with-worker`. It writes the owner to the store itself, as
`smtp-worker owner create` does, so it needs the workers' DATABASE_URL and SECRET_KEY too.

Without `--relay` it serves SMTP itself on 127.0.0.1 and prints each email as it arrives. A worker
connects there only when its SMTP_WORKER_RELAY_ALLOW admits 127.0.0.1 (`--with-worker` sees to
that). Secrets (the owner's token, the SMTP user's password) are used, never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.app import Worker, keyring_for
from worker.broker import Names
from worker.config import Settings
from worker.connection import NoNodeAnswered, open_first
from worker.http import HttpAddressError
from worker.owners import create_owner
from worker.store import Store, display_url

RECIPIENT = "oncall@example.com"
_LOOPBACK = ipaddress.ip_network("127.0.0.1/32")


class DemoFailed(Exception):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Options:
    relay: tuple[str, int] | None
    relay_ui: str | None
    with_worker: bool
    timeout: float


def parse_relay(value: str) -> tuple[str, int]:
    host, colon, port = value.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {value}")
    return host, int(port)


async def run(settings: Settings, options: Options) -> int:
    try:
        async with contextlib.AsyncExitStack() as stack:
            await _demo(settings, options, stack)
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", flush=True)
        return 1
    return 0


async def _demo(settings: Settings, options: Options, stack: contextlib.AsyncExitStack) -> None:
    say(f"smtp-worker demo on prefix {settings.prefix!r}")
    if options.relay is None:
        relay = await stack.enter_async_context(_printing_relay())
        say(f"relay: the demo's own SMTP server on {relay[0]}:{relay[1]}")
    else:
        relay = options.relay
        say(f"relay: {relay[0]}:{relay[1]}")
    http = settings.http or None
    if options.with_worker:
        http = await _start_worker(settings, options, stack)

    store = Store(settings.database_url)
    try:
        owner_id, token = await create_owner(store, keyring_for(settings), "smtp-worker demo")
    finally:
        await store.close()
    step("owner create", f"owner {owner_id}")
    client = await stack.enter_async_context(_Client.connect(settings, options.timeout))
    domain, login = await _configure(client, {"owner_id": owner_id, "token": token}, relay)

    ticket = {"title": "Disk full on db-1", "body": "/var is 97% full.", "severity": "high"}
    sid = (await client.ok("ticket.new", login, {"channel": "demo", "ticket": ticket}))["sid"]
    step("ticket.new", f"ticket {sid}: {ticket['title']!r}")
    # The ticket's email first, so that a mailbox shows the thread's start before its replies.
    await client.email_outcome(sid, None, relay_hint=options.relay is None)
    for seq, summary in enumerate(("97% -> 98%", "98% -> 99%"), start=1):
        data = {"sid": sid, "hit": {"summary": f"Disk full again: {summary}"}}
        await client.ok("hit.new", login, data)
        step("hit.new", f"hit {seq} on ticket {sid}")
    for seq in (1, 2):
        await client.email_outcome(sid, seq, relay_hint=options.relay is None)
    await client.ok("ticket.ack", login, {"sid": sid})
    step("ticket.ack", "acknowledged: later hits are stored and send no email")
    _where_to_look(settings, options, relay, domain, sid, http)


async def _start_worker(
    settings: Settings, options: Options, stack: contextlib.AsyncExitStack
) -> str | None:
    """A worker in this process, allowed to reach the demo's own relay; its HTTP address."""
    if options.relay is None and not any(_LOOPBACK[0] in n for n in settings.relay_allow):
        settings = settings.model_copy(update={"relay_allow": (*settings.relay_allow, _LOOPBACK)})
    try:
        worker = Worker(settings)
        await worker.start()
    except HttpAddressError as exc:
        raise DemoFailed(str(exc)) from exc
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise DemoFailed(f"the worker cannot start: {exc}") from exc
    stack.push_async_callback(worker.stop)
    say("worker: started in this process, consuming every queue")
    if worker.http is None:
        return None
    return f"{worker.http.host or '127.0.0.1'}:{worker.http.port}"


async def _configure(
    client: _Client, owner: dict[str, str], relay: tuple[str, int]
) -> tuple[str, dict[str, str]]:
    """Email settings for a new domain, channel `demo`, an SMTP user: the domain and its login."""
    domain = f"demo-{secrets.token_hex(3)}.example.com"
    await client.ok(
        "settings.email.create",
        owner,
        {
            "domain": domain,
            "provider": "smtp",
            "from": f"Demo alerts <alerts@{domain}>",
            "options": {"host": relay[0], "port": relay[1], "timeout": 10},
        },
    )
    step("settings.email.create", f"{domain} sends through {relay[0]}:{relay[1]}")
    channel = {"name": "demo", "domain": domain, "recipients": [RECIPIENT]}
    await client.ok("settings.channel.put", owner, channel)
    step("settings.channel.put", f"channel demo emails {RECIPIENT}")
    limits = {"total_limit": 100, "hourly_limit": 100}
    user = await client.ok("settings.smtp_user.add", owner, limits)
    step("settings.smtp_user.add", f"SMTP user {user['smtp_user_name']}")
    return domain, {"login": user["smtp_user_name"], "password": user["smtp_password"]}


def _where_to_look(
    settings: Settings,
    options: Options,
    relay: tuple[str, int],
    domain: str,
    sid: str,
    http: str | None,
) -> None:
    names = Names(settings.prefix)
    say("\nWhere to look:")
    if options.relay is None:
        say("  the emails:   printed above, as the demo's SMTP server received them")
    elif options.relay_ui:
        say(f"  the emails:   {options.relay_ui} (three, threaded under {sid}@{domain})")
    else:
        say(f"  the emails:   in the mailbox behind {relay[0]}:{relay[1]}")
    say(f"  the ticket:   row {sid} of the tickets table ({display_url(settings.database_url)})")
    queues = ", ".join(names.queue(short) for short in ("tickets", "hits", "deliveries", "dead"))
    say(f"  the broker:   queues {queues} (RabbitMQ's management UI, port 15672)")
    if http is not None:
        say(f"  the worker:   http://{http}/metrics and /readyz (SMTP_WORKER_HTTP)")


def say(text: str) -> None:
    print(text, flush=True)


def step(command: str, what: str) -> None:
    say(f"  {command:<24} {what}")


# --- the broker side: commands, replies, events ---------------------------------------------------


class _Client:
    """Publishes commands, waits for their replies, and collects the email events of the run."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.timeout = timeout
        self.replies: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.outcomes: dict[tuple[str, int | None], dict[str, Any]] = {}
        self.changed = asyncio.Event()
        self.commands: aio_pika.abc.AbstractExchange | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings, timeout: float) -> AsyncIterator[_Client]:
        client = cls(settings, timeout)
        try:
            connection = await open_first(settings.amqp_url)
        except NoNodeAnswered as exc:
            raise DemoFailed(f"cannot reach the broker: {exc}") from exc
        try:
            channel = await connection.channel()
            try:
                client.commands = await channel.get_exchange(client.names.commands, ensure=True)
                events = await channel.get_exchange(client.names.events, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                raise DemoFailed(
                    f"no worker has run with the prefix {settings.prefix!r} on this broker: "
                    "start one (smtp-worker run), or pass --with-worker"
                ) from exc
            replies = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await replies.consume(client._on_reply, no_ack=True)
            outcomes = await channel.declare_queue(exclusive=True, auto_delete=True)
            for type_ in ("email.sent", "email.failed"):
                await outcomes.bind(events, type_)
            await outcomes.consume(client._on_event, no_ack=True)
            yield client
        finally:
            await connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.replies.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        data = json.loads(message.body)["data"]
        self.outcomes[(data["sid"], data["seq"])] = json.loads(message.body)
        self.changed.set()

    async def ok(self, type_: str, auth: dict[str, str], data: Any) -> Any:
        """Sends one command; returns its reply's `data`, or stops the demo on an error."""
        message_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.replies[message_id] = future
        body = json.dumps({"type": type_, "auth": auth, "data": data}).encode()
        assert self.commands is not None
        await self.commands.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                reply_to="amq.rabbitmq.reply-to",
            ),
            routing_key=type_,
        )
        try:
            reply = json.loads((await asyncio.wait_for(future, self.timeout)).body)
        except TimeoutError as exc:
            raise DemoFailed(
                f"no reply to {type_} within {self.timeout:g} s: is a worker running on the same "
                f"broker with the prefix {self.settings.prefix!r}? Start one (smtp-worker run) "
                "with the same SMTP_WORKER_* settings, or pass --with-worker"
            ) from exc
        if reply["status"] != "success":
            error = reply["error"]
            raise DemoFailed(f"{type_} was refused: {error['name']}: {error['message']}")
        return reply["data"]

    async def email_outcome(self, sid: str, seq: int | None, *, relay_hint: bool) -> None:
        """Waits for the email of a ticket (`seq` None) or hit to be sent; says how it went."""
        what = "ticket" if seq is None else f"hit {seq}"
        try:
            async with asyncio.timeout(self.timeout):
                while (sid, seq) not in self.outcomes:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError as exc:
            raise DemoFailed(f"the {what}'s email was not sent within {self.timeout:g} s") from exc
        event = self.outcomes[(sid, seq)]
        data = event["data"]
        if event["type"] == "email.sent":
            step("  email.sent", f"{what}: {data['message_id']}, attempt {data['attempts']}")
            return
        hint = ""
        if relay_hint:
            hint = (
                "; a worker reaches the demo's own SMTP server only when "
                "SMTP_WORKER_RELAY_ALLOW includes 127.0.0.1 (or pass --with-worker)"
            )
        raise DemoFailed(f"the {what}'s email failed: {data['error']}{hint}")


# --- the demo's own SMTP server ------------------------------------------------------------------


class _Printer:
    """aiosmtpd handler: prints each email's threading headers as it arrives."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        raw = envelope.original_content or b""
        message = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        self.count += 1
        say(f"    --- email {self.count}, received by the demo's SMTP server")
        for header in ("From", "To", "Subject", "Message-ID", "In-Reply-To"):
            value = message[header]
            say(f"    {header + ':':<13}{value if value is not None else '-'}")
        return "250 OK"


@contextlib.asynccontextmanager
async def _printing_relay() -> AsyncIterator[tuple[str, int]]:
    """An SMTP server on 127.0.0.1 that prints what it receives; yields its address."""
    printer = _Printer()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(printer, hostname="smtp-worker-demo"), "127.0.0.1", 0
    )
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()


def main(settings: Settings, options: Options) -> int:
    return asyncio.run(run(settings, options))
