"""Validators every output object goes through in the tests: dicom3tools and dcmtk."""

from __future__ import annotations

import subprocess
from pathlib import Path

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy`` output that report an error (warnings are not errors).

    An ``Abort`` (dciodvfy could not read the file at all) is an error, and so is a
    non-zero exit status without any error line: a file dciodvfy did not check is not valid.
    """
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if "Error" in line or line.lstrip().startswith("Abort")]
    if run.returncode != 0 and not errors:
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        errors.append(f"dciodvfy exited {run.returncode}: {last}")
    return errors


def dciodvfy_warnings(path: Path) -> list[str]:
    """The lines of ``dciodvfy`` output that warn, but for the node's own coding scheme
    (``99DICOMNODE``, declared in every SR, which dciodvfy does not know)."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Warning") and "99DICOMNODE" not in line]


def dsrdump(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``dsrdump`` of a structured report (its return code says whether dcmtk could read it);
    ``options`` such as ``+Pu`` (print the referenced objects' UIDs)."""
    return subprocess.run(
        [str(DSRDUMP), *options, str(path)], capture_output=True, text=True, timeout=60
    )
