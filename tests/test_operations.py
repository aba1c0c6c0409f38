"""Operations (contract section 9): `/metrics`, `/healthz`, `/readyz` on SMTP_WORKER_HTTP.

Each test's worker serves HTTP on a free port of 127.0.0.1 (`SMTP_WORKER_HTTP=127.0.0.1:0`) and
is the only worker of its prefix, so what its metrics count is what the test did. Only what
depends on the store runs on both stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text

from tests.support.commandline import smtp_worker
from tests.support.environment import Env
from tests.support.http_client import get, request, sample, scrape
from tests.support.logs import SECRET_KEY
from tests.support.polling import eventually
from tests.support.proxy import Proxy
from tests.support.smtp_servers import SmtpServer, silent_port
from tests.support.world import World, configure
from worker.app import Worker
from worker.broker import DELIVERY_LIMIT
from worker.http import MAX_REQUEST_BYTES, REQUEST_TIMEOUT

ON_POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
async def worker(env: Env) -> Worker:
    """The test's only worker, serving HTTP on a free port; a test asks for it before `world`,
    whose settings it then counts."""
    while env.workers:
        await env.workers.pop().stop()
    return await env.start_worker(http="127.0.0.1:0")


def port_of(worker: Worker) -> int:
    assert worker.http is not None
    return worker.http.port


async def commands_counted(worker: Worker, type_: str, outcome: str) -> float | None:
    """smtp_worker_commands_total{type, outcome} as the worker's /metrics shows it now."""
    samples = await scrape(port_of(worker))
    return sample(samples, "smtp_worker_commands_total", type=type_, outcome=outcome)


def through(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port` (a proxy's)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.asynccontextmanager
async def worker_behind_proxy(
    env: Env, setting: str, default_port: int
) -> AsyncIterator[tuple[Worker, Proxy]]:
    """The test's worker with `setting` (amqp_url or database_url) through a proxy, ready.

    Stops the worker once the test's block is done with it.
    """
    url: str = getattr(env, setting)
    with Proxy(urlsplit(url).port or default_port) as proxy:
        worker = await env.start_worker(http="127.0.0.1:0", **{setting: through(url, proxy.port)})
        assert 200 == (await get(port_of(worker), "/readyz")).status
        yield worker, proxy
        await env.workers.pop().stop()


async def ready_becomes(port: int, status: int, timeout: float) -> dict[str, object]:
    """Polls /readyz until it answers `status`; returns that answer's body."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await get(port, "/readyz")
        if answer.status == status:
            body: dict[str, object] = answer.json()
            return body
        assert time.monotonic() < deadline, f"/readyz still {answer.status}: {answer.body!r}"
        await asyncio.sleep(0.2)


# --- /metrics -----------------------------------------------------------------------------------


async def test_metrics_count_a_ticket_and_its_email_sent(
    env: Env, worker: Worker, world: World
) -> None:
    await world.new_ticket()
    await env.client.wait_events("email.sent")

    samples = await scrape(port_of(worker))

    commands = "smtp_worker_commands_total"
    assert 1 == sample(samples, commands, type="ticket.new", outcome="success")
    assert 1 == sample(samples, commands, type="settings.email.create", outcome="success")
    assert 1 == sample(samples, "smtp_worker_command_duration_seconds_count", type="ticket.new")
    assert 1 == sample(samples, "smtp_worker_emails_total", outcome="sent")
    assert 0 == sample(samples, "smtp_worker_emails_total", outcome="failed")
    assert 1 == sample(samples, "smtp_worker_email_duration_seconds_count")
    # The pool keeps the relay's connection open for the next email.
    assert 1 == sample(samples, "smtp_worker_relay_connections")


@ON_SQLITE
async def test_metrics_count_a_duplicate_and_a_poison_requeued_until_dead_lettered(
    env: Env, worker: Worker, world: World
) -> None:
    message_id = uuid.uuid4().hex
    sid = (await world.ok("ticket.new", world.ticket_data(), message_id=message_id))["sid"]
    repeat = await world.ok("ticket.new", world.ticket_data(), message_id=message_id)
    await world.ok("hit.new", {"sid": sid, "hit": {"summary": "first"}})
    # A broken row, as a bad manual fix would leave: every hit.new on it collides with hit 1.
    async with env.store.transaction() as conn:
        await conn.execute(text("UPDATE tickets SET hit_count = 0 WHERE sid = :sid"), {"sid": sid})

    poison = await world.call("hit.new", {"sid": sid, "hit": {"summary": "again"}}, timeout=60)

    assert sid == repeat["sid"]
    assert "GeneralError" == poison["error"]["name"]
    assert 1 == await commands_counted(worker, "ticket.new", "duplicate")
    assert 1 == await commands_counted(worker, "ticket.new", "success")
    assert 1 == await commands_counted(worker, "hit.new", "success")

    async def dead_lettered() -> bool:
        return 1 == await commands_counted(worker, "hit.new", "dead_lettered")

    await eventually(dead_lettered, timeout=10)  # the reject follows the reply
    # The first delivery, and one more for each return the delivery limit allows.
    assert DELIVERY_LIMIT == await commands_counted(worker, "hit.new", "requeued")


@ON_SQLITE
async def test_metrics_show_an_email_in_flight_retried_then_failed(
    env: Env, worker: Worker, smtp: SmtpServer
) -> None:
    with silent_port() as port:
        # A relay that accepts the connection and never greets: each attempt times out in 1 s.
        options = {"host": "127.0.0.1", "port": port, "timeout": 1}
        world = await configure(env, smtp, options=options)
        await world.new_ticket()

        async def sending() -> bool:
            samples = await scrape(port_of(worker))
            return 1 == sample(samples, "smtp_worker_in_flight", queue="deliveries")

        await eventually(sending, timeout=10)
        (failed,) = await env.client.wait_events("email.failed", timeout=30)

    samples = await scrape(port_of(worker))
    emails = "smtp_worker_emails_total"
    assert 3 == failed["data"]["attempts"]
    assert 2 == sample(samples, emails, outcome="retried")  # RETRY_DELAYS holds two delays
    assert 1 == sample(samples, emails, outcome="failed")
    assert 0 == sample(samples, emails, outcome="sent")
    assert 0 == sample(samples, "smtp_worker_email_duration_seconds_count")


@ON_SQLITE
async def test_metrics_count_a_relay_probe_answered_as_a_success_not_requeued(
    env: Env, worker: Worker, world: World
) -> None:
    # The command consumer hands the probe to P.probes and acks the command: no message of it
    # goes back to the broker.
    result = await env.client.ok("settings.email.test", world.owner, {"domain": world.domain})

    assert result["ok"] is True
    assert 1 == await commands_counted(worker, "settings.email.test", "success")
    samples = await scrape(port_of(worker))
    assert None is sample(
        samples, "smtp_worker_commands_total", type="settings.email.test", outcome="requeued"
    )
    duration = "smtp_worker_command_duration_seconds_count"
    assert 1 == sample(samples, duration, type="settings.email.test")


@ON_SQLITE
async def test_no_metric_label_holds_an_owner_a_login_or_an_address(
    env: Env, worker: Worker, world: World
) -> None:
    sid = await world.new_ticket()
    await world.error("ticket.get", {"sid": "no-such-" + uuid.uuid4().hex})
    await env.client.wait_events("email.sent")

    answer = await get(port_of(worker), "/metrics")

    text = answer.body.decode()
    private = [world.owner["owner_id"], world.user_name, world.domain, sid, *world.recipients]
    assert [] == [value for value in private if value in text]
    assert 1 == await commands_counted(worker, "ticket.get", "refused")


@ON_SQLITE
async def test_an_unknown_command_type_is_counted_as_unknown(env: Env, worker: Worker) -> None:
    hostile = "ticket." + uuid.uuid4().hex
    body = json.dumps({"type": hostile, "auth": {}, "data": {}}).encode()

    reply = json.loads((await env.client.call_raw(body, hostile)).body)

    assert "ValidationError" == reply["error"]["name"]
    answer = await get(port_of(worker), "/metrics")
    assert hostile not in answer.body.decode()
    assert 1 == await commands_counted(worker, "unknown", "unreadable")


@ON_SQLITE
async def test_dead_letters_show_the_depth_of_the_dead_letter_queue(
    env: Env, worker: Worker
) -> None:
    for _ in range(2):
        await env.client.call_raw(b"not json", "ticket.new")

    async def two_dead_letters() -> bool:
        return 2 == sample(await scrape(port_of(worker)), "smtp_worker_dead_letters")

    # Read from the broker at most every 5 s.
    await eventually(two_dead_letters, timeout=20)


@ON_SQLITE
async def test_metrics_are_in_the_prometheus_text_format(worker: Worker) -> None:
    answer = await get(port_of(worker), "/metrics")

    assert answer.headers["content-type"].startswith("text/plain; version=")
    assert b"# TYPE smtp_worker_commands_total counter" in answer.body
    assert b'smtp_worker_in_flight{queue="tickets"} 0.0' in answer.body


# --- /healthz and /readyz -----------------------------------------------------------------------


@ON_SQLITE
async def test_healthz_and_readyz_answer_200_while_everything_is_up(worker: Worker) -> None:
    health = await get(port_of(worker), "/healthz")
    ready = await get(port_of(worker), "/readyz")

    assert (200, {"alive": True}) == (health.status, health.json())
    assert (200, {"ready": True, "down": []}) == (ready.status, ready.json())


@pytest.mark.faults
@ON_SQLITE
async def test_readyz_names_the_broker_while_its_connection_is_cut(env: Env) -> None:
    async with worker_behind_proxy(env, "amqp_url", 5672) as (worker, proxy):
        proxy.cut()
        cut = await ready_becomes(port_of(worker), 503, timeout=10)
        assert 200 == (await get(port_of(worker), "/healthz")).status
        proxy.restore()
        restored = await ready_becomes(port_of(worker), 200, timeout=60)

        assert {"ready": False, "down": ["broker"]} == cut
        assert {"ready": True, "down": []} == restored


@pytest.mark.faults
@ON_POSTGRES
async def test_readyz_names_the_store_while_it_does_not_answer(env: Env) -> None:
    async with worker_behind_proxy(env, "database_url", 5432) as (worker, proxy):
        proxy.cut(blackhole=True)
        cut = await ready_becomes(port_of(worker), 503, timeout=10)
        proxy.restore()
        restored = await ready_becomes(port_of(worker), 200, timeout=30)

        assert {"ready": False, "down": ["store"]} == cut
        assert {"ready": True, "down": []} == restored


@ON_SQLITE
async def test_readyz_says_consumers_are_down_once_the_worker_stops_consuming(
    worker: Worker,
) -> None:
    await worker.broker.stop_consuming()

    answer = await get(port_of(worker), "/readyz")

    assert (503, {"ready": False, "down": ["consumers"]}) == (answer.status, answer.json())


# --- hostile HTTP -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405),
        (b"GET /admin HTTP/1.1\r\n\r\n", 404),
        (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n", 431),
    ],
    ids=["post", "unknown-path", "traversal", "tls-hello", "http-0.9", "huge-header"],
)
@ON_SQLITE
async def test_a_bad_request_gets_an_error_and_the_endpoints_keep_answering(
    worker: Worker, raw: bytes, status: int
) -> None:
    answer = await request(port_of(worker), raw)

    assert status == answer.status
    assert 200 == (await get(port_of(worker), "/healthz")).status


@ON_SQLITE
async def test_head_answers_without_a_body(worker: Worker) -> None:
    answer = await get(port_of(worker), "/healthz", method="HEAD")

    assert (200, b"") == (answer.status, answer.body)
    assert int(answer.headers["content-length"]) > 0


@ON_SQLITE
async def test_a_client_that_never_finishes_its_request_is_cut_off(worker: Worker) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(worker))
    writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
    await writer.drain()

    # Meanwhile another client is served at once.
    assert 200 == (await get(port_of(worker), "/healthz")).status
    assert b"" == await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT + 10)
    assert time.monotonic() - started >= REQUEST_TIMEOUT - 0.5
    writer.close()


# --- start-up -----------------------------------------------------------------------------------


@ON_SQLITE
async def test_an_address_that_is_not_host_port_stops_run_with_a_message_naming_it(
    env: Env, tmp_path: Path
) -> None:
    ran = await smtp_worker(
        "run", cwd=tmp_path, amqp_url=env.amqp_url, database_url=env.database_url,
        prefix=env.settings.prefix, secret_key=SECRET_KEY, http="localhost",
    )  # fmt: skip

    assert 0 != ran.code
    assert "SMTP_WORKER_HTTP='localhost' is not host:port" in ran.stderr
    assert "Traceback" not in ran.stderr


@ON_SQLITE
async def test_a_port_already_taken_stops_run_with_a_message_naming_the_variable(
    env: Env, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        ran = await smtp_worker(
            "run", cwd=tmp_path, amqp_url=env.amqp_url, database_url=env.database_url,
            prefix=env.settings.prefix, secret_key=SECRET_KEY, http=address,
        )  # fmt: skip

    assert 0 != ran.code
    assert f"SMTP_WORKER_HTTP={address}" in ran.stderr
    assert "Traceback" not in ran.stderr
