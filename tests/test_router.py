"""The worker's router: one handler for each command of the contract, checked at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from schemas import COMMANDS
from tests.support.environment import make_settings
from worker.app import Worker
from worker.handlers import Router, RouterMismatch, make_router, settings, tickets


def test_the_worker_has_a_handler_for_every_command_and_no_other() -> None:
    assert set(COMMANDS) == set(make_router().specs)


@pytest.mark.parametrize(
    ("router", "message"),
    [
        (Router(tickets.router), "no handler for settings.channel.delete"),
        (Router(settings.router), "no handler for hit.list"),
    ],
)
def test_a_worker_missing_a_handler_does_not_start(
    router: Router, message: str, tmp_path: Path
) -> None:
    with pytest.raises(RouterMismatch, match=re.escape(message)):
        Worker(_settings(tmp_path), router=router)


def test_a_worker_with_a_handler_for_an_unknown_command_does_not_start(tmp_path: Path) -> None:
    router = make_router()

    @router.command("ticket.reopen", "user")
    async def reopen(ctx: Any, data: Any) -> Any:
        raise AssertionError("never run")

    with pytest.raises(
        RouterMismatch, match=re.escape("handlers for unknown commands ticket.reopen")
    ):
        Worker(_settings(tmp_path), router=router)


def test_two_handlers_for_one_command_are_refused() -> None:
    with pytest.raises(RouterMismatch, match=re.escape("two handlers for ticket.new")):
        Router(tickets.router, tickets.router)


def _settings(tmp_path: Path) -> Any:
    return make_settings("amqp://127.0.0.1:1/", f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
