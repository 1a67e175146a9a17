"""storage commitment: peers that commit, the requests made, the sends committed

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 14:40:00

A peer marked ``commitment`` is asked, once a round's results are delivered to it, to
commit to keeping them (Storage Commitment Push Model, N-ACTION); its report (N-EVENT-REPORT)
names the request's Transaction UID, kept in ``commitment_requests`` with the commit job that
made it, and marks each send it commits (``jobs.committed_at``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.add_column(
            sa.Column("commitment", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("committed_at", sa.DateTime(), nullable=True))
    op.create_table(
        "commitment_requests",
        sa.Column("transaction_uid", sa.String(64), primary_key=True),
        sa.Column(
            "job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_commitment_requests_job_id", "commitment_requests", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_commitment_requests_job_id", table_name="commitment_requests")
    op.drop_table("commitment_requests")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("committed_at")
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("commitment")
