"""Rejection notes (IHE IOCM): the instances a Key Object Selection document withdrew

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 23:10:00

A received rejection note (a KOS titled "Rejected for Quality Reasons", "Rejected for
Patient Safety Reasons", "Incorrect Modality Worklist Entry" or "Data Retention Policy
Expired") records each instance it lists that the node holds: it is analysed no more, the
study's reports leave it out, and the node rejects what it made from it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejections",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("code", sa.String(16), nullable=False),
        sa.Column("note_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("rejected_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_rejections_study_instance_uid", "rejections", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_rejections_study_instance_uid", table_name="rejections")
    op.drop_table("rejections")
