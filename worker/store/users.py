"""SMTP users: their logins (authentication), their limits and the quota counters."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, cast

from sqlalchemy import bindparam, case, delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.store import hot
from worker.store.tables import smtp_users

# The hot statements are built once, with bound parameters: SQLAlchemy then neither constructs
# nor keys them again for every command.
_LOGIN_COLUMNS = (
    smtp_users.c.name,
    smtp_users.c.owner_id,
    smtp_users.c.password_hash,
    smtp_users.c.status,
)
# A login: name, owner_id, password_hash and status.
Login = Row[Any, Any, Any, Any]
_LOGIN = select(*_LOGIN_COLUMNS).where(smtp_users.c.name == bindparam("name"))
_LOGINS = select(*_LOGIN_COLUMNS).where(smtp_users.c.name.in_(bindparam("names", expanding=True)))
_sent_this_hour = case(
    (smtp_users.c.sent_hour == bindparam("hour"), smtp_users.c.hourly_sent), else_=0
)
# The check and the count are one conditional UPDATE, so concurrent workers can never pass a
# limit together.
_COUNT_EMAILS = (
    update(smtp_users)
    .where(
        smtp_users.c.name == bindparam("user"),
        smtp_users.c.total_sent + bindparam("count") <= smtp_users.c.total_limit,
        _sent_this_hour + bindparam("count") <= smtp_users.c.hourly_limit,
    )
    .values(
        total_sent=smtp_users.c.total_sent + bindparam("count"),
        hourly_sent=_sent_this_hour + bindparam("count"),
        sent_hour=bindparam("hour"),
    )
)
_BY_NAME = select(smtp_users).where(smtp_users.c.name == bindparam("name"))
_LOCK = _LOGINS.order_by(smtp_users.c.name).with_for_update()


async def login(conn: AsyncConnection, name: str) -> Login | None:
    """The user's name, owner_id, password_hash and status, to authenticate a command."""
    row = await hot.first(conn, _LOGIN, {"name": name})
    return None if row is None else cast(Login, row)


async def logins(conn: AsyncConnection, names: Collection[str]) -> dict[str, Login]:
    """The logins (as `login` gives them) of these users, those that exist, in one statement."""
    if not names:
        return {}
    rows = await hot.rows(conn, _LOGINS, {"names": sorted(names)})
    return {row.name: cast(Login, row) for row in rows}


async def lock(conn: AsyncConnection, names: Collection[str]) -> dict[str, Login] | None:
    """Takes the row locks of these users (those that exist) in the order of their names, and
    gives their logins as they are under the locks.

    A transaction that runs the commands of several users counts against each of their quotas
    in turn; taken first and in one order, their locks cannot deadlock with another such
    transaction's. SQLite has a single writer, and nothing to lock: there it gives None, and
    what the transaction read stands.
    """
    if conn.dialect.name != "postgresql":
        return None
    rows = await hot.rows(conn, _LOCK, {"names": sorted(names)})
    return {row.name: cast(Login, row) for row in rows}


async def count_emails(conn: AsyncConnection, name: str, count: int, hour: int) -> bool:
    """Counts `count` emails against the user's limits; False, counting nothing, when that would
    pass one of them."""
    params = {"user": name, "count": count, "hour": hour}
    return await hot.rowcount(conn, _COUNT_EMAILS, params) == 1


async def get(conn: AsyncConnection, name: str) -> Row[Any]:
    return (await conn.execute(_BY_NAME, {"name": name})).one()


async def own(conn: AsyncConnection, owner_id: str, name: str) -> Row[Any] | None:
    query = select(smtp_users).where(smtp_users.c.name == name, smtp_users.c.owner_id == owner_id)
    return (await conn.execute(query)).first()


async def of_owner(conn: AsyncConnection, owner_id: str) -> Sequence[Row[Any]]:
    query = (
        select(smtp_users)
        .where(smtp_users.c.owner_id == owner_id)
        .order_by(smtp_users.c.created_at, smtp_users.c.name)
    )
    return (await conn.execute(query)).all()


async def add(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(smtp_users).values(**values))


async def change(conn: AsyncConnection, name: str, values: dict[str, Any]) -> None:
    """Writes `values` (limits, status, password_hash) on the user."""
    await conn.execute(update(smtp_users).where(smtp_users.c.name == name).values(**values))


async def remove(conn: AsyncConnection, name: str) -> None:
    await conn.execute(delete(smtp_users).where(smtp_users.c.name == name))
