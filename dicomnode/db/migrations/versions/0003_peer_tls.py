"""peers: whether results are sent to each over DICOM TLS

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.add_column(sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("tls")
