"""The peers the tests run against are installed: `make test` cannot pass by skipping them.

Each test that needs dcmtk, dicom3tools, Orthanc, PostgreSQL or pydicom-data skips
without it, so a developer without them can still run the rest. This test is the one
that fails instead, naming every missing piece; `make test` installs them all.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dicomnode.testing.peers import Orthanc
from dicomnode.testing.postgres import TempPostgres, _bin_dir

TOOLS = {
    "/usr/bin/dciodvfy": "dicom3tools",
    "/usr/bin/dsrdump": "dcmtk",
    "/usr/bin/dcmdump": "dcmtk",
    "/usr/bin/dcmcjpeg": "dcmtk",
    "/usr/bin/storescu": "dcmtk",
    "/usr/bin/storescp": "dcmtk",
    "/usr/bin/echoscu": "dcmtk",
    "/usr/bin/openssl": "openssl",
}


def _module_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing_peers() -> list[str]:
    """What the skipping tests need and this machine lacks, each with where it comes from."""
    missing = [
        f"{path} (Debian package {package})"
        for path, package in TOOLS.items()
        if not Path(path).is_file()
    ]
    if not Orthanc.available():
        missing.append(f"{Orthanc.BINARY} (Debian package orthanc)")
    if _bin_dir() is None:
        missing.append("/usr/lib/postgresql/*/bin/initdb (Debian package postgresql)")
    elif not TempPostgres.available():
        missing.append("the postgres account and runuser, to run PostgreSQL as root")
    if not _module_installed("data_store"):
        missing.append("the data_store module (pip package pydicom-data, extra [test])")
    return missing


def test_every_peer_the_tests_use_is_installed() -> None:
    missing = missing_peers()
    assert not missing, (
        "tests that need these skip, so the suite proves less than it claims: "
        + "; ".join(missing)
        + ". Run `make system-deps` for the Debian packages and "
        "`.venv/bin/pip install -e '.[test]'` for the pip extra (`make test` does both)."
    )


def test_each_missing_peer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with nothing installed it names every piece."""
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "TOOLS", {"/nonexistent/dciodvfy": "dicom3tools"})
    monkeypatch.setattr(Orthanc, "available", staticmethod(lambda: False))
    monkeypatch.setattr(here, "_bin_dir", lambda: None)
    monkeypatch.setattr(here, "_module_installed", lambda name: False)
    named = "\n".join(missing_peers())
    for piece in ("/nonexistent/dciodvfy", Orthanc.BINARY, "postgresql", "pydicom-data"):
        assert piece in named
