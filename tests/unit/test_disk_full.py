"""A disk that fills up during a write: StorageFullError, no partial file, nothing recorded."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import func, select

from dicomnode.config import Settings
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.errors import StorageFullError
from dicomnode.store import files
from dicomnode.store.instances import facts_from_dataset, store_instance
from dicomnode.testing.images import make_radiograph, write_dataset

TEMPORARY = ".incoming-"  # the prefix of write_durably's temporary files


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _is_temporary(fd: int) -> bool:
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(TEMPORARY)


class _FullDiskFile:
    """A file opened for writing whose writes fail as on a full disk."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def write(self, data: bytes) -> int:
        raise _disk_full()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _fail_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real: Callable[..., Any] = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real(fd, *args, **kwargs)
        return _FullDiskFile(handle) if _is_temporary(fd) else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def _fail_fsyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The write is buffered; flushing it to disk finds no space (delayed allocation)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if _is_temporary(fd):
            raise _disk_full()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


FAILURES = {"write": _fail_writes, "fsync": _fail_fsyncs}


@pytest.mark.parametrize("failing", sorted(FAILURES))
def test_a_full_disk_leaves_neither_the_file_nor_a_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    FAILURES[failing](monkeypatch)
    target = tmp_path / "outputs" / "1.2.3.dcm"
    with pytest.raises(StorageFullError, match=re.escape("disk full while writing 1.2.3.dcm")):
        files.write_durably(target, [b"DICM", b"\0" * 4096])
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("failing", sorted(FAILURES))
def test_an_instance_that_fills_the_disk_is_not_recorded(
    tmp_path: Path,
    settings: Settings,
    db: Database,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """Received on another volume, the instance is copied into place; the copy fills the disk."""
    data_dir = Path(settings.storage.data_dir)
    received = write_dataset(make_radiograph(rows=64, columns=48), tmp_path / "other" / "rx.dcm")
    facts = facts_from_dataset(
        pydicom.dcmread(received, stop_before_pixels=True), ExplicitVRLittleEndian
    )
    real_replace = os.replace

    def replace(source: Any, target: Any) -> None:
        if Path(source) == received:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    FAILURES[failing](monkeypatch)
    with pytest.raises(StorageFullError, match="disk full"):
        store_instance(db, data_dir, facts, received, calling_ae="MOD", association_id="assoc-full")
    path = files.instance_path(data_dir, facts.study_uid, facts.series_uid, facts.sop_uid)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temporary file left beside it
    assert received.exists()  # the received copy is still there for a retry
    with db.session() as session:
        assert session.execute(select(func.count()).select_from(Instance)).scalar_one() == 0
