"""The hot statements (worker.store.hot) read and write what SQLAlchemy would, on both stores.

They run straight on asyncpg or aiosqlite, as SQLAlchemy compiled them; these tests compare every
row they read with SQLAlchemy's own reading of the same statement, check that their errors reach
the layers above as any other store error does, and that a batch's savepoints undo exactly the
refused command's writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from worker.errors import ConcurrentWrite, StoreUnavailable
from worker.security import Keyring
from worker.store import (
    Connection,
    Savepoints,
    Store,
    channels,
    hot,
    idempotency,
    migrate,
    owners,
    tickets,
    users,
)
from worker.store import emails as emails_store
from worker.store import settings as email_settings
from worker.store.tables import tickets as tickets_table

NOW = datetime(2026, 1, 1, 12, 0, 30, 123456, tzinfo=UTC)
KEYRING = Keyring("hot-statement-tests-secret-key-0123")
HOUR = int(NOW.timestamp()) // 3600


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url)
    await migrate(store)
    yield store
    await store.close()


def _ticket(owner_id: str, sid: str, dedup_key: str | None = None) -> dict[str, Any]:
    return {
        "sid": sid,
        "owner_id": owner_id,
        "channel": "ops",
        "title": "disk full ✓",
        "body": "",
        "severity": "high",
        "dedup_key": dedup_key,
        "status": "unacknowledged",
        "created_at": NOW,
        "updated_at": NOW,
        "created_by": "smtp_hot",
        "delivery_status": "pending",
        "thread_domain": "hot.example",
    }


async def _world(conn: Connection, name: str) -> str:
    """An owner with email settings, a channel, an SMTP user and a ticket; returns the owner."""
    owner_id, _ = await owners.create(conn, KEYRING, name, NOW)
    await email_settings.add(
        conn,
        {
            "id": f"settings-{owner_id}",
            "owner_id": owner_id,
            "domain": f"{owner_id}.example",
            "provider": "smtp",
            "sender": f"alerts@{owner_id}.example",
            "options": {"host": "relay.example", "port": 587, "tls": False},
            "created_at": NOW,
            "updated_at": NOW,
        },
    )
    values = {"domain": f"{owner_id}.example", "recipients": ["a@x.example", "b@y.example"]}
    await channels.put(
        conn, owner_id, "ops", values | {"subject_prefix": "[ops]", "updated_at": NOW}, NOW
    )
    await users.add(
        conn,
        {
            "name": f"smtp_{owner_id}",
            "owner_id": owner_id,
            "password_hash": KEYRING.hash("pw"),
            "status": "Enable",
            "total_limit": 10,
            "hourly_limit": 5,
            "created_at": NOW,
        },
    )
    await tickets.add(conn, _ticket(owner_id, f"t-{owner_id}", dedup_key="disk"))
    await emails_store.add(
        conn,
        email_id=f"e-{owner_id}",
        owner_id=owner_id,
        sid=f"t-{owner_id}",
        seq=None,
        domain=f"{owner_id}.example",
        recipients=["a@x.example"],
        now=NOW,
    )
    reply = idempotency.Processed("ticket.new", b'{"status": "success"}', False, [], "success")
    key = idempotency.Key(owner_id, "", "m1")
    await idempotency.record(conn, [(key, reply)], NOW, 3600)
    return owner_id


async def test_the_hot_reads_are_what_sqlalchemy_reads(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
        reads = [
            (channels._WITH_SETTINGS, {"owner_id": owner_id, "name": "ops"}),
            (channels._OWN, {"owner_id": owner_id, "name": "ops"}),
            (channels._OWN, {"owner_id": owner_id, "name": "nope"}),
            (users._LOGIN, {"name": f"smtp_{owner_id}"}),
            (
                tickets._OPEN_BY_DEDUP_KEY,
                {"owner": owner_id, "channel": "ops", "dedup_key": "disk"},
            ),
            # IN lists, expanded for each execution: of one, of several, empty.
            (users._LOGINS, {"names": [f"smtp_{owner_id}"]}),
            (users._LOGINS, {"names": [f"smtp_{owner_id}", "smtp_nobody", "x"]}),
            (users._LOGINS, {"names": []}),
            (emails_store._TO_SEND, {"ids": [f"e-{owner_id}", "e-none"]}),
            (idempotency._FIND, {"keys": [(owner_id, "", "m1"), (owner_id, "p", "m2")]}),
        ]
        for statement, params in reads:
            ours = await hot.rows(conn, statement, params)
            theirs = (await conn.execute(statement, params)).all()
            assert [tuple(row) for row in ours] == [tuple(row) for row in theirs]
            assert [row._mapping for row in ours] == [dict(row._mapping) for row in theirs]
            assert [row._asdict() for row in ours] == [row._asdict() for row in theirs]
        channel = await channels.with_settings(conn, owner_id, "ops")
    assert channel is not None
    # Decoded as SQLAlchemy decodes them: JSON to lists, timestamps aware in UTC.
    assert channel.recipients == ["a@x.example", "b@y.example"]
    assert channel.created_at == NOW and channel.created_at.tzinfo is not None
    assert channel.settings_id == f"settings-{owner_id}"


async def test_the_hot_statements_run_on_the_driver(store: Store) -> None:
    """Else a change inside SQLAlchemy would have turned them slow again without a word."""
    async with store.transaction() as conn:
        on_driver = {
            name: hot.on_driver(conn, statement, keys)
            for name, (statement, keys) in {
                "with_settings": (channels._WITH_SETTINGS, ("owner_id", "name")),
                "login": (users._LOGIN, ("name",)),
                "count_emails": (users._COUNT_EMAILS, ("user", "count", "hour")),
                "new_ticket": (tickets._NEW_TICKET, tuple(_ticket("o", "s"))),
                "new_email": (emails_store._NEW_EMAIL, ("id", "owner_id", "sid")),
                "count_hit": (tickets._COUNT_HIT, ("ticket_sid", "now")),
                "logins": (users._LOGINS, ("names",)),
                "to_send": (emails_store._TO_SEND, ("ids",)),
                "find_records": (idempotency._FIND, ("keys",)),
            }.items()
        }
    assert on_driver == dict.fromkeys(on_driver, True)


async def test_the_hot_writes_count_and_write_what_they_say(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
        login = f"smtp_{owner_id}"
        assert await users.count_emails(conn, login, 3, HOUR)
        assert not await users.count_emails(conn, login, 3, HOUR)
        assert [1, 2] == [
            await tickets.add_hit(conn, f"t-{owner_id}", "again", None, NOW) for _ in "ab"
        ]
        await emails_store.add(
            conn,
            email_id="e-hot",
            owner_id=owner_id,
            sid=f"t-{owner_id}",
            seq=2,
            domain=f"{owner_id}.example",
            recipients=["a@x.example"],
            now=NOW,
        )
    async with store.transaction() as conn:
        user = await users.get(conn, login)
        ticket = await tickets.get(conn, f"t-{owner_id}")
        email = (await emails_store.get_many(conn, ["e-hot"]))["e-hot"]
    assert (3, 3, HOUR) == (user.total_sent, user.hourly_sent, user.sent_hour)
    assert (2, NOW, "pending") == (ticket.hit_count, ticket.last_hit_at, ticket.delivery_status)
    assert (["a@x.example"], 2, NOW) == (email.recipients, email.seq, email.created_at)


async def test_a_conflicting_hot_write_is_a_concurrent_write_and_leaves_nothing(
    store: Store,
) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
    with pytest.raises(ConcurrentWrite):
        async with store.transaction() as conn:
            await tickets.add(conn, _ticket(owner_id, "t-new"))
            await tickets.add(conn, _ticket(owner_id, f"t-{owner_id}"))
    async with store.transaction() as conn:
        query = select(tickets_table.c.sid).where(tickets_table.c.owner_id == owner_id)
        sids = (await conn.execute(query)).scalars().all()
    assert sids == [f"t-{owner_id}"]


async def test_savepoints_undo_exactly_the_refused_command(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
    refusals = {"a": False, "b": True, "c": False, "d": True, "e": True}
    async with store.transaction() as conn:
        savepoints = Savepoints(conn)
        for name, refused in refusals.items():
            await savepoints.begin()
            await tickets.add(conn, _ticket(owner_id, f"{owner_id}-{name}"))
            if refused:
                await savepoints.rollback()
        # A failed statement inside a savepoint (PostgreSQL then refuses every statement of the
        # transaction) is undone with it, and the batch goes on.
        await savepoints.begin()
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await tickets.add(conn, _ticket(owner_id, f"{owner_id}-a"))
        await savepoints.rollback()
        await savepoints.begin()
        await tickets.add(conn, _ticket(owner_id, f"{owner_id}-f"))
    async with store.transaction() as conn:
        query = text("SELECT sid FROM tickets WHERE owner_id = :owner ORDER BY sid")
        sids = [row.sid for row in await conn.execute(query, {"owner": owner_id})]
    assert sorted(sids) == sorted([f"{owner_id}-{name}" for name in "acf"] + [f"t-{owner_id}"])


async def test_a_connection_lost_under_a_hot_statement_is_not_used_again(postgres_url: str) -> None:
    store = Store(postgres_url)
    await migrate(store)
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
    admin = create_async_engine(postgres_url)
    try:
        async with admin.connect() as locker, locker.begin():
            # The hot statement waits for this row lock; its backend is ended meanwhile.
            query = text("SELECT 1 FROM smtp_users WHERE name = :name FOR UPDATE")
            await locker.execute(query, {"name": f"smtp_{owner_id}"})
            with pytest.raises(StoreUnavailable):
                async with store.transaction() as conn:
                    lost = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                    terminate = text("SELECT pg_terminate_backend(:pid)")
                    ending = asyncio.ensure_future(_soon(locker, terminate, {"pid": lost}))
                    await users.count_emails(conn, f"smtp_{owner_id}", 1, HOUR)
            await ending
        # The next transaction runs at once, on another connection.
        async with store.transaction() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            assert await users.count_emails(conn, f"smtp_{owner_id}", 1, HOUR)
        assert pid != lost
    finally:
        await admin.dispose()
        await store.close()


async def _soon(conn: Any, statement: Any, params: dict[str, Any]) -> None:
    await asyncio.sleep(0.3)
    await conn.execute(statement, params)


async def test_a_hot_write_outside_a_store_transaction_is_committed_by_sqlalchemy(
    store: Store,
) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
    async with store.engine.connect() as conn:
        assert await users.count_emails(conn, f"smtp_{owner_id}", 2, HOUR)
        await conn.commit()
    async with store.transaction() as conn:
        assert (await users.get(conn, f"smtp_{owner_id}")).total_sent == 2


async def test_an_in_list_statement_processes_its_other_parameters_too(store: Store) -> None:
    """The claim's lease times are stored as SQLAlchemy stores every timestamp."""
    async with store.transaction() as conn:
        owner_id = await _world(conn, "acme")
        email_id = f"e-{owner_id}"
        lease = timedelta(seconds=60)
        taken = (await emails_store.claim(conn, [email_id, "e-none"], NOW, lease)).keys()
        query = text("SELECT lease_until, created_at FROM emails WHERE id = :id")
        raw = (await conn.execute(query, {"id": email_id})).one()
        email = (await emails_store.get_many(conn, [email_id]))[email_id]
    assert taken == {email_id}
    assert email.lease_until == NOW + timedelta(seconds=60)
    # On SQLite, text in one format ("YYYY-MM-DD HH:MM:SS.ffffff"), so that they compare.
    assert type(raw.lease_until) is type(raw.created_at)
    assert len(str(raw.lease_until)) == len(str(raw.created_at))


async def test_in_lists_of_every_length_read_each_row_once_with_few_statements(
    store: Store,
) -> None:
    async with store.transaction() as conn:
        owners_ = [await _world(conn, f"in{n}") for n in range(3)]
        ids = [f"e-{owner_id}" for owner_id in owners_]
        for length in range(1, 41):
            wanted = [ids[n % 3] if n % 2 else f"e-missing-{n}" for n in range(length)]
            rows = await hot.rows(conn, emails_store._BY_IDS, {"ids": wanted})
            assert sorted(row.id for row in rows) == sorted(set(wanted) & set(ids)), length
        if store.dialect == "postgresql":
            prepared = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_prepared_statements "
                    "WHERE statement LIKE 'SELECT emails.id%' AND statement LIKE '%emails.id IN%'"
                )
            )
            # Lengths 1 to 40 are padded to 1, 2, 4, 8, 16, 32 and 64.
            assert prepared == 7


async def test_a_record_writes_each_email_and_its_ticket_mirrors_the_last_given(
    store: Store,
) -> None:
    """An SMTP reply's text is stored as it came, quotes, semicolons and all."""
    async with store.transaction() as conn:
        owner_id = await _world(conn, "rec")
        other = f"t2-{owner_id}"
        await tickets.add(conn, _ticket(owner_id, other))
        for email_id, sid, seq in (("r1", f"t-{owner_id}", 1), ("r2", other, None)):
            await emails_store.add(
                conn,
                email_id=email_id,
                owner_id=owner_id,
                sid=sid,
                seq=seq,
                domain=f"{owner_id}.example",
                recipients=["a@x.example"],
                now=NOW,
            )
        ids = [f"e-{owner_id}", "r1", "r2"]
        lease = timedelta(seconds=60)
        assert set(ids) == (await emails_store.claim(conn, ids, NOW, lease)).keys()
        found = await emails_store.get_many(conn, ids)
    hostile = "451 it's \"busy\"; DROP TABLE tickets; -- \\ ✓ ' OR '1'='1"
    later = NOW + timedelta(minutes=1)
    async with store.statements() as conn:
        if store.dialect == "postgresql":
            keys = ("now", "ids", "statuses", "attempts", "errors")
            keys += ("sids", "sid_statuses", "sid_attempts", "sid_errors")
            assert hot.on_driver(conn, emails_store._RECORD_ALL, keys)
        await emails_store.record(
            conn,
            [
                emails_store.State(found[f"e-{owner_id}"], "sent", 1, None),
                emails_store.State(found["r1"], "pending", 2, hostile),
                emails_store.State(found["r2"], "failed", 6, "550 no"),
            ],
            later,
        )
    async with store.transaction() as conn:
        stored = await emails_store.get_many(conn, ids)
        mirrored = {sid: await tickets.get(conn, sid) for sid in (f"t-{owner_id}", other)}
    assert {
        email_id: (row.status, row.attempts, row.last_error, row.lease_until, row.updated_at)
        for email_id, row in stored.items()
    } == {
        f"e-{owner_id}": ("sent", 1, None, None, later),
        "r1": ("pending", 2, hostile, None, later),
        "r2": ("failed", 6, "550 no", None, later),
    }
    # The ticket of two emails shows the last one given.
    assert {
        sid: (t.delivery_status, t.delivery_attempts, t.delivery_last_error)
        for sid, t in mirrored.items()
    } == {f"t-{owner_id}": ("pending", 2, hostile), other: ("failed", 6, "550 no")}


async def test_statements_commit_each_as_it_runs_on_postgresql_and_together_on_sqlite(
    store: Store, database_url: str
) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "stm")
    email_id = f"e-{owner_id}"
    # Another process's reader (on SQLite not a writer, which would wait for this one).
    onlooker = create_async_engine(database_url)
    query = text("SELECT lease_until FROM emails WHERE id = :id")

    async def leased() -> bool:
        async with onlooker.connect() as other:
            return (await other.execute(query, {"id": email_id})).scalar() is not None

    try:
        async with store.statements() as conn:
            taken = await emails_store.claim(conn, [email_id], NOW, timedelta(seconds=60))
            assert {email_id} == taken.keys()
            seen = await leased()
        after = await leased()
    finally:
        await onlooker.dispose()
    # SQLite's one writer holds its transaction: the onlooker reads what was committed before.
    assert (seen, after) == (store.dialect == "postgresql", True)


async def test_a_claim_takes_the_email_as_it_is_then_not_as_it_was_read(postgres_url: str) -> None:
    """Between a claim's read and its lease (on PostgreSQL no transaction holds them together;
    on SQLite they are one, the file's one writer), another worker may record an attempt: the
    email is taken with that attempt counted."""
    store = Store(postgres_url)
    await migrate(store)
    async with store.transaction() as conn:
        owner_id = await _world(conn, "race")
    email_id = f"e-{owner_id}"
    async with store.statements() as conn:
        read = (await emails_store.to_send(conn, [email_id]))[email_id]
        async with store.statements() as elsewhere:
            state = emails_store.State(read, "pending", 1, "451 try again")
            await emails_store.record(elsewhere, [state], NOW)
        taken = await emails_store.claim(conn, [email_id], NOW, timedelta(seconds=60))
    await store.close()
    email = emails_store.as_taken(read, taken[email_id])
    assert (read.attempts, read.last_error) == (0, None)
    assert (email.attempts, email.last_error, email.status) == (1, "451 try again", "pending")
    # The rest as read: what the send needs.
    assert (email.id, email.title, email.sender) == (email_id, read.title, read.sender)


async def test_a_new_ticket_and_its_email_are_stored_together_or_not_at_all(store: Store) -> None:
    async with store.transaction() as conn:
        owner_id = await _world(conn, "pair")
        if store.dialect == "postgresql":
            keys = tuple(f"email_{c.name}" for c in emails_store.emails.c)
            keys += tuple(f"ticket_{c.name}" for c in tickets_table.c)
            assert hot.on_driver(conn, emails_store._NEW_TICKET_AND_EMAIL, keys)

    # As ticket.new gives them: every column (one statement on PostgreSQL).
    every_column = {c.name: None for c in tickets_table.c} | {
        "hit_count": 0,
        "delivery_attempts": 0,
    }

    async def new(sid: str, email_id: str, dedup_key: str | None) -> None:
        async with store.transaction() as conn:
            await emails_store.add(
                conn,
                email_id=email_id,
                owner_id=owner_id,
                sid=sid,
                seq=None,
                domain=f"{owner_id}.example",
                recipients=["a@x.example"],
                now=NOW,
                ticket=every_column | _ticket(owner_id, sid, dedup_key),
            )

    await new("t-pair-new", "e-pair-new", None)
    # The world's open ticket holds the dedup key "disk": a twin is refused, its email with it.
    with pytest.raises(ConcurrentWrite):
        await new("t-pair-twin", "e-pair-twin", "disk")
    async with store.transaction() as conn:
        ticket = await tickets.get(conn, "t-pair-new")
        found = await emails_store.get_many(conn, ["e-pair-new", "e-pair-twin"])
        twin = await conn.scalar(text("SELECT count(*) FROM tickets WHERE sid = 't-pair-twin'"))
    assert (ticket.title, ticket.thread_domain, ticket.created_at) == (
        "disk full ✓",
        "hot.example",
        NOW,
    )
    assert list(found) == ["e-pair-new"]
    assert (found["e-pair-new"].sid, found["e-pair-new"].status) == ("t-pair-new", "pending")
    assert twin == 0
