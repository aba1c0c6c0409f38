"""The store layer on its own: SQLite in a temporary file, no broker, no worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from worker.security import Keyring
from worker.store import Connection, Store, channels, db, emails, migrate, owners, tickets, users
from worker.store import settings as email_settings

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
KEYRING = Keyring("store-tests-secret-key-0123456789")
OWNER_NAMES = text("SELECT name FROM owners ORDER BY name")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await migrate(store)
    yield store
    await store.close()


async def _ticket(conn: Connection, owner_id: str, sid: str = "t1") -> None:
    await tickets.add(
        conn,
        {
            "sid": sid,
            "owner_id": owner_id,
            "channel": "ops",
            "title": "disk full",
            "body": "",
            "severity": "high",
            "dedup_key": None,
            "status": "unacknowledged",
            "created_at": NOW,
            "updated_at": NOW,
            "created_by": "smtp_user",
            "delivery_status": "pending",
            "thread_domain": "example.com",
        },
    )


async def _email(
    conn: Connection,
    owner_id: str,
    email_id: str,
    seq: int | None = None,
    domain: str = "example.com",
) -> None:
    """A pending email of ticket t1, to ops@example.com."""
    await emails.add(
        conn,
        email_id=email_id,
        owner_id=owner_id,
        sid="t1",
        seq=seq,
        domain=domain,
        recipients=["ops@example.com"],
        now=NOW,
    )


async def test_an_owner_is_found_by_its_token_hash_only(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id, token = await owners.create(conn, KEYRING, "acme", NOW)
        stored = await owners.token_hash(conn, owner_id)
        assert await owners.token_hash(conn, "nobody") is None
    assert stored is not None and token not in stored
    assert KEYRING.verify(token, stored)


async def test_a_claim_takes_an_email_again_only_in_a_name_its_earlier_tries_took_it_in(
    store: Store,
) -> None:
    """A claim whose answer was lost takes the email again on its retry; no other claim can."""
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await _ticket(conn, owner_id)
        await _email(conn, owner_id, "e1")
        first = (await emails.claim(conn, ["e1"], NOW, LEASE, "try-1")).keys()
        by_another = await emails.claim(conn, ["e1"], NOW, LEASE, "try-2", ["try-0"])
        by_none = await emails.claim(conn, ["e1"], NOW, LEASE)
        retried = (await emails.claim(conn, ["e1"], NOW, LEASE, "try-3", ["try-1"])).keys()
        retried_again = (await emails.claim(conn, ["e1"], NOW, LEASE, "try-4", ["try-3"])).keys()
        by_a_stale_name = await emails.claim(conn, ["e1"], NOW, LEASE, "try-5", ["try-1"])
        e1 = (await emails.get_many(conn, ["e1"]))["e1"]
        await emails.record(conn, [emails.State(e1, "pending", 1, "421 busy")], NOW)
        # Recorded, the lease is free and in no name: any claim takes it, and then no other.
        after_record = (await emails.claim(conn, ["e1"], NOW, LEASE, "try-6")).keys()
        by_the_first = await emails.claim(conn, ["e1"], NOW, LEASE, "try-7", ["try-4"])

    assert ({"e1"}, {}, {}) == (first, by_another, by_none)
    assert ({"e1"}, {"e1"}, {}) == (retried, retried_again, by_a_stale_name)
    assert ({"e1"}, {}) == (after_record, by_the_first)


async def test_emails_are_claimed_once_under_a_lease_and_their_state_reaches_the_ticket(
    store: Store,
) -> None:
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await _ticket(conn, owner_id)
        for email_id, seq in (("e1", None), ("e2", 1)):
            await _email(conn, owner_id, email_id, seq)
        assert {"e1", "e2"} == (await emails.claim(conn, ["e1", "e2", "e3"], NOW, LEASE)).keys()
        assert {} == await emails.claim(conn, ["e1", "e2"], NOW, LEASE)
        # A lease past its end is free again.
        later = NOW + LEASE + timedelta(seconds=1)
        assert {"e1"} == (await emails.claim(conn, ["e1"], later, LEASE)).keys()
        e1 = (await emails.get_many(conn, ["e1"]))["e1"]
        await emails.record(conn, [emails.State(e1, "sent", 1, None)], NOW)
        stored = await emails.get_many(conn, ["e1", "e2"])
        assert {"e1": "sent", "e2": "pending"} == {k: row.status for k, row in stored.items()}
        assert {} == await emails.claim(conn, ["e1"], NOW + timedelta(days=1), LEASE)
        ticket = await tickets.get(conn, "t1")
    assert ("sent", 1, None) == (
        ticket.delivery_status,
        ticket.delivery_attempts,
        ticket.delivery_last_error,
    )


async def test_a_quota_counts_only_what_fits_in_both_limits(store: Store) -> None:
    hour = int(NOW.timestamp()) // 3600
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await users.add(
            conn,
            {
                "name": "smtp_a",
                "owner_id": owner_id,
                "password_hash": KEYRING.hash("pw"),
                "status": "Enable",
                "total_limit": 10,
                "hourly_limit": 3,
                "created_at": NOW,
            },
        )
        assert await users.count_emails(conn, "smtp_a", 3, hour)
        assert not await users.count_emails(conn, "smtp_a", 1, hour)
        # A new hour starts the hourly count again; the total goes on.
        assert await users.count_emails(conn, "smtp_a", 3, hour + 1)
        user = await users.get(conn, "smtp_a")
    assert (6, 3, hour + 1) == (user.total_sent, user.hourly_sent, user.sent_hour)


async def test_hits_are_numbered_and_paged_by_size(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await _ticket(conn, owner_id)
        seqs = [await tickets.add_hit(conn, "t1", "é" * n, None, NOW) for n in (1, 2, 3)]
        sizes = await tickets.hit_sizes(conn, "t1", 1, 10)
        between = await tickets.hits_between(conn, "t1", 0, 2)
        ticket = await tickets.get(conn, "t1")
    assert [1, 2, 3] == seqs
    assert [(2, 4), (3, 6)] == [(row.seq, row.size) for row in sizes]
    assert [1, 2] == [row.seq for row in between]
    assert 3 == ticket.hit_count


async def test_an_email_to_send_comes_with_its_ticket_settings_prefix_and_hit_in_one_read(
    store: Store,
) -> None:
    async with store.transaction() as conn:
        owner_id, _ = await owners.create(conn, KEYRING, "acme", NOW)
        await email_settings.add(
            conn,
            {
                "id": "s1",
                "owner_id": owner_id,
                "domain": "example.com",
                "provider": "smtp",
                "description": None,
                "sender": "alerts@example.com",
                "options": {"host": "relay.example.com", "port": 587},
                "auth_pass_enc": None,
                "created_at": NOW,
                "updated_at": NOW,
            },
        )
        values = {"domain": "example.com", "recipients": ["ops@example.com"], "updated_at": NOW}
        await channels.put(conn, owner_id, "ops", values | {"subject_prefix": "[ops]"}, NOW)
        await _ticket(conn, owner_id)
        seq = await tickets.add_hit(conn, "t1", "again", "still full", NOW)
        for email_id, email_seq, domain in (
            ("e1", None, "example.com"),
            ("e2", seq, "example.com"),
            ("e3", seq + 1, "gone.example.com"),  # a hit pruned, a domain without settings
        ):
            await _email(conn, owner_id, email_id, email_seq, domain)
        found = await emails.to_send(conn, ["e1", "e2", "e3", "e4"])
        claimed = [(await emails.claim(conn, ["e1"], NOW, LEASE)).keys() for _ in range(2)]

    ticket_email, hit_email, orphan = found["e1"], found["e2"], found["e3"]
    assert ("s1", "alerts@example.com", "relay.example.com", "[ops]") == (
        ticket_email.settings_id,
        ticket_email.sender,
        ticket_email.options["host"],
        ticket_email.subject_prefix,
    )
    assert ("disk full", "high", "example.com", None) == (
        ticket_email.title,
        ticket_email.severity,
        ticket_email.thread_domain,
        ticket_email.hit_seq,
    )
    assert (seq, "again", "still full") == (
        hit_email.hit_seq,
        hit_email.hit_summary,
        hit_email.hit_body,
    )
    assert (None, None) == (orphan.settings_id, orphan.hit_seq)
    assert "e4" not in found
    assert [{"e1"}, set()] == claimed  # the second finds the lease taken


async def test_on_sqlite_an_urgent_transaction_goes_before_those_waiting(store: Store) -> None:
    """The delivery consumer's claims and records are urgent: a command batch that asked later
    does not hold them up; otherwise transactions run one at a time, in the order they asked."""
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def run(name: str, *, urgent: bool = False) -> None:
        async with store.transaction(urgent=urgent) as conn:
            order.append(name)
            if name == "first":
                first_in.set()
                await release.wait()
            await owners.create(conn, KEYRING, name, NOW)

    first = asyncio.ensure_future(run("first"))
    await first_in.wait()
    waiting = [
        asyncio.ensure_future(run("batch 1")),
        asyncio.ensure_future(run("claim", urgent=True)),
        asyncio.ensure_future(run("batch 2")),
        asyncio.ensure_future(run("record", urgent=True)),
    ]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "claim", "record", "batch 1", "batch 2"]


async def test_on_sqlite_urgent_transactions_keep_another_out_for_a_while_only(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PATIENCE", 0.3)
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def run(name: str, *, urgent: bool = False, hold: float = 0.0) -> None:
        async with store.transaction(urgent=urgent) as conn:
            order.append(name)
            if name == "first":
                first_in.set()
                await release.wait()
            await asyncio.sleep(hold)
            await owners.create(conn, KEYRING, name, NOW)

    first = asyncio.ensure_future(run("first"))
    await first_in.wait()
    waiting = [asyncio.ensure_future(run("batch"))]
    waiting += [asyncio.ensure_future(run(f"urgent {n}", urgent=True, hold=0.2)) for n in range(4)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiting)
    # The batch has waited about 0.2 s after the first urgent one, 0.4 s after the second.
    assert order == ["first", "urgent 0", "urgent 1", "batch", "urgent 2", "urgent 3"]


async def test_on_sqlite_a_transaction_cancelled_while_waiting_passes_its_turn_on(
    store: Store,
) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with store.transaction():
            held.set()
            await release.wait()

    async def write(name: str) -> str:
        async with store.transaction() as conn:
            await owners.create(conn, KEYRING, name, NOW)
        return name

    holder = asyncio.ensure_future(hold())
    await held.wait()
    cancelled = asyncio.ensure_future(write("cancelled"))
    after = asyncio.ensure_future(write("after"))
    await asyncio.sleep(0.05)
    cancelled.cancel()
    release.set()
    assert "after" == await asyncio.wait_for(after, 5)
    await holder
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The writer is free again.
    assert "again" == await asyncio.wait_for(write("again"), 5)


async def _owner_names(url: str) -> list[str]:
    """The owners' names, as another process reads them."""
    other = Store(url)
    try:
        async with asyncio.timeout(5), other.transaction() as conn:
            return list((await conn.execute(OWNER_NAMES)).scalars())
    finally:
        await other.close()


async def test_on_sqlite_a_transaction_given_up_mid_way_writes_nothing_and_frees_the_file(
    store: Store,
) -> None:
    """Failed or cancelled after its writes (which run on the event loop's thread, its BEGIN and
    COMMIT on aiosqlite's), a transaction leaves the file to the next writer, of this process or
    another one, at once."""
    with pytest.raises(RuntimeError):
        async with store.transaction() as conn:
            await owners.create(conn, KEYRING, "failed", NOW)
            raise RuntimeError("a bug")
    written = asyncio.Event()

    async def stuck() -> None:
        async with store.transaction() as conn:
            await owners.create(conn, KEYRING, "cancelled", NOW)
            written.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(stuck())
    await written.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [] == await _owner_names(store.url)
    async with store.transaction() as conn:
        await owners.create(conn, KEYRING, "next", NOW)
    assert ["next"] == await _owner_names(store.url)


async def test_on_sqlite_a_writer_in_another_process_is_waited_for_off_the_event_loop(
    store: Store,
) -> None:
    other = Store(store.url)
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with other.transaction() as conn:
            await owners.create(conn, KEYRING, "other", NOW)
            holding.set()
            await release.wait()

    holder = asyncio.ensure_future(hold())
    try:
        await holding.wait()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        asyncio.get_running_loop().call_later(0.3, release.set)
        async with store.transaction() as conn:
            # Begun once the other one committed.
            names = list((await conn.execute(OWNER_NAMES)).scalars())
            await owners.create(conn, KEYRING, "this", NOW)
        ticker.cancel()
        await holder
    finally:
        release.set()
        await other.close()
    assert names == ["other"]
    # The event loop ran on while this one waited for the file's write lock (about 30 ticks).
    assert ticks >= 5
    assert sorted(await _owner_names(store.url)) == ["other", "this"]
