"""DICOMweb peers: results sent by STOW-RS to a peer's DICOMweb service

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 20:10:00

A peer with a ``dicomweb`` base URL receives results by STOW-RS instead of C-STORE;
``dicomweb_auth_file`` names the file that holds its HTTP Authorization header value (the
secret itself is never in the database).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.add_column(sa.Column("dicomweb", sa.String(1024), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("dicomweb_auth_file", sa.String(1024), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch:
        batch.drop_column("dicomweb_auth_file")
        batch.drop_column("dicomweb")
