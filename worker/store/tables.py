"""The store's tables, as SQLAlchemy Core metadata (the migrations create the same)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]


metadata = MetaData()

Id = String(64)


def _owner_id(**options: Any) -> Column[Any]:
    """The owner a row belongs to."""
    return Column("owner_id", Id, ForeignKey("owners.id"), **options)


def _counter(name: str, type_: type[Integer] = Integer) -> Column[Any]:
    """A count that starts at 0."""
    return Column(name, type_, nullable=False, server_default=text("0"))


def _timestamps() -> tuple[Column[Any], Column[Any]]:
    """`created_at` and `updated_at`, both required."""
    return (
        Column("created_at", UtcDateTime, nullable=False),
        Column("updated_at", UtcDateTime, nullable=False),
    )


owners = Table(
    "owners",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

email_settings = Table(
    "email_settings",
    metadata,
    Column("id", Id, primary_key=True),
    _owner_id(nullable=False, index=True),
    Column("domain", String(253), nullable=False, unique=True),
    Column("provider", String(16), nullable=False),
    Column("description", Text),
    Column("sender", String(320), nullable=False),
    # host, port, secure, starttls, debug, tls, timeout, auth_user: everything but the password
    Column("options", JSON, nullable=False),
    Column("auth_pass_enc", Text),
    *_timestamps(),
)

smtp_users = Table(
    "smtp_users",
    metadata,
    Column("name", String(64), primary_key=True),
    _owner_id(nullable=False, index=True),
    Column("password_hash", String(64), nullable=False),
    Column("status", String(8), nullable=False),
    Column("total_limit", BigInteger, nullable=False),
    Column("hourly_limit", BigInteger, nullable=False),
    _counter("total_sent", BigInteger),
    # hourly_sent counts the UTC clock hour `sent_hour` (hours since the epoch)
    _counter("hourly_sent", BigInteger),
    _counter("sent_hour", BigInteger),
    Column("created_at", UtcDateTime, nullable=False),
)

channels = Table(
    "channels",
    metadata,
    _owner_id(primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("domain", String(253), nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("subject_prefix", String(200), nullable=False),
    *_timestamps(),
)

tickets = Table(
    "tickets",
    metadata,
    Column("sid", Id, primary_key=True),
    _owner_id(nullable=False),
    Column("channel", String(64), nullable=False),
    Column("title", String(200), nullable=False),
    Column("body", Text, nullable=False),
    Column("severity", String(16), nullable=False),
    Column("dedup_key", String(200)),
    Column("status", String(16), nullable=False),
    *_timestamps(),
    Column("closed_at", UtcDateTime),
    Column("comment", Text),
    _counter("hit_count"),
    Column("last_hit_at", UtcDateTime),
    Column("created_by", String(64), nullable=False),
    Column("delivery_status", String(16), nullable=False),
    _counter("delivery_attempts"),
    Column("delivery_last_error", Text),
    # The domain of the ticket's Message-ID `<SID@DOMAIN>`, fixed at creation: its hits thread
    # under it even after the channel moves to another domain.
    Column("thread_domain", String(253)),
    Index("ix_tickets_owner", "owner_id", "created_at"),
    # At most one open ticket per dedup_key and channel: the race of two workers folding the same
    # alert ends in a unique violation, retried, instead of two tickets.
    Index(
        "ux_tickets_open_dedup",
        "owner_id",
        "channel",
        "dedup_key",
        unique=True,
        sqlite_where=text("dedup_key IS NOT NULL AND status != 'closed'"),
        postgresql_where=text("dedup_key IS NOT NULL AND status != 'closed'"),
    ),
)

hits = Table(
    "hits",
    metadata,
    Column("sid", Id, ForeignKey("tickets.sid", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("summary", Text, nullable=False),
    Column("body", Text),
    Column("created_at", UtcDateTime, nullable=False),
)

# One row per email to send: written in the command's transaction, sent by the delivery consumer.
emails = Table(
    "emails",
    metadata,
    Column("id", Id, primary_key=True),
    Column("owner_id", Id, nullable=False),
    Column("sid", Id, nullable=False, index=True),
    Column("seq", Integer),
    Column("domain", String(253), nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    _counter("attempts"),
    Column("last_error", Text),
    # While one worker sends, others leave the email alone until the lease runs out. Who holds
    # it: a worker whose claim's answer was lost takes it again at once (worker.delivery).
    Column("lease_until", UtcDateTime),
    Column("lease_holder", String(64)),
    *_timestamps(),
)

# Idempotency: the reply (and what it caused) of every command processed with a message_id, per
# owner and principal (contract 3).
processed_commands = Table(
    "processed_commands",
    metadata,
    Column("owner_id", Id, primary_key=True),
    # "" for the owner's token, else the SMTP user's login.
    Column("principal", String(64), primary_key=True),
    Column("message_id", String(128), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("status", String(8), nullable=False),
    # The reply holds a secret (a new SMTP password) and is stored encrypted.
    Column("secret", Boolean, nullable=False, server_default=text("false")),
    Column("reply", Text, nullable=False),
    Column("effects", Text, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False, index=True),
)
