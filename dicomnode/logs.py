"""Logging set-up, called only by the CLI (library modules just use getLogger).

Log lines carry UIDs, job ids and AE titles; never patient names or IDs.
The node's own messages are written that way. Libraries are not: pydicom logs
``Invalid value for VR DA: '19650100'``, highdicom warns ``The string "SMITH"
is unlikely to represent the intended person name``, and an exception's text
may quote a header value. So warnings are routed into logging, and every
quoted value in a library's message, in an exception that a node's line
includes, and in any traceback, is replaced by ``<redacted>`` before a line is
written (:class:`RedactQuotedValues`); JSON lines carry the (redacted)
traceback as ``exception``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra={...}`` fields of a log call (counts, paths, timings; never patient data)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """:data:`FORMAT`, then the call's extra fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the line
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{head} {pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|\"[^\"\n]*\"")
"""A quoted value; a quote escaped inside it (Python's repr of ``O'BRIEN "JR"`` is
``'O\\'BRIEN "JR"'``) does not end it, unless nothing else ends the value (a raw DICOM
value ending in its separator, ``'DOE^JOHN\\'``)."""
_APOSTROPHE = re.compile(r"(?<=\w)(?<!\b[bBuUrR])'(?=\w)")
"""An apostrophe inside a word ("Patient's Name", "O'BRIEN"); not a string prefix's
quote (``b'...'``, ``u'...'``), which opens a value."""
_HELD = "\x00"
REDACTED = "<redacted>"


def redact_quoted(text: str) -> str:
    """``text`` with every single- or double-quoted value replaced by ``'<redacted>'``.

    Apostrophes inside words are held aside first, so that they neither open nor close
    a value; one pass over the text (a long line costs no more than its length).
    """
    held = _APOSTROPHE.sub(_HELD, text.replace(_HELD, ""))
    redacted = _QUOTED.sub(lambda m: f"{m.group(0)[0]}{REDACTED}{m.group(0)[0]}", held)
    return redacted.replace(_HELD, "'")


_SAID: dict[str, float] = {}
"""What libraries logged at WARNING and above lately (message: when): pydicom's
``warn_and_log`` logs a message and warns it too, and the warning is then not said again."""
_SAID_SECONDS = 5.0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """A warning as one log line (``warnings.formatwarning`` adds the source line below it,
    which breaks one-line log parsing), unless a library has just logged the same text."""
    text = str(message)
    said = _SAID.get(text)
    if said is not None and time.monotonic() - said < _SAID_SECONDS:
        return
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, text, Path(filename).name, lineno
    )


def _remember(record: logging.LogRecord, message: str) -> None:
    if record.levelno >= logging.WARNING and record.name != "py.warnings":
        if len(_SAID) > 256:
            _SAID.clear()
        _SAID[message] = time.monotonic()


class RedactQuotedValues(logging.Filter):
    """Redact quoted values in library messages and in every traceback (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("dicomnode"):
            _remember(record, record.getMessage())
            record.msg, record.args = redact_quoted(record.getMessage()), None
        elif isinstance(record.args, tuple) and any(
            isinstance(arg, BaseException) for arg in record.args
        ):  # the node's own line, quoting an exception's (a library's) text
            record.args = tuple(
                redact_quoted(str(arg)) if isinstance(arg, BaseException) else arg
                for arg in record.args
            )
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _redacted_traceback(record.exc_info[1])
            record.exc_info = None
        return True


_FRAME = re.compile(r'^[\s|+\-]*File "')
"""A traceback's frame line (also inside an exception group's ``  | `` block)."""


def _redacted_traceback(exc: BaseException) -> str:
    """The traceback with its frame lines as they are and every other line (the exceptions'
    own text, chained or grouped, and the source lines) redacted."""
    lines = "".join(traceback.format_exception(exc)).splitlines(keepends=True)
    kept = [line if _FRAME.match(line) else redact_quoted(line) for line in lines]
    return "".join(kept).rstrip("\n")


def configure(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(RedactQuotedValues())
    logging.captureWarnings(True)  # keeps the original showwarning, for captureWarnings(False)
    warnings.showwarning = _show_warning
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "alembic", "highdicom", "pylibjpeg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
