"""associations: the receiving node that holds each one

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 12:30:00

Several receiving nodes may share one database (scale-out); at start-up, and when recording
an association's end failed, a node closes only its own associations. Rows written before
this revision have no receiver: any node may close them, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("receiver", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.drop_column("receiver")
