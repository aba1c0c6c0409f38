"""The `smtp-worker` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
from sqlalchemy import insert

from worker import logs
from worker.app import ALL_QUEUES, Worker, keyring_for
from worker.broker import Names
from worker.config import Settings
from worker.dead import DeadLetterError, list_dead, replay_dead
from worker.security import new_id, new_token
from worker.store import Store, migrate
from worker.store.tables import owners


async def _run(settings: Settings, queues: list[str]) -> int:
    worker = Worker(settings, queues)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    try:
        await stop.wait()
    finally:
        await worker.stop()
    return 0


async def _migrate(settings: Settings) -> int:
    store = Store(settings.database_url)
    try:
        await migrate(store)
    finally:
        await store.close()
    return 0


async def _owner_create(settings: Settings, name: str) -> int:
    keyring = keyring_for(settings)
    store = Store(settings.database_url)
    owner_id, token = new_id(), new_token()
    try:
        await migrate(store)
        async with store.transaction() as conn:
            await conn.execute(
                insert(owners).values(
                    id=owner_id,
                    name=name,
                    token_hash=keyring.hash(token),
                    created_at=datetime.now(UTC),
                )
            )
    finally:
        await store.close()
    print(json.dumps({"owner_id": owner_id, "token": token}))
    return 0


async def _call(settings: Settings, type_: str, auth: Any, data: Any, timeout: float) -> int:
    body = json.dumps({"type": type_, "auth": auth, "data": data}).encode()
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_queue.consume(replies.put, no_ack=True)
        message_id = uuid.uuid4().hex
        commands = Names(settings.prefix).commands
        exchange = await channel.get_exchange(commands, ensure=False)
        try:
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message_id,
                    reply_to="amq.rabbitmq.reply-to",
                ),
                routing_key=type_,
            )
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # No worker ever ran with this prefix: no reply can come, however long one waits.
            error = f"no exchange {commands}: no worker has run with this prefix"
            print(json.dumps({"error": error}), file=sys.stderr)
            return 2
        try:
            while True:
                reply = await asyncio.wait_for(replies.get(), timeout)
                if reply.correlation_id == message_id:
                    break
        except TimeoutError:
            print(json.dumps({"error": f"no reply within {timeout} s"}), file=sys.stderr)
            return 2
    finally:
        await connection.close()
    parsed = json.loads(reply.body)
    print(json.dumps(parsed, indent=2))
    return 0 if parsed.get("status") == "success" else 1


async def _dead(settings: Settings, action: str, limit: int | None) -> int:
    names = Names(settings.prefix)
    try:
        if action == "list":
            await list_dead(settings.amqp_url, names, _print_line, limit)
            return 0
        summary = await replay_dead(settings.amqp_url, names, limit)
    except (DeadLetterError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
        print(json.dumps({"error": str(exc) or type(exc).__name__}), file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()))
    # Not everything asked for could be replayed: say so to scripts too.
    return 1 if summary.skipped else 0


def _print_line(value: Any) -> None:
    print(json.dumps(value), flush=True)


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtp-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one worker process")
    run.add_argument(
        "--queues",
        default=",".join(ALL_QUEUES),
        help=f"comma-separated queues to consume (default: {','.join(ALL_QUEUES)})",
    )
    owner = sub.add_parser("owner", help="manage owners").add_subparsers(
        dest="action", required=True
    )
    create = owner.add_parser("create", help="create an owner and print its id and token")
    create.add_argument("--name", required=True)
    call = sub.add_parser("call", help="publish one command and print its reply")
    call.add_argument("type")
    call.add_argument("--auth", type=_json_arg, required=True)
    call.add_argument("--data", type=_json_arg, required=True)
    call.add_argument("--timeout", type=float, default=30.0)
    sub.add_parser("migrate", help="bring the store's schema up to date")
    dead = sub.add_parser("dead", help="what sits in P.dead").add_subparsers(
        dest="action", required=True
    )
    dead_list = dead.add_parser(
        "list", help="print one JSON line per message in P.dead, leaving them there"
    )
    dead_list.add_argument("--limit", type=_positive_int, default=None)
    replay = dead.add_parser(
        "replay", help="republish messages of P.dead to where they came from, head first"
    )
    replay.add_argument("--limit", type=_positive_int, default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "run":
        queues = [q.strip() for q in args.queues.split(",") if q.strip()]
        unknown = sorted(set(queues) - set(ALL_QUEUES))
        if unknown:
            sys.exit(f"smtp-worker: unknown queues: {', '.join(unknown)}")
        code = asyncio.run(_run(settings, queues))
    elif args.command == "migrate":
        code = asyncio.run(_migrate(settings))
    elif args.command == "owner":
        code = asyncio.run(_owner_create(settings, args.name))
    elif args.command == "dead":
        code = asyncio.run(_dead(settings, args.action, args.limit))
    else:
        code = asyncio.run(_call(settings, args.type, args.auth, args.data, args.timeout))
    sys.exit(code)
