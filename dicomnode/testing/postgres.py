"""A throwaway PostgreSQL server (Debian package ``postgresql``) on a free loopback port.

Used by the tests that prove the queue and the node on the scale-out database.
The cluster lives in a temporary folder and is removed on :meth:`TempPostgres.stop`.
PostgreSQL refuses to run as root: as root the cluster belongs to the ``postgres``
user and every server command runs as that user (``runuser``); as anyone else it
belongs to the current user and the commands run directly. Either way the
superuser of the cluster is named ``postgres`` (``initdb -U postgres``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from dicomnode.db.migrate import upgrade
from dicomnode.db.schema import Base
from dicomnode.db.session import Database
from dicomnode.testing.peers import LOOPBACK, free_port, wait_for_port

SUPERUSER = "postgres"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _is_root() -> bool:
    return os.geteuid() == 0


class TempPostgres:
    """``initdb`` + ``pg_ctl start`` (as the postgres user when root); a database ``dicomnode``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dicomnode-pg-", dir="/tmp"))
        self.bin = _bin_dir()

    @staticmethod
    def available() -> bool:
        """The server binaries are installed (and, as root, the ``postgres`` account exists)."""
        if _bin_dir() is None:
            return False
        if not _is_root():
            return True
        if shutil.which("runuser") is None:
            return False
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{LOOPBACK}:{self.port}/dicomnode"

    @staticmethod
    def _command(*command: str) -> list[str]:
        """``command`` as the cluster's owner: the postgres user when root, else ourselves."""
        return ["runuser", "-u", "postgres", "--", *command] if _is_root() else list(command)

    def _run(self, *command: str) -> None:
        try:
            subprocess.run(self._command(*command), check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            output = (exc.stdout or b"").decode(errors="replace")
            output += (exc.stderr or b"").decode(errors="replace")
            raise RuntimeError(
                f"{Path(command[0]).name} exited {exc.returncode}: {output.strip()}"
            ) from exc

    def start(self) -> TempPostgres:
        """Create and start the cluster; on any failure stop what was started and re-raise."""
        assert self.bin is not None
        try:
            self._start(self.bin)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, bin_dir: Path) -> None:
        if _is_root():
            shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        self._run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", SUPERUSER)
        options = f"-h {LOOPBACK} -p {self.port} -k {self.folder} -c fsync=on"
        self._run(
            str(bin_dir / "pg_ctl"),
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
        self._run(
            str(bin_dir / "createdb"),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "dicomnode",
        )

    def emptied_database(self) -> Database:
        """The server's database at the current schema, every table emptied (one server
        serves many tests)."""
        upgrade(self.url)
        database = Database(self.url)
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        with database.engine.begin() as connection:
            connection.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY")
        return database

    def stop(self) -> None:
        """Stop the server if it runs and remove the folder (safe after a failed start)."""
        data = self.folder / "data"
        if self.bin is not None and data.is_dir():
            subprocess.run(
                self._command(
                    str(self.bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"
                ),
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(self.folder, ignore_errors=True)
