"""What the tests (and the benchmarks) share; `tests/conftest.py` builds its fixtures on it.

    environment     a test's settings, in-process workers, client and store (Env, running_env)
    client          the raw RPC client the tests use
    broker          queue depths, readiness and clean-up of a prefix's topology
    logs            captured log lines, events and secrets, and the end-of-run secret scan
    polling         waiting until something holds
    tenants         owners, and their email settings, channels and SMTP users
    world           a configured owner, ready to send tickets
    databases       throwaway PostgreSQL databases
    smtp_servers    real SMTP servers (aiosmtpd) and TCP peers that are none
    silent_relay    a relay that never says a word
    payloads        command data the settings tests share
    hostile         hostile text, and reading an email as a mail client does
    http_client     a bare HTTP/1.1 client for the worker's endpoints
    commandline     `smtp-worker` as a user runs it
    processes       `smtp-worker run` in a process of its own
    load, rig       the fault scenarios' load client and world
    cluster, proxy  private RabbitMQ nodes and TCP proxies of the fault scenarios

The benchmarks import this package; nothing here imports the benchmarks.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The project's folder."""
