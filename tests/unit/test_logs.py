"""Log lines never carry patient data, even when a library quotes a header value."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest

from dicomnode import logs


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys, with the root logger's set-up restored afterwards (tests call configure)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield capsys
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_redact_quoted_replaces_single_and_double_quoted_values() -> None:
    text = """Invalid value for VR DA: '19650100'. The string "SMITH" is a name"""
    assert logs.redact_quoted(text) == (
        """Invalid value for VR DA: '<redacted>'. The string "<redacted>" is a name"""
    )


def test_library_warnings_and_log_lines_are_redacted(
    captured: pytest.CaptureFixture[str],
) -> None:
    logs.configure("DEBUG")
    ds = pydicom.Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds.PatientBirthDate = "1965-01-01"  # pydicom logs and warns, quoting the value
        warnings.warn('The string "SMITH" is unlikely to be a person name', UserWarning, 1)
    err = captured.readouterr().err
    assert "Invalid value for VR DA" in err and "unlikely to be a person name" in err
    assert "1965-01-01" not in err and "SMITH" not in err


def test_tracebacks_keep_their_frames_and_lose_quoted_values(
    captured: pytest.CaptureFixture[str],
) -> None:
    logs.configure("DEBUG")
    name = "DOE^JANE"
    try:
        raise ValueError(f"Unable to convert '{name}' to 'PN'")
    except ValueError:
        logging.getLogger("dicomnode.worker").exception("infer jobs [7] failed")
    err = captured.readouterr().err
    assert "infer jobs [7] failed" in err
    assert "test_logs.py" in err and "ValueError: Unable to convert" in err
    assert "DOE^JANE" not in err


def test_the_nodes_own_messages_are_left_as_written(
    captured: pytest.CaptureFixture[str],
) -> None:
    logs.configure("DEBUG")
    logging.getLogger("dicomnode.peers").info("peer 'PACS' added")
    assert "peer 'PACS' added" in captured.readouterr().err


def test_extra_fields_are_written_in_text_and_json(captured: pytest.CaptureFixture[str]) -> None:
    logs.configure("DEBUG")
    logging.getLogger("dicomnode.x").info("phantom folder complete", extra={"count": 4})
    assert "phantom folder complete count=4" in captured.readouterr().err
    logs.configure("DEBUG", json_format=True)
    logging.getLogger("dicomnode.x").info("phantom folder complete", extra={"count": 4})
    line = json.loads(captured.readouterr().err.strip().splitlines()[-1])
    assert (line["message"], line["count"]) == ("phantom folder complete", 4)
