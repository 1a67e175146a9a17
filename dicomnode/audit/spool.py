"""Audit messages kept on disk until the repository has them, so that a crash or a stop
while it is down loses none.

One file a message, named ``<time ns>-<pid>-<sequence>.msg`` (in the order they were
recorded), in a folder of this host's (a data folder shared by several hosts holds one
spool each). The process that wrote a file deletes it once written; the files of a process
that is gone are adopted by the next trail on the host (renamed to its own name, so that
two cannot both take one) and written first.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from pathlib import Path

from dicomnode.config import Settings

log = logging.getLogger(__name__)

SUFFIX = ".msg"


def spool_of(settings: Settings) -> Spool:
    """This host's spool: ``audit.spool_dir``, or ``<storage.data_dir>/audit-spool``, then
    a folder named after the host."""
    folder = settings.audit.spool_dir or Path(settings.storage.data_dir) / "audit-spool"
    return Spool(folder / socket.gethostname())


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sequence = itertools.count()
        self._failing = False

    def keep(self, message: bytes) -> Path | None:
        """Write ``message`` to a file of its own; ``None`` (logged once) when it cannot be:
        the message is then held in memory only."""
        path = self.folder / self._name(time.time_ns(), os.getpid())
        partial = path.with_suffix(".part")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.write(fd, message)
            finally:
                os.close(fd)
            partial.replace(path)
        except OSError as exc:
            if not self._failing:
                log.error(
                    "audit spool %s cannot be written (%s): messages are held in memory "
                    "only until it can",
                    self.folder,
                    exc,
                )
            self._failing = True
            return None
        self._failing = False
        return path

    def done(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("audit spool: %s cannot be deleted (%s); it is written again", path.name, exc)

    def adopt(self) -> list[tuple[Path, bytes]]:
        """The messages of processes that are gone, oldest first, now this process's."""
        if not self.folder.is_dir():
            return []
        adopted: list[tuple[Path, bytes]] = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            taken = self._take(path)
            if taken is not None:
                try:
                    adopted.append((taken, taken.read_bytes()))
                except OSError as exc:
                    log.error("audit spool: %s cannot be read (%s)", taken.name, exc)
        if adopted:
            log.info(
                "audit spool: %d message(s) left by a stopped process are sent first", len(adopted)
            )
        return adopted

    def waiting(self) -> tuple[int, float | None]:
        """Messages in the spool (every process of the host), and when the oldest was
        recorded (seconds since the epoch; ``None`` when there is none)."""
        if not self.folder.is_dir():
            return 0, None
        stamps = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                stamps.append(int(path.stem.split("-")[0]) / 1e9)
            except ValueError:
                continue
        return len(stamps), min(stamps, default=None)

    def _take(self, path: Path) -> Path | None:
        """``path`` renamed to this process's name when its writer is gone, else ``None``."""
        try:
            stamp, pid, _ = path.stem.split("-")
            if _alive(int(pid)):
                return None
            mine = self.folder / self._name(int(stamp), os.getpid())
            path.rename(mine)  # one process wins; the others find it gone
        except (ValueError, OSError):
            return None
        return mine

    def _name(self, stamp: int, pid: int) -> str:
        return f"{stamp:020d}-{pid}-{next(self._sequence):09d}{SUFFIX}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
