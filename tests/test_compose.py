"""compose.yaml: the stack a user with Docker starts. No Docker engine runs here, so the file is
read as Compose reads it and checked against what the worker needs; its workers' health check is
run for real against a worker of the test's own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from tests.support.environment import Env
from worker.app import Worker
from worker.config import Settings

ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
WORKERS = ("worker-1", "worker-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def services(compose: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = compose["services"]
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in service["environment"].items()}


def healthy(service: dict[str, Any], *names: str) -> bool:
    return all(service["depends_on"][name] == {"condition": "service_healthy"} for name in names)


def test_the_stack_has_a_broker_a_store_an_smtp_server_two_workers_and_a_demo(compose):
    assert {"rabbitmq", "postgres", "mailpit", *WORKERS, "demo"} == set(services(compose))
    assert services(compose)["rabbitmq"]["image"].endswith("-management")
    assert "15672:15672" in services(compose)["rabbitmq"]["ports"]
    assert services(compose)["mailpit"]["image"].startswith("axllent/mailpit")
    assert {"1025:1025", "8025:8025"} <= set(services(compose)["mailpit"]["ports"])


@pytest.mark.parametrize("name", WORKERS)
def test_each_worker_runs_on_postgresql_and_serves_http_to_the_network(compose, name):
    worker = services(compose)[name]
    variables = environment(worker)

    assert ["smtp-worker", "run"] == worker["command"]
    assert variables["SMTP_WORKER_DATABASE_URL"].startswith(
        "postgresql+asyncpg://postgres@postgres"
    )
    assert "@rabbitmq:5672/" in variables["SMTP_WORKER_AMQP_URL"]
    assert "0.0.0.0:9464" == variables["SMTP_WORKER_HTTP"]
    assert healthy(worker, "rabbitmq", "postgres")


def test_every_worker_and_the_demo_share_one_secret_key(compose):
    keys = {environment(services(compose)[name])["SMTP_WORKER_SECRET_KEY"] for name in WORKERS}

    assert {environment(services(compose)["demo"])["SMTP_WORKER_SECRET_KEY"]} == keys


def test_every_variable_is_a_setting_the_worker_reads(compose):
    for name in (*WORKERS, "demo"):
        variables = environment(services(compose)[name])
        fields = {v.removeprefix("SMTP_WORKER_").lower() for v in variables}
        assert set() == fields - set(Settings.model_fields), name


@pytest.mark.parametrize("name", WORKERS)
def test_the_workers_may_relay_through_mailpit_on_the_stack_network(compose, name):
    (network,) = compose["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(network["subnet"])
    settings = Settings(
        relay_allow=environment(services(compose)[name])["SMTP_WORKER_RELAY_ALLOW"], http=""
    )

    assert any(subnet.subnet_of(allowed) for allowed in settings.relay_allow)
    # Nothing beyond the stack's own network is let through.
    assert all(allowed.subnet_of(subnet) for allowed in settings.relay_allow)


@pytest.mark.parametrize("name", WORKERS)
def test_each_worker_has_a_health_check_on_readyz(compose, name):
    check = services(compose)[name]["healthcheck"]

    assert ["CMD", "python", "-c"] == check["test"][:3]
    assert "http://127.0.0.1:9464/readyz" in check["test"][3]


def test_the_demo_runs_once_through_mailpit_when_both_workers_are_ready(compose):
    demo = services(compose)["demo"]

    assert ["smtp-worker", "demo", "--relay", "mailpit:1025"] == demo["command"][:4]
    assert healthy(demo, *WORKERS)
    assert "no" == demo["restart"]


async def run_health_check(compose: dict[str, Any], worker: Worker) -> int:
    """The workers' health check, run as the container runs it, aimed at `worker`'s port."""
    assert worker.http is not None
    _, python, *arguments = services(compose)["worker-1"]["healthcheck"]["test"]
    assert "python" == python
    arguments = [a.replace(":9464/", f":{worker.http.port}/") for a in arguments]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


@ON_SQLITE
async def test_the_health_check_passes_only_while_the_worker_is_ready(compose, env: Env):
    worker = await env.start_worker(http="127.0.0.1:0")

    ready = await run_health_check(compose, worker)
    await worker.broker.stop_consuming()
    not_consuming = await run_health_check(compose, worker)

    assert (0, 1) == (ready, not_consuming)
