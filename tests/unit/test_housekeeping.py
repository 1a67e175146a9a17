"""Housekeeping of the data folder: stale partial files go, new folders are made durably."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.receive.scp import INCOMING_PREFIX, remove_stale_incoming


def test_only_stale_partial_files_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f"{INCOMING_PREFIX}aborted"
    live = tmp_path / f"{INCOMING_PREFIX}arriving"
    other = tmp_path / "kept.dcm"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3601
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert remove_stale_incoming(tmp_path, 3600) == 1
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert remove_stale_incoming(tmp_path / "missing", 3600) == 0


def test_new_folders_are_made_with_their_parents_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.store import files

    flushed: list[Path] = []
    monkeypatch.setattr(files, "_fsync_dir", lambda folder: flushed.append(Path(folder)))
    target = tmp_path / "instances" / "1.2" / "1.2.3"
    files.make_folders_durably(target)
    assert target.is_dir()
    assert flushed == [tmp_path, tmp_path / "instances", tmp_path / "instances" / "1.2"]
    flushed.clear()
    files.make_folders_durably(target)  # nothing new: nothing to flush
    assert flushed == []
