"""Hosts that share one database: its schema revision, their associations and their peers."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dicomnode.config import PeerSettings, Settings
from dicomnode.db.migrate import schema_problem, upgrade
from dicomnode.db.schema import Association, Job, Peer
from dicomnode.db.session import Database, utcnow
from dicomnode.errors import ConfigError
from dicomnode.peers import sync_config_peers
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy
from dicomnode.store.instances import release_all_open, release_orphaned
from dicomnode.testing.postgres import TempPostgres
from dicomnode.testing.rows import instance_row

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


def test_the_schema_revision_must_be_this_versions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    assert "no schema yet: run `dicomnode db upgrade`" in schema_problem(url)
    upgrade(url, "0001")
    older = schema_problem(url)
    assert "schema is at revision 0001, this dicomnode needs 0013" in older
    assert "`dicomnode db upgrade`" in older
    upgrade(url)
    assert schema_problem(url) == ""


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    db = Database(url)
    with db.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    db.dispose()
    assert "revision 0099 is newer than this dicomnode knows (its latest is 0013)" in (
        schema_problem(url)
    )


def _open(db: Database, association_id: str, receiver: str | None, ago: float = 60) -> None:
    with db.session() as session:
        session.add(
            Association(
                id=association_id,
                calling_ae="MOD",
                started_at=utcnow() - timedelta(seconds=ago),
                receiver=receiver,
            )
        )


def _still_open(db: Database) -> set[str]:
    with db.session() as session:
        return set(
            session.execute(
                select(Association.id).where(Association.released_at.is_(None))
            ).scalars()
        )


def test_a_receiving_node_closes_only_its_own_associations(db: Database) -> None:
    _open(db, "mine", "host-a:11112")
    _open(db, "theirs", "host-b:11112")
    _open(db, "legacy", None)  # written before revision 0002
    assert release_all_open(db, "host-a:11112") == 2
    assert _still_open(db) == {"theirs"}


def test_an_association_whose_end_was_not_recorded_is_closed_unless_live(db: Database) -> None:
    _open(db, "ended", "host-a:11112")
    _open(db, "live", "host-a:11112")
    _open(db, "theirs", "host-b:11112")
    _open(db, "new", "host-a:11112", ago=-5)  # started after the SCP's ids were read
    assert release_orphaned(db, "host-a:11112", {"live"}, utcnow()) == 1
    assert _still_open(db) == {"live", "theirs", "new"}


def test_the_scp_records_itself_as_the_receiver(settings: Settings, db: Database) -> None:
    from dicomnode.receive.scp import StoreHandlers, receiver_name

    handlers = StoreHandlers(settings, db)
    assert handlers.receiver == receiver_name(settings)
    assert handlers.receiver.endswith(f":{settings.node.port}")
    live = handlers.association_id(object())
    _open(db, live, handlers.receiver)
    _open(db, "gone", handlers.receiver)
    assert handlers.release_orphaned() == 1
    assert _still_open(db) == {live}


def test_a_relative_data_folder_is_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.config import load_settings

    monkeypatch.chdir(tmp_path)
    loaded = load_settings(None, environ={}, overrides={"storage": {"data_dir": "var/data"}})
    assert loaded.storage.data_dir == tmp_path / "var" / "data"
    assert load_settings(None, environ={}).storage.data_dir == tmp_path / "var" / "data"


def test_only_the_receiving_node_writes_its_files_peers(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker host (no SCP) with another file neither adds nor removes peers."""
    from dicomnode import service

    with db.session() as session:
        sync_config_peers(session, {"PACS": PeerSettings(ae_title="PACS", host="h", port=104)})
    worker = settings.model_copy(
        update={
            "peers": {"OTHER": PeerSettings(ae_title="OTHER", host="h", port=105)},
            "results": settings.results.model_copy(update={"destinations": ["OTHER"]}),
        }
    )
    monkeypatch.setattr(service, "load_registry", lambda _s: pytest.fail("started"))
    with pytest.raises(ConfigError, match=r"names OTHER, not a peer .*start the receiving node"):
        service.serve(worker, with_scp=False)
    with db.session() as session:
        assert [p.name for p in session.execute(select(Peer)).scalars()] == ["PACS"]


def test_a_file_over_2_gib_is_recorded(db: Database) -> None:
    """PostgreSQL's integer stops at 2 GiB: a long multi-frame object was refused at every
    attempt (revision 0004 records sizes in 64 bits)."""
    from dicomnode.db.schema import Instance

    _open(db, "a1", "host-a:11112")
    with db.session() as session:
        session.add(instance_row("1.2.3.4", "a1", size=2_200_000_000))
    with db.session() as session:
        assert session.execute(select(Instance.size)).scalar_one() == 2_200_000_000


def test_a_database_with_results_is_upgraded_to_this_versions_schema(tmp_path: Path) -> None:
    """Every revision applies to a database that holds an analysed image (revision 0004's
    first version dropped and copied the SQLite instances table, and SQLite's foreign keys
    refused: no node that had ever analysed an image could be upgraded)."""
    from dicomnode.db.schema import Instance, Report, Result

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0003")
    old = Database(url)
    with old.session() as session:
        session.execute(
            text(
                "INSERT INTO associations (id, calling_ae, started_at) VALUES ('a1', 'MOD', "
                "'2026-01-01 00:00:00');"
            )
        )
        session.execute(
            text(
                "INSERT INTO reports (id, study_instance_uid, model_name, model_version, "
                "sequence, calling_ae, state, created_at) VALUES (1, '1.2', 'm', '1', 1, "
                "'MOD', 'done', '2026-01-01 00:00:00')"
            )
        )
        session.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid, sop_class_uid, transfer_syntax_uid, modality, "
                "body_part, descriptions, path, size, calling_ae, association_id, "
                "received_at, state, reason, report_id) VALUES ('1.2.3', '1.2', '1.2.1', "
                "'1.2.840.10008.5.1.4.1.1.1.1', '1.2.840.10008.1.2.1', 'DX', 'KNEE', '', "
                "'/data/1.dcm', 10, 'MOD', 'a1', '2026-01-01 00:00:00', 'done', '', 1)"
            )
        )
        session.execute(
            text(
                "INSERT INTO results (sop_instance_uid, report_id, model_name, model_version, "
                "outcome, reason, findings, created_at) VALUES ('1.2.3', 1, 'm', '1', 'ok', "
                "'', '[]', '2026-01-01 00:00:00')"
            )
        )
    old.dispose()
    upgrade(url)
    assert schema_problem(url) == ""
    upgraded = Database(url)
    with upgraded.session() as session:
        assert session.get(Instance, "1.2.3") is not None
        assert session.query(Result).count() == 1 and session.query(Report).count() == 1
    upgraded.dispose()


def _skew_host_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """This host's clock runs ``seconds`` fast (slow when negative), for every module of the
    node that reads it."""
    import sys

    from dicomnode.db import session as db_session

    real = db_session.utcnow

    def skewed() -> datetime:
        return real() + timedelta(seconds=seconds)

    for name, module in list(sys.modules.items()):
        if name.startswith("dicomnode") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", skewed)


@pytest.mark.skipif(not TempPostgres.available(), reason="the PostgreSQL server is not installed")
def test_hosts_sharing_postgresql_keep_time_by_its_clock(
    postgres: TempPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker host whose clock is 10 minutes slow takes a 60 s lease: another host must not
    find it expired at once and run the job a second time. One 10 minutes fast fails a job
    with a 30 s backoff: the job must not wait 10 minutes more. Both read the database's
    clock (on SQLite, one host's file, there is only one clock)."""
    db = postgres.emptied_database()
    with db.session() as session:
        q.enqueue(
            session, [q.JobSpec(q.JobKind.INFER, "1.1", 3), q.JobSpec(q.JobKind.INFER, "1.2", 3)]
        )
    with monkeypatch.context() as slow_host:
        _skew_host_clock(slow_host, -600)
        with db.session() as session:
            (held,) = q.claim(session, q.JobKind.INFER, "slow:1", lease_seconds=60)
    with db.session() as session:  # another host, clock right
        (other,) = q.claim(session, q.JobKind.INFER, "right:2", lease_seconds=60)
        assert other.id != held.id
        assert q.claim(session, q.JobKind.INFER, "right:2", lease_seconds=60) == []
        running = session.get(Job, held.id)
        assert running is not None and running.state == q.JobState.RUNNING
    with monkeypatch.context() as fast_host:
        _skew_host_clock(fast_host, 600)
        with db.session() as session:
            policy = RetryPolicy(max_attempts=3, initial_seconds=30, maximum_seconds=30)
            q.fail(session, other, "right:2", "peer down", policy)
    with db.session() as session:
        due_in = session.execute(
            text(
                "SELECT EXTRACT(EPOCH FROM run_after - (clock_timestamp() AT TIME ZONE 'UTC'))"
                " FROM jobs WHERE id = :id"
            ),
            {"id": other.id},
        ).scalar_one()
    assert 0 < float(due_in) <= 31
    db.dispose()
