"""A throwaway PostgreSQL server (Debian package ``postgresql``) on a free loopback port.

Used by the tests that prove the queue and the node on the scale-out database.
The cluster lives in a temporary folder owned by the ``postgres`` user and is
removed on :meth:`TempPostgres.stop`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from dicomnode.testing.peers import LOOPBACK, free_port, wait_for_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class TempPostgres:
    """``initdb`` + ``pg_ctl start`` as the postgres user; a database named ``dicomnode``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-", dir="/tmp"))
        self.bin = _bin_dir()

    @staticmethod
    def available() -> bool:
        if _bin_dir() is None or os.geteuid() != 0:
            return False
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/dicomnode"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> TempPostgres:
        assert self.bin is not None
        shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"
        )
        options = f"-h {LOOPBACK} -p {self.port} -k {self.folder} -c fsync=on"
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.folder / "log"),
            "-w",
            "start",
        )
        wait_for_port(self.port)
        self._as_postgres(
            str(self.bin / "createdb"),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "dicomnode",
        )
        return self

    def stop(self) -> None:
        assert self.bin is not None
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.folder / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(self.folder, ignore_errors=True)
