"""Partial files of aborted transfers are removed once no transfer can be writing them."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
