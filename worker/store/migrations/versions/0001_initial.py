"""The initial schema: owners, email settings, SMTP users, channels, tickets, hits, emails,
processed commands.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.String(64)
_OPEN_DEDUP = sa.text("dedup_key IS NOT NULL AND status != 'closed'")


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", Id, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "email_settings",
        sa.Column("id", Id, primary_key=True),
        sa.Column("owner_id", Id, sa.ForeignKey("owners.id"), nullable=False, index=True),
        sa.Column("domain", sa.String(253), nullable=False, unique=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("sender", sa.String(320), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("auth_pass_enc", sa.Text),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "smtp_users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("owner_id", Id, sa.ForeignKey("owners.id"), nullable=False, index=True),
        sa.Column("password_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("total_limit", sa.BigInteger, nullable=False),
        sa.Column("hourly_limit", sa.BigInteger, nullable=False),
        sa.Column("total_sent", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("hourly_sent", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("sent_hour", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "channels",
        sa.Column("owner_id", Id, sa.ForeignKey("owners.id"), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("recipients", sa.JSON, nullable=False),
        sa.Column("subject_prefix", sa.String(200), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "tickets",
        sa.Column("sid", Id, primary_key=True),
        sa.Column("owner_id", Id, sa.ForeignKey("owners.id"), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("dedup_key", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("closed_at", UtcDateTime),
        sa.Column("comment", sa.Text),
        sa.Column("hit_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_hit_at", UtcDateTime),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("delivery_status", sa.String(16), nullable=False),
        sa.Column("delivery_attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("delivery_last_error", sa.Text),
    )
    op.create_index("ix_tickets_owner", "tickets", ["owner_id", "created_at"])
    op.create_index(
        "ux_tickets_open_dedup",
        "tickets",
        ["owner_id", "channel", "dedup_key"],
        unique=True,
        sqlite_where=_OPEN_DEDUP,
        postgresql_where=_OPEN_DEDUP,
    )
    op.create_table(
        "hits",
        sa.Column("sid", Id, sa.ForeignKey("tickets.sid", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("body", sa.Text),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "emails",
        sa.Column("id", Id, primary_key=True),
        sa.Column("owner_id", Id, nullable=False),
        sa.Column("sid", Id, nullable=False, index=True),
        sa.Column("seq", sa.Integer),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("recipients", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.Column("lease_until", UtcDateTime),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "processed_commands",
        sa.Column("owner_id", Id, primary_key=True),
        sa.Column("message_id", sa.String(128), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("reply", sa.Text, nullable=False),
        sa.Column("effects", sa.Text, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False, index=True),
    )


def downgrade() -> None:
    for table in (
        "processed_commands",
        "emails",
        "hits",
        "tickets",
        "channels",
        "smtp_users",
        "email_settings",
        "owners",
    ):
        op.drop_table(table)
