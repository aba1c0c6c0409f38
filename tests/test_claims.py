"""Claims of emails to send (worker.delivery): what a try of a claim may take again.

On PostgreSQL a claim's UPDATE commits on its own, so a try of a claim that failed (its answer
lost) may hold its leases all the same. Its claims' next tries take their emails again in that
try's name, which no other claim knows; the name of a try that succeeded goes to no one, since
its emails are being sent. The store here is SQLite, where the statements are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from tests.support.environment import make_settings
from tests.test_store import KEYRING, NOW, _email, _ticket
from worker.delivery import DeliveryConsumer, _Claim, _Taken
from worker.errors import CommitUnknown
from worker.outcomes import Parts
from worker.store import Store, migrate, owners


@pytest.fixture
async def consumer(tmp_path: Path) -> AsyncIterator[DeliveryConsumer]:
    """A delivery consumer on a store with two pending emails, "x" and "y", of one ticket whose
    domain has no email settings (nothing here connects to a relay or a broker)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    await migrate(store)
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await _ticket(conn, owner_id)
        for email_id in ("x", "y"):
            await _email(conn, owner_id, email_id)
    settings = make_settings("amqp://unused/", url)
    unused = cast(Any, None)
    yield DeliveryConsumer(Parts(settings, store, unused, KEYRING, unused))
    await store.close()


def claim(email_id: str, holders: list[str] | None = None) -> _Claim:
    return _Claim(email_id, datetime.now(UTC), [] if holders is None else holders)


def outcomes(found: list[Any]) -> list[str]:
    return ["taken" if isinstance(one, _Taken) else str(one) for one in found]


async def test_a_failed_try_s_leases_are_taken_again_by_its_own_claims_only(
    consumer: DeliveryConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = consumer.store.statements

    @contextlib.asynccontextmanager
    async def committed_answer_lost(*, urgent: bool = False) -> AsyncIterator[Any]:
        async with statements(urgent=urgent) as conn:
            yield conn
        raise CommitUnknown("the store became unavailable during a statement")

    x, y = claim("x"), claim("y")
    monkeypatch.setattr(consumer.store, "statements", committed_answer_lost)
    with pytest.raises(CommitUnknown):
        await consumer._claim_all([x, y])
    monkeypatch.setattr(consumer.store, "statements", statements)

    twin_first = await consumer._claim_all([claim("x")])
    retried = await consumer._claim_all([claim("x", x.holders)])
    # Y's next try shares its name with X's: X, renamed by its own retry, stays with it.
    together = await consumer._claim_all([claim("y", y.holders), claim("x")])

    assert 1 == len(x.holders) and x.holders == y.holders
    assert (["busy"], ["taken"], ["taken", "busy"]) == (
        outcomes(twin_first),
        outcomes(retried),
        outcomes(together),
    )


async def test_a_try_that_succeeded_lends_its_name_to_none_of_its_claims(
    consumer: DeliveryConsumer,
) -> None:
    x, y = claim("x"), claim("y")

    first = await consumer._claim_all([x, y])
    # Y's claim tried again (its record failed after its try succeeded) beside a twin of X,
    # whose email is being sent: neither may take an email.
    again = await consumer._claim_all([claim("y", y.holders), claim("x")])

    assert ([], []) == (x.holders, y.holders)
    assert (["taken", "taken"], ["busy", "busy"]) == (outcomes(first), outcomes(again))
