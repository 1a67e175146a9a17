"""Create or upgrade the database schema with Alembic (``dicomnode db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from dicomnode.db.session import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creating it when empty)."""
    make_engine(url).dispose()  # creates the SQLite folder
    command.upgrade(alembic_config(url), revision)


def schema_problem(url: str) -> str:
    """Why this dicomnode cannot run on the database at ``url`` ("" when it can): no schema
    yet, an older schema (``dicomnode db upgrade``), or a newer one than it knows."""
    scripts = ScriptDirectory.from_config(alembic_config(url))
    head = scripts.get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    if current == head:
        return ""
    if current is None:
        return "the database has no schema yet: run `dicomnode db upgrade` first"
    if current in {script.revision for script in scripts.walk_revisions()}:
        return (
            f"the database schema is at revision {current}, this dicomnode needs {head}: "
            "back up the database, stop every node and worker that uses it, then run "
            "`dicomnode db upgrade`"
        )
    return (
        f"the database schema revision {current} is newer than this dicomnode knows "
        f"(its latest is {head}): run the dicomnode version that upgraded it"
    )
