"""The migrations make the tables the code declares: a column or index added to
`dicomnode/db/schema.py` without its revision (or the other way round) fails here, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from dicomnode.db.schema import Base
from dicomnode.db.session import Database

pytestmark = pytest.mark.both_databases


def test_the_migrated_database_is_the_declared_schema(db: Database) -> None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []
