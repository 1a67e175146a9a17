"""The dciodvfy check the tests rely on fails on files it could not check."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.validate import DCIODVFY, dciodvfy_errors

pytestmark = pytest.mark.skipif(
    not DCIODVFY.exists(), reason="dicom3tools dciodvfy is not installed"
)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    errors = dciodvfy_errors(tmp_path / "absent.dcm")
    assert errors
    assert any("Abort" in line or "exited" in line for line in errors)


def test_a_file_that_is_not_dicom_is_an_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(bytes(range(256)) * 4)
    assert dciodvfy_errors(garbage) != []


def test_a_valid_radiograph_has_no_errors(tmp_path: Path) -> None:
    path = write_dataset(make_radiograph(rows=64, columns=48), tmp_path / "dx.dcm")
    assert dciodvfy_errors(path) == []


def test_a_failing_exit_without_an_error_line_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dciodvfy that exits non-zero and prints no "Error" still fails the check."""
    fake = tmp_path / "dciodvfy"
    fake.write_text("#!/bin/sh\necho 'Warning - something odd'\necho 'cannot go on' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr("dicomnode.testing.validate.DCIODVFY", fake)
    assert dciodvfy_errors(tmp_path / "any.dcm") == ["dciodvfy exited 3: cannot go on"]
