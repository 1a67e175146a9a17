"""Validators every output object goes through in the tests: dicom3tools and dcmtk."""

from __future__ import annotations

import subprocess
from pathlib import Path

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy`` output that report an error (warnings are not errors)."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """``dsrdump`` of a structured report (its return code says whether dcmtk could read it)."""
    return subprocess.run([str(DSRDUMP), str(path)], capture_output=True, text=True, timeout=60)
