"""A consistent copy of the node's SQLite database, taken while the node runs
(``dicomnode db backup``).

SQLite's online backup API copies the database page by page under its own locking, so the
copy is one consistent state even while the node writes (a copy of the file with ``cp`` can
catch a write half done, and misses what is still in the ``-wal`` file). The copy is written
beside its target, checked with ``PRAGMA integrity_check``, made a single self-contained file
(rollback journal, no WAL), flushed, then renamed into place: a backup that exists is whole.
PostgreSQL has its own tool for this, ``pg_dump``.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from dicomnode.db.session import SQLITE_BUSY_TIMEOUT_MS
from dicomnode.errors import DatabaseError
from dicomnode.store.files import fsync_file, move_durably, remove_quietly


@dataclass(frozen=True)
class Backup:
    """What :func:`backup_database` wrote."""

    source: Path
    target: Path
    size_bytes: int
    schema_revision: str


def backup_database(url: str, target: Path) -> Backup:
    """Copy the SQLite database at ``url`` to the new file ``target``; raises
    :class:`DatabaseError` for PostgreSQL (use ``pg_dump``), a missing database, an existing
    ``target``, or a copy that fails its integrity check, and :class:`StorageError` when the
    copy cannot be flushed or moved into place (nothing is left at ``target``)."""
    source = _sqlite_database(url)
    if target.exists():
        raise DatabaseError(f"{target} exists: a backup never overwrites a file, name a new one")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        revision = _copy(source, partial)
        size = fsync_file(partial)
        move_durably(partial, target)
    finally:
        remove_quietly(partial)
    return Backup(source, target, size, revision)


BACKUP_NAME = re.compile(r"dicomnode-\d{8}T\d{12}Z\.db")
"""The names :func:`backup_into` gives, and the only files its ``keep`` deletes."""


def backup_into(url: str, folder: Path, keep: int | None = None) -> tuple[Backup, list[Path]]:
    """Back up into ``folder`` as ``dicomnode-<UTC time>.db``; with ``keep``, then delete the
    folder's older backups beyond the newest ``keep`` (only files named so). Returns the
    backup and the files deleted."""
    if keep is not None and keep < 1:
        raise DatabaseError(f"--keep {keep}: keep at least the backup just taken (1)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    done = backup_database(url, folder / f"dicomnode-{stamp}.db")
    if keep is None:
        return done, []
    ours = sorted(p for p in folder.iterdir() if BACKUP_NAME.fullmatch(p.name) and p.is_file())
    old = ours[:-keep]
    for path in old:
        remove_quietly(path)
    return done, old


def _sqlite_database(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise DatabaseError(
            f"the database is {parsed.get_backend_name()}: back it up with its own tool, "
            f"e.g. `pg_dump --format=custom --file=dicomnode.dump {parsed.database or ''}`"
        )
    if not parsed.database or parsed.database == ":memory:":
        raise DatabaseError("the database is in memory: there is nothing to back up")
    source = Path(parsed.database)
    if not source.is_file():
        raise DatabaseError(f"no database at {source} (run `dicomnode db upgrade` first)")
    return source


def _copy(source: Path, partial: Path) -> str:
    """Copy ``source`` into ``partial`` with the backup API; its schema revision."""
    remove_quietly(partial)
    timeout = SQLITE_BUSY_TIMEOUT_MS / 1000
    try:
        with (
            closing(sqlite3.connect(source, timeout=timeout)) as src,
            closing(sqlite3.connect(partial, timeout=timeout)) as dst,
        ):
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one file, without a -wal beside it
            (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
            revision = dst.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as exc:
        raise DatabaseError(f"the backup of {source} failed: {exc}") from exc
    if verdict != "ok":
        raise DatabaseError(f"the copy of {source} failed its integrity check: {verdict}")
    return str(revision[0]) if revision else "(none)"
