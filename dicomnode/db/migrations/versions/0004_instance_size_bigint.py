"""instances: the size of a received file in a 64-bit integer

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 23:00:00

A file over 2 GiB (a long multi-frame object) did not fit PostgreSQL's ``integer``: the
C-STORE was refused as out of resources at every attempt. SQLite's integers are 64-bit
already, and its table is left as it is: batch mode would copy and drop ``instances``,
which the results reference, and SQLite's foreign keys refuse the drop.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _on_postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    if _on_postgresql():
        op.alter_column("instances", "size", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    if _on_postgresql():
        op.alter_column("instances", "size", existing_type=sa.BigInteger(), type_=sa.Integer())
