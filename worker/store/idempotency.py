"""Processed commands: what a command with a message_id answered, for its repeats.

A record is keyed by owner, principal ("" for the owner's token, else the SMTP user's login) and
message_id, and says the command's type: a repeat of another type is not the same command. A
reply holding a secret arrives here encrypted (`secret`), and leaves as it came.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.events import Effect
from worker.store import hot
from worker.store.tables import processed_commands as pc


@dataclass(frozen=True, slots=True)
class Processed:
    type: str
    reply: bytes
    secret: bool
    effects: list[Effect]
    status: str


# Built once: SQLAlchemy then skips constructing and keying the statement on every command.
_KEY = (
    pc.c.owner_id == bindparam("owner_id"),
    pc.c.principal == bindparam("principal"),
    pc.c.message_id == bindparam("message_id"),
)
_FIND = select(
    pc.c.owner_id,
    pc.c.principal,
    pc.c.message_id,
    pc.c.type,
    pc.c.reply,
    pc.c.secret,
    pc.c.effects,
    pc.c.status,
    pc.c.expires_at,
).where(
    tuple_(pc.c.owner_id, pc.c.principal, pc.c.message_id).in_(bindparam("keys", expanding=True))
)
# Only if still expired: a record written since it was read is another command's, and stays.
_FORGET = delete(pc).where(*_KEY, pc.c.expires_at <= bindparam("now"))
_RECORD = insert(pc)


@dataclass(frozen=True, slots=True)
class Key:
    """What a record is kept under: the owner, the principal ("" for the owner's token, else the
    SMTP user's login) and the command's message_id."""

    owner_id: str
    principal: str
    message_id: str

    def params(self) -> dict[str, str]:
        return {
            "owner_id": self.owner_id,
            "principal": self.principal,
            "message_id": self.message_id,
        }


async def find(conn: AsyncConnection, keys: Collection[Key], now: datetime) -> dict[Key, Processed]:
    """The records kept under these keys, in one statement; those forgotten are not returned."""
    if not keys:
        return {}
    params = [(k.owner_id, k.principal, k.message_id) for k in keys]
    found: dict[Key, Processed] = {}
    for row in await hot.rows(conn, _FIND, {"keys": sorted(params)}):
        key = Key(row.owner_id, row.principal, row.message_id)
        if row.expires_at <= now:
            # Forgotten: clear the way for this command's own record (the sweeper may be late).
            await hot.rowcount(conn, _FORGET, {**key.params(), "now": now})
            continue
        effects = [Effect.load(e) for e in json.loads(row.effects)]
        found[key] = Processed(row.type, row.reply.encode(), bool(row.secret), effects, row.status)
    return found


async def record(
    conn: AsyncConnection,
    records: Sequence[tuple[Key, Processed]],
    now: datetime,
    ttl: float,
) -> None:
    """Keeps what the commands the keys name did, for `ttl` seconds, in one statement (each
    `reply` as given: one holding a secret arrives encrypted)."""
    if not records:
        return
    expires_at = now + timedelta(seconds=ttl)
    await hot.execute_many(
        conn,
        _RECORD,
        [
            {
                **key.params(),
                "type": processed.type,
                "status": processed.status,
                "reply": processed.reply.decode(),
                "secret": processed.secret,
                "effects": json.dumps([e.dump() for e in processed.effects]),
                "expires_at": expires_at,
            }
            for key, processed in records
        ],
    )


async def sweep(conn: AsyncConnection, now: datetime) -> int:
    result = await conn.execute(delete(pc).where(pc.c.expires_at <= now))
    return result.rowcount or 0
