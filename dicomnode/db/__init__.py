"""The node's database: SQLAlchemy tables, sessions and Alembic migrations."""
