"""The `smtp-worker` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
import structlog

from worker import contract, demo, logs
from worker.app import ALL_QUEUES, Worker, keyring_for
from worker.broker import Names
from worker.client import (
    BrokerUnreachable,
    Client,
    ConnectionLost,
    EventStream,
    NoReply,
    NoWorker,
    Unroutable,
)
from worker.config import Settings
from worker.dead import DeadLetterError, list_dead, replay_dead
from worker.errors import BrokerUnavailable
from worker.handlers import RouterMismatch
from worker.http import HttpAddressError
from worker.owners import create_owner
from worker.store import Store, migrate


async def _run(settings: Settings, queues: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        worker = Worker(settings, queues)
        await worker.start()
    except (HttpAddressError, BrokerUnavailable, RouterMismatch) as exc:
        # BrokerUnavailable: no node answered for 30 s; it names them by host:port only.
        print(f"smtp-worker: {exc}", file=sys.stderr)
        return 1
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
    store = Store(settings.database_url)
    try:
        owner_id, token = await create_owner(store, keyring_for(settings), name)
    finally:
        await store.close()
    print(json.dumps({"owner_id": owner_id, "token": token}))
    return 0


async def _call(settings: Settings, type_: str, auth: Any, data: Any, timeout: float) -> int:
    try:
        async with Client(settings.amqp_url, prefix=settings.prefix) as client:
            reply = await client.call(type_, auth, data, timeout=timeout)
    except (NoWorker, NoReply, Unroutable, BrokerUnreachable) as exc:
        # No reply came, or none can: a script must not read this as the worker's refusal.
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 2
    print(json.dumps(reply.model_dump(mode="json", by_alias=True), indent=2))
    return 0 if reply.status == "success" else 1


async def _events(settings: Settings, patterns: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def tail(stream: EventStream) -> None:
        async for event in stream:
            try:
                print(event.model_dump_json(by_alias=True), flush=True)
            except BrokenPipeError:
                # The reader left (`smtp-worker events | head`): stop as if interrupted, and
                # let nothing flush to the closed pipe at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return

    try:
        async with (
            Client(settings.amqp_url, prefix=settings.prefix) as client,
            client.events(*patterns) as stream,
        ):
            structlog.get_logger("worker.cli").info("events.listening", patterns=stream.patterns)
            printing = asyncio.ensure_future(tail(stream))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((printing, stopping), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if printing.done():
                printing.result()  # the stream broke: say why below
            else:
                printing.cancel()
    except (NoWorker, BrokerUnreachable) as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 2
    except ConnectionLost as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 1
    return 0


def _asyncapi(write: bool, check: bool, directory: Path) -> int:
    if check:
        stale = contract.differences(directory)
        for path in stale:
            print(f"outdated: {path}", file=sys.stderr)
        return 1 if stale else 0
    if write:
        for path in contract.write(directory):
            print(f"wrote {path}")
        return 0
    print(contract.render()[contract.ASYNCAPI], end="")
    return 0


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


def _relay_arg(text: str) -> tuple[str, int]:
    try:
        return demo.parse_relay(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


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
    events = sub.add_parser(
        "events", help="print events as they are published, one JSON line each, until stopped"
    )
    events.add_argument(
        "patterns", nargs="*", default=["#"], metavar="PATTERN", help="topic pattern (default: #)"
    )
    asyncapi = sub.add_parser("asyncapi", help="print the AsyncAPI document of the contract")
    what = asyncapi.add_mutually_exclusive_group()
    what.add_argument(
        "--write",
        action="store_true",
        help="write asyncapi.yaml and the JSON Schemas of json/ into the directory instead",
    )
    what.add_argument(
        "--check", action="store_true", help="exit 1 when the files in the directory are outdated"
    )
    asyncapi.add_argument(
        "--directory",
        type=Path,
        default=contract.DIRECTORY,
        help=f"where the files are (default: {contract.DIRECTORY})",
    )
    sub.add_parser("migrate", help="bring the store's schema up to date")
    show = sub.add_parser(
        "demo",
        help="set up an owner, send a ticket and two hits, and show the threaded emails",
        description=(
            "Creates an owner, email settings for the relay, a channel, an SMTP user, a ticket "
            "and two hits, then acks the ticket, printing each step and each email's outcome. "
            "It needs a worker on the same broker, prefix and store: one already running, or "
            "one it starts itself with --with-worker. Without --relay it serves SMTP itself "
            "on 127.0.0.1 and prints the emails as they arrive."
        ),
    )
    show.add_argument(
        "--relay",
        type=_relay_arg,
        default=None,
        metavar="HOST:PORT",
        help="the SMTP server the emails go through (default: one of the demo's own)",
    )
    show.add_argument(
        "--relay-ui", default=None, metavar="URL", help="where the relay shows its emails"
    )
    show.add_argument(
        "--with-worker",
        action="store_true",
        help="run a worker in this process for the demo's length",
    )
    show.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
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
    level = settings.log_level
    if args.command == "demo" and "log_level" not in settings.model_fields_set:
        level = "WARNING"  # the demo's own lines are the show; a worker it runs stays quiet
    logs.configure(level, settings.log_format)
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
    elif args.command == "demo":
        options = demo.Options(args.relay, args.relay_ui, args.with_worker, args.timeout)
        code = demo.main(settings, options)
    elif args.command == "events":
        code = asyncio.run(_events(settings, args.patterns))
    elif args.command == "asyncapi":
        code = _asyncapi(args.write, args.check, args.directory)
    else:
        code = asyncio.run(_call(settings, args.type, args.auth, args.data, args.timeout))
    sys.exit(code)
