"""Shared fixtures: a migrated database (SQLite; PostgreSQL too for tests marked
``both_databases``), settings, tiny models, radiographs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicomnode.config import Settings
from dicomnode.db.migrate import upgrade
from dicomnode.db.session import Database
from dicomnode.testing.node import make_settings
from dicomnode.testing.peers import pynetdicom_receive_globals_restored
from dicomnode.testing.postgres import TempPostgres

if TYPE_CHECKING:
    from dicomnode.testing.inprocess import InProcessNode

POSTGRES_MISSING = "the PostgreSQL server is not installed"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist gives its workers COLUMNS=80, which the CLI (and the nodes the tests
    # start) would take as the width of their piped output: the tests read it as piped.
    os.environ.pop("COLUMNS", None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_databases`` that takes ``db`` runs on SQLite and on PostgreSQL."""
    if "db" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_databases"):
        postgres = pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(not TempPostgres.available(), reason=POSTGRES_MISSING),
        )
        metafunc.parametrize("db", ["sqlite", postgres], indirect=True)


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


def _on_postgres(request: pytest.FixtureRequest) -> bool:
    """The test runs in its PostgreSQL variant (``both_databases``)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("db") == "postgresql"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The node's settings under ``tmp_path``; their database is the test's ``db``."""
    if _on_postgres(request):
        url = request.getfixturevalue("postgres").url
        return make_settings(tmp_path, database={"url": url})
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """One throwaway PostgreSQL server for the whole run, started when a test first asks."""
    server = TempPostgres().start()  # stops what it started when a step fails
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def db(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Database]:
    """The node's database: SQLite in the test's folder, or (parametrised by
    ``both_databases``) the session's PostgreSQL server, emptied."""
    if _on_postgres(request):
        database = request.getfixturevalue("postgres").emptied_database()
    else:
        upgrade(settings.database.url)
        database = Database(settings.database.url)
    yield database
    database.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    """The whole node in this process (SQLite, a tiny knee model, a collecting PACS)."""
    from dicomnode.testing.inprocess import InProcessNode

    started = InProcessNode.start(tmp_path)
    yield started
    started.close()
