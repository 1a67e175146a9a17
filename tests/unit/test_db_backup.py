"""`dicomnode db backup`: a consistent, whole copy of the SQLite database while it is written."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from alembic.script import ScriptDirectory
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import Settings
from dicomnode.db.migrate import alembic_config
from dicomnode.db.schema import Peer
from dicomnode.db.session import Database
from dicomnode.errors import DatabaseError
from dicomnode.peers import PeerInfo, add_peer
from dicomnode.store.backup import backup_database, backup_into


def _peers(path: Path) -> int:
    with closing(sqlite3.connect(path)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM peers").fetchone()
    return int(count)


def test_a_backup_taken_while_the_node_writes_is_whole_and_current(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """Peers are added one transaction at a time while the copy is taken: the copy holds a
    state between the first and the last, passes its integrity check, is one file (no WAL
    beside it) and is at the schema's current revision."""
    stop, added = threading.Event(), [0]

    def write() -> None:
        while not stop.is_set() or added[0] < 50:
            with db.session() as session:
                add_peer(session, PeerInfo(f"P{added[0]}", f"AE{added[0]}", "127.0.0.1", 104))
            added[0] += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while added[0] < 20:
            stop.wait(0.01)
        before = added[0]
        done = backup_database(settings.database.url, tmp_path / "backups" / "node.db")
        during = added[0]
    finally:
        stop.set()
        writer.join(30)
    assert before <= _peers(done.target) <= during
    assert added[0] > during  # the node went on writing after the copy
    with closing(sqlite3.connect(done.target)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    head = ScriptDirectory.from_config(alembic_config(settings.database.url)).get_current_head()
    assert done.schema_revision == head
    assert done.size_bytes == done.target.stat().st_size
    assert sorted(p.name for p in done.target.parent.iterdir()) == ["node.db"]
    with db.session() as session:  # the node's own database is untouched by the copy
        assert session.query(Peer).count() == added[0]


def test_a_backup_never_overwrites_and_postgresql_is_sent_to_pg_dump(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    existing = tmp_path / "yesterday.db"
    existing.write_bytes(b"yesterday's backup")
    with pytest.raises(DatabaseError, match="never overwrites"):
        backup_database(settings.database.url, existing)
    assert existing.read_bytes() == b"yesterday's backup"
    with pytest.raises(DatabaseError, match="pg_dump"):
        backup_database("postgresql+psycopg://node@db.example/dicomnode", tmp_path / "pg.db")
    with pytest.raises(DatabaseError, match="no database at"):
        backup_database(f"sqlite:///{tmp_path / 'none.db'}", tmp_path / "none-copy.db")
    assert not (tmp_path / "pg.db").exists() and not (tmp_path / "none-copy.db").exists()


def test_the_command_writes_the_copy_with_the_nodes_umask(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """The copy holds patient data: 0640 under the default `storage.umask` 027."""
    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": settings.database.url}}))
    target = tmp_path / "copy.db"
    result = CliRunner().invoke(
        app, ["--config", str(config), "db", "backup", str(target)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert f"to {target}" in result.output and "integrity ok" in result.output
    assert oct(os.stat(target).st_mode & 0o777) == "0o640"
    again = CliRunner().invoke(app, ["--config", str(config), "db", "backup", str(target)])
    assert isinstance(again.exception, DatabaseError)  # main() prints it as one line, exit 2


def test_backups_into_a_folder_keep_the_newest_and_nothing_else_is_deleted(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """What the nightly timer runs: `db backup FOLDER --keep N`."""
    folder = tmp_path / "backups"
    folder.mkdir()
    mine = [folder / "before-the-upgrade.db", folder / "dicomnode-manual.db"]
    for path in mine:
        path.write_bytes(b"an administrator's own copy")
    taken = [backup_into(settings.database.url, folder, keep=2)[0].target for _ in range(3)]
    done, deleted = backup_into(settings.database.url, folder, keep=2)
    assert deleted == [taken[1]]  # taken[0] went at the third run
    assert sorted(folder.iterdir()) == sorted([*mine, taken[2], done.target])
    assert all(path.read_bytes() == b"an administrator's own copy" for path in mine)
    with pytest.raises(DatabaseError, match="keep at least"):
        backup_into(settings.database.url, folder, keep=0)


def test_keep_needs_a_folder(settings: Settings, db: Database, tmp_path: Path) -> None:
    from dicomnode.errors import ConfigError

    config = tmp_path / "dicomnode.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": settings.database.url}}))
    result = CliRunner().invoke(
        app, ["--config", str(config), "db", "backup", str(tmp_path / "one.db"), "--keep", "3"]
    )
    assert isinstance(result.exception, ConfigError)
    assert not (tmp_path / "one.db").exists()
    into = CliRunner().invoke(
        app,
        ["--config", str(config), "db", "backup", str(tmp_path), "--keep", "3"],
        env={"COLUMNS": "200"},
    )
    assert into.exit_code == 0, into.output
    assert len(list(tmp_path.glob("dicomnode-*Z.db"))) == 1
