"""Shared fixtures: a migrated SQLite database, settings, tiny models, radiographs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import Settings
from dicomnode.db.migrate import upgrade
from dicomnode.db.session import Database
from dicomnode.testing.node import make_settings
from dicomnode.testing.peers import pynetdicom_receive_globals_restored


@pytest.fixture(autouse=True)
def _pynetdicom_receive_globals() -> Iterator[None]:
    """Each test leaves pynetdicom's receiving as it found it: a node started in a test
    switches it, process-wide, to write into that test's folder (see ``receive_into``)."""
    with pynetdicom_receive_globals_restored():
        yield


@pytest.fixture(autouse=True)
def _umask_restored() -> Iterator[None]:
    """Each test leaves the process's file-creation mask as it found it (the CLI sets
    ``storage.umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    try:
        yield
    finally:
        os.umask(mask)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def db(settings: Settings) -> Database:
    upgrade(settings.database.url)
    database = Database(settings.database.url)
    yield database  # type: ignore[misc]
    database.dispose()
