"""The card of every model version the node opened a round with

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 02:00:00

A study is reported again by the model version that reported it (a rejection note that
arrives weeks later): its SR and rejection notes name that version as the earlier SR did,
also after the version was replaced in ``models/``. The card (JSON) is kept from the first
round the version opens; rounds opened before this revision by a version no longer installed
cannot be reported again (their report job says so).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_cards",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("card", sa.Text(), nullable=False),
        sa.Column("first_used_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("model_cards")
