"""instances: the size of a received file in a 64-bit integer

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 23:00:00

A file over 2 GiB (a long multi-frame object) did not fit PostgreSQL's ``integer``: the
C-STORE was refused as out of resources at every attempt. SQLite's integers are 64-bit
already; batch mode copies its table with the new type all the same.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size", existing_type=sa.BigInteger(), type_=sa.Integer())
