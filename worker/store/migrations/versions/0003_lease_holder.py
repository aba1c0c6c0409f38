"""emails.lease_holder: who holds an email's lease, so that a worker whose claim's answer was lost
takes the email again at once rather than waiting for its own lease to run out.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("emails") as batch:
        batch.add_column(sa.Column("lease_holder", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch:
        batch.drop_column("lease_holder")
