"""Private RabbitMQ nodes for the fault scenarios, started from this machine's installation.

A scenario that stops, kills or restarts a broker does it to nodes of its own, never to the
broker other clients use. Each node gets its own name (`<name>@localhost`), AMQP and
distribution ports, data and log folders under one temporary folder, and an Erlang cookie of
its own in a HOME of its own (rabbitmqctl finds it there too). `RABBITMQ_CONF_ENV_FILE` points
at an empty file: the system's rabbitmq-env.conf names the shared node.

    nodes = PrivateNodes(base, count=3).start()   # a three-node cluster, ~30 s
    nodes.kill(1)                                 # kill -9 of the second node
    nodes.restart(1)                              # back, with its data
    nodes.close()                                 # stop every node, remove the folder

`rabbitmq-server` is run from /usr/lib/rabbitmq/bin: the /usr/sbin wrapper switches to the
rabbitmq user, which drops the environment.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.smtp_servers import closed_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBITMQ_BIN / "rabbitmq-server"
CTL = RABBITMQ_BIN / "rabbitmqctl"
QUEUES = RABBITMQ_BIN / "rabbitmq-queues"
START_TIMEOUT = 90.0


def installed() -> bool:
    return SERVER.exists() and CTL.exists()


@dataclass
class Node:
    name: str  # e.g. swab12cd0@localhost
    port: int  # AMQP
    dist_port: int
    base: Path

    @property
    def url(self) -> str:
        """The node's AMQP URL, as the broker's default user."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def where(self) -> str:
        """The node as the worker logs it: host:port."""
        return f"127.0.0.1:{self.port}"


class PrivateNodes:
    """`count` RabbitMQ nodes of this test session, clustered when more than one."""

    def __init__(self, base: Path, count: int = 3) -> None:
        self.base = base
        self.home = base / "home"
        tag = uuid.uuid4().hex[:6]
        self.nodes = [
            Node(f"sw{tag}{index}@localhost", closed_port(), closed_port(), base / f"node{index}")
            for index in range(count)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def environment(self, node: Node) -> dict[str, str]:
        config = node.base / "rabbitmq.conf"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(node.base / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def ctl(self, node: Node, *args: str, timeout: float = 120, tool: Path = CTL) -> str:
        done = subprocess.run(
            [str(tool), "-n", node.name, *args],
            env=self.environment(node),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool.name} {' '.join(args)} on {node.name}: {done.stderr}")
        return done.stdout

    def start(self) -> PrivateNodes:
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("")
        for node in self.nodes:
            (node.base / "log").mkdir(parents=True)
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{node.port}\nloopback_users = none\n"
            )
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._await(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        return self

    def _launch(self, node: Node) -> None:
        log = (node.base / "log" / "startup.log").open("ab")
        with log:
            subprocess.run(
                [str(SERVER), "-detached"],
                env=self.environment(node),
                stdout=log,
                stderr=log,
                check=True,
                timeout=60,
            )

    def pid(self, node: Node) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((node.base / "node.pid").read_text().strip())
        return None

    def kill(self, index: int) -> None:
        """kill -9 of the node's Erlang VM: no goodbye to its clients or its peers."""
        node = self.nodes[index]
        pid = self.pid(node)
        assert pid is not None, f"no pid file for {node.name}"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (node.base / "node.pid").unlink(missing_ok=True)

    def stop(self, index: int) -> None:
        """A clean stop of the node (its VM exits)."""
        self.ctl(self.nodes[index], "stop")

    def restart(self, index: int) -> None:
        """Starts a stopped or killed node again, with its data: it rejoins the cluster."""
        node = self.nodes[index]
        self._launch(node)
        self._await(node)

    def _await(self, node: Node) -> None:
        """Until the node runs: its pid file written, then its application started."""
        pid_file = str(node.base / "node.pid")
        self.ctl(node, "wait", pid_file, "--timeout", str(int(START_TIMEOUT)))

    def await_not_quorum_critical(self, index: int, timeout: float = 60) -> None:
        """Until stopping the node would leave no quorum queue without a majority (what an
        operator checks before each step of a rolling restart)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl(self.nodes[index], "check_if_node_is_quorum_critical", tool=QUEUES)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def running(self, index: int) -> bool:
        pid = self.pid(self.nodes[index])
        return pid is not None and _alive(pid)

    def ensure_running(self) -> None:
        """Starts again any node a scenario left stopped or killed."""
        for index in range(len(self.nodes)):
            if not self.running(index):
                self.restart(index)

    def index_of(self, where: str) -> int:
        """The node whose AMQP listener is `where` (host:port, as the worker logs it)."""
        return next(i for i, node in enumerate(self.nodes) if node.where == where)

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.ctl(node, "stop", timeout=60)
            pid = self.pid(node)
            if pid is not None and _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


@contextlib.contextmanager
def private_nodes(base: Path, count: int) -> Iterator[PrivateNodes]:
    if not installed():
        pytest.skip(f"RabbitMQ is not installed here ({SERVER} not found)")
    nodes = PrivateNodes(base, count)
    try:
        yield nodes.start()
    finally:
        nodes.close()
