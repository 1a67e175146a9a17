"""Shared fixtures: a migrated SQLite database, settings, tiny models, radiographs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import Settings
from dicomnode.db.migrate import upgrade
from dicomnode.db.session import Database
from dicomnode.testing.node import make_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def db(settings: Settings) -> Database:
    upgrade(settings.database.url)
    database = Database(settings.database.url)
    yield database  # type: ignore[misc]
    database.dispose()
