"""Priorities: an urgent study's analysis, report and sends go first

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 03:00:00

Each instance records the priority of its analysis (its sender's C-STORE Priority, or
``routing.urgent_callers`` / ``background_callers``: 0 low, 1 medium, 2 high), and each job
the priority it is claimed by: due jobs of a kind highest first. Rows written before this
revision are medium.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("instances", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("priority", sa.Integer(), nullable=False, server_default="1")
            )
    op.create_index("ix_jobs_priority", "jobs", ["kind", "state", "priority", "run_after"])


def downgrade() -> None:
    op.drop_index("ix_jobs_priority", table_name="jobs")
    for table in ("jobs", "instances"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("priority")
