"""Logging set-up, called only by the CLI (library modules just use getLogger).

Log lines carry UIDs, job ids and AE titles; never patient names or IDs.
The node's own messages are written that way. Libraries are not: pydicom logs
``Invalid value for VR DA: '19650100'``, highdicom warns ``The string "SMITH"
is unlikely to represent the intended person name``, and an exception's text
may quote a header value. So warnings are routed into logging, and every
quoted value in a library's message, and in any traceback, is replaced by
``<redacted>`` before a line is written (:class:`RedactQuotedValues`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname,
                "process": record.processName,
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")
REDACTED = "<redacted>"


def redact_quoted(text: str) -> str:
    """``text`` with every single- or double-quoted value replaced by ``'<redacted>'``."""
    return _QUOTED.sub(lambda m: f"{m.group(0)[0]}{REDACTED}{m.group(0)[0]}", text)


class RedactQuotedValues(logging.Filter):
    """Redact quoted values in library messages and in every traceback (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("dicomnode"):
            record.msg, record.args = redact_quoted(record.getMessage()), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = _redacted_traceback(record.exc_info[1])
            record.exc_info = None
        return True


def _redacted_traceback(exc: BaseException) -> str:
    """The traceback with its frames as they are and the exceptions' own text redacted."""
    lines = [
        line if line.startswith("  ") else redact_quoted(line)
        for line in traceback.format_exception(exc)
    ]
    return "".join(lines).rstrip("\n")


def configure(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(FORMAT))
    handler.addFilter(RedactQuotedValues())
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "alembic", "highdicom", "pylibjpeg"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
