"""jobs: sends queued again by `dicomnode resend`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 14:45:00

A study's results sent again to a peer (the PACS lost them, a new archive) are new send jobs
marked ``resend``: the study's history keeps the first deliveries beside them, and the
turnaround, which ends at a round's first delivery, leaves them out.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("resend", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resend")
