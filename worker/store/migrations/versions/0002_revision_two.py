"""Contract revision 2: idempotency records per principal, and a ticket's fixed thread domain.

- processed_commands is keyed by (owner_id, principal, message_id), says its reply's status, and
  marks replies stored encrypted. Records live a day at most, so the table is recreated rather
  than converted: a command repeated across the upgrade runs again.
- tickets.thread_domain: the domain of the ticket's Message-ID, fixed when it is created, so its
  hits thread under it after its channel moves to another domain. Existing tickets take the
  domain of their first email.

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from worker.store.tables import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.String(64)


def _processed_commands(key: list[sa.Column[Any]], outcome: list[sa.Column[Any]]) -> None:
    """The idempotency records' table: `key` between owner_id and message_id in its primary key,
    `outcome` between the command's type and its reply."""
    op.create_table(
        "processed_commands",
        sa.Column("owner_id", Id, primary_key=True),
        *key,
        sa.Column("message_id", sa.String(128), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        *outcome,
        sa.Column("reply", sa.Text, nullable=False),
        sa.Column("effects", sa.Text, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False, index=True),
    )


def upgrade() -> None:
    op.drop_table("processed_commands")
    _processed_commands(
        # "" for the owner's token, else the SMTP user's login.
        key=[sa.Column("principal", sa.String(64), primary_key=True)],
        outcome=[
            sa.Column("status", sa.String(8), nullable=False),
            sa.Column("secret", sa.Boolean, nullable=False, server_default=sa.false()),
        ],
    )
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("thread_domain", sa.String(253)))
    op.execute(
        "UPDATE tickets SET thread_domain = (SELECT emails.domain FROM emails"
        " WHERE emails.sid = tickets.sid AND emails.seq IS NULL LIMIT 1)"
    )


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("thread_domain")
    op.drop_table("processed_commands")
    _processed_commands(key=[], outcome=[])  # as revision 0001 made it
