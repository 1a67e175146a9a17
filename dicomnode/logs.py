"""Logging set-up, called only by the CLI (library modules just use getLogger).

Log lines carry UIDs, job ids and AE titles; never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import sys

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


def configure(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
