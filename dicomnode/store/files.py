"""Write files so that a success means the bytes are on disk.

Every file is written to a temporary name in the same folder, flushed and
``fsync``-ed, renamed over its final name, and the folder is ``fsync``-ed, so
a crash leaves either the whole file or none. UIDs become path parts only
after :func:`checked_uid` has accepted them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from dicomnode.errors import InvalidInstanceError, StorageError, StorageFullError

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MEBIBYTE = 1 << 20


def checked_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidInstanceError`.

    A valid UID is 1-64 characters of digits and dots, with no empty or
    zero-padded components, so it is also a safe file or folder name.
    """
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise InvalidInstanceError(f"{what} is missing")
    if len(text) > 64 or not _UID.match(text):
        raise InvalidInstanceError(f"{what} is not a valid UID")
    return text


def free_mb(path: Path) -> float:
    """Free space (MiB) on the volume holding ``path`` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / MEBIBYTE


def ensure_free_space(path: Path, min_free_mb: float, incoming_bytes: int = 0) -> None:
    """Raise :class:`StorageFullError` when writing ``incoming_bytes`` would go below the floor."""
    available = free_mb(path) - incoming_bytes / MEBIBYTE
    if available < min_free_mb:
        raise StorageFullError(
            f"only {available:.0f} MiB would be free under {path}; the floor is {min_free_mb} MiB"
        )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsync-ing the parent of each new one.

    A new study folder whose entry in ``instances/`` is not on disk would lose the
    files under it in a crash, however well they were flushed themselves.
    """
    missing: list[Path] = []
    probe = folder
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def file_mode() -> int:
    """The mode a new file gets under the process's umask (``storage.umask`` 027: 0640).

    Temporary files are made 0600 whatever the umask; a stored image or result is given
    this mode, so a backup agent in the service account's group can read it as documented.
    """
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o077)  # elsewhere: set and restored (briefly stricter, never looser)
    os.umask(current)
    return current


def write_durably(path: Path, chunks: bytes | list[bytes]) -> int:
    """Write ``chunks`` to ``path`` atomically and durably; return the size written."""
    parts = [chunks] if isinstance(chunks, bytes) else chunks
    make_folders_durably(path.parent)
    fd, temp_name = tempfile.mkstemp(prefix=".incoming-", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise StorageFullError(f"disk full while writing {path.name}") from exc
        raise StorageError(f"cannot write {path.name}: {exc.strerror}") from exc
    return sum(len(p) for p in parts)


def fsync_file(path: Path) -> int:
    """Flush a file that another writer produced to disk; return its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    except OSError as exc:
        raise StorageError(f"cannot flush {path.name}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def move_durably(source: Path, target: Path) -> None:
    """Rename an fsync-ed file into place and fsync the folder (copy when across volumes)."""
    make_folders_durably(target.parent)
    try:
        os.chmod(source, file_mode())  # received into a 0600 temporary file
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise StorageError(f"cannot move {source.name} into place: {exc.strerror}") from exc
        write_durably(target, source.read_bytes())
        source.unlink()
        return
    _fsync_dir(target.parent)


def instance_path(data_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where a received instance lives: ``<data>/instances/<study>/<series>/<sop>.dcm``."""
    return data_dir / "instances" / study_uid / series_uid / f"{sop_uid}.dcm"


def output_path(data_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where a result object lives: ``<data>/outputs/<study>/<series>/<sop>.dcm``."""
    return data_dir / "outputs" / study_uid / series_uid / f"{sop_uid}.dcm"


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
