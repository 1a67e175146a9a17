"""A round may withdraw the study's results (dicomnode withdraw)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 02:30:00

An administrator withdraws the node's results of a study (a model recall, an image analysed
outside the model's intended use): a round closed at once whose report is a rejection note
listing the result objects sent so far, under the title given, and no SR. Later rounds of the
study and model version report only what came after it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.add_column(
            sa.Column("withdrawal_code", sa.String(16), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("withdrawal_note", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("withdrawal_note")
        batch.drop_column("withdrawal_code")
