"""Log lines never carry patient data, even when a library quotes a header value."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest

from dicomnode import logs

NOISY = ("pynetdicom", "alembic", "highdicom", "pylibjpeg")
"""The libraries' loggers whose levels ``logs.configure`` sets besides the root's."""


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Put back what ``logs.configure`` changes: the root logger's handlers and level, the
    level of every named logger (the noisy libraries' included) and warnings capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    named = [logging.getLogger(name) for name in NOISY]
    named += [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger not in named
    ]
    levels = [(logger, logger.level) for logger in named]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for logger, saved in levels:
            logger.setLevel(saved)
        logging.captureWarnings(False)


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """capsys, with the logging set-up restored afterwards (tests call configure)."""
    with logging_restored():
        yield capsys


def _state() -> tuple[list[logging.Handler], int, list[int]]:
    root = logging.getLogger()
    return root.handlers[:], root.level, [logging.getLogger(name).level for name in NOISY]


def test_configure_is_undone_after_each_test() -> None:
    """No later test runs with the levels or handlers a configure call here left."""
    before = _state()
    with logging_restored():
        logs.configure("DEBUG")
        assert _state() != before
        assert [logging.getLogger(name).level for name in NOISY] == [logging.WARNING] * 4
    assert _state() == before


def test_redact_quoted_replaces_single_and_double_quoted_values() -> None:
    text = """Invalid value for VR DA: '19650100'. The string "SMITH" is a name"""
    assert logs.redact_quoted(text) == (
        """Invalid value for VR DA: '<redacted>'. The string "<redacted>" is a name"""
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "(0010,0010) Patient's Name   PN: 'DOE^JOHN'",
            "(0010,0010) Patient's Name   PN: '<redacted>'",
        ),
        (
            "(0010,0030) Patient's Birth Date   DA: '19650101'",
            "(0010,0030) Patient's Birth Date   DA: '<redacted>'",
        ),
        (
            """Unable to convert 'O'BRIEN^SEAN "JR"' to a person name""",
            "Unable to convert '<redacted>' to a person name",
        ),
        ("""The string "O'BRIEN^SEAN" is not valid""", 'The string "<redacted>" is not valid'),
        ("values 'DOE^JOHN' and 'DOE^JANE'", "values '<redacted>' and '<redacted>'"),
        ("raw b'Doe^John' or u'Doe'", "raw b'<redacted>' or u'<redacted>'"),
        (
            f"value {'O' + chr(39) + 'BRIEN ' + chr(34) + 'JR' + chr(34)!r} refused",
            "value '<redacted>' refused",
        ),  # Python's repr escapes the apostrophe
        (r"path 'C:\\DOE\\' kept", "path '<redacted>' kept"),
        (r"value 'DOE^JOHN\' for VR PN", "value '<redacted>' for VR PN"),  # a raw separator
    ],
)
def test_apostrophes_neither_open_nor_close_a_redacted_value(text: str, expected: str) -> None:
    assert logs.redact_quoted(text) == expected


def test_an_exception_group_and_a_chain_are_redacted(
    captured: pytest.CaptureFixture[str],
) -> None:
    logs.configure("DEBUG")
    try:
        try:
            raise KeyError("DOE^JOHN")
        except KeyError as cause:
            inner = [ValueError("value 'DOE^JANE'"), TypeError("bad 'SMITH^ANN'")]
            raise ExceptionGroup("two failed", inner) from cause
    except ExceptionGroup:
        logging.getLogger("dicomnode.worker").exception("report 3 failed")
    err = captured.readouterr().err
    assert "ValueError: value '<redacted>'" in err and "test_logs.py" in err
    assert not any(name in err for name in ("DOE^JOHN", "DOE^JANE", "SMITH^ANN"))


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


def test_a_library_warning_is_one_line_and_said_once(
    captured: pytest.CaptureFixture[str],
) -> None:
    """pydicom logs a message and warns it too: each came out, the warning over three lines
    (with its source line), which breaks one-line log parsing."""
    logs.configure("INFO")
    ds = pydicom.Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds.PatientBirthDate = "1965-01-01"
        warnings.warn("a plain library warning", UserWarning, 1)
    lines = captured.readouterr().err.strip().splitlines()
    assert len([line for line in lines if "Invalid value for VR DA" in line]) == 1
    (plain,) = [line for line in lines if "a plain library warning" in line]
    assert "py.warnings: UserWarning: a plain library warning (test_logs.py:" in plain
    assert len(lines) == 2


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


def test_an_exception_in_the_nodes_own_line_is_redacted(
    captured: pytest.CaptureFixture[str],
) -> None:
    logs.configure("DEBUG")
    error = ValueError("Unable to convert 'SMITH^JOHN' to 'PN'")
    logging.getLogger("dicomnode.retention").error("cannot purge study=%s: %s", "1.2.3", error)
    err = captured.readouterr().err
    assert "cannot purge study=1.2.3: Unable to convert '<redacted>'" in err
    assert "SMITH" not in err


def test_json_lines_keep_the_redacted_traceback(captured: pytest.CaptureFixture[str]) -> None:
    logs.configure("DEBUG", json_format=True)
    name = "DOE^JANE"
    try:
        raise ValueError(f"Unable to convert '{name}' to 'PN'")
    except ValueError:
        logging.getLogger("dicomnode.worker").exception("infer jobs [7] failed")
    line = json.loads(captured.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "infer jobs [7] failed"
    assert (
        "test_logs.py" in line["exception"] and "ValueError: Unable to convert" in line["exception"]
    )
    assert "DOE^JANE" not in json.dumps(line)


def test_redaction_of_a_long_line_takes_as_long_as_reading_it() -> None:
    """A line of 100,000 unclosed quotes took 18 s with a backtracking pattern."""
    import time

    line = " 'a" * 33_000
    started = time.perf_counter()
    logs.redact_quoted(line)
    assert time.perf_counter() - started < 2.0  # linear: milliseconds; quadratic: 18 s
