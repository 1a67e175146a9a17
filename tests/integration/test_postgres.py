"""The queue and the node on PostgreSQL, the scale-out database (Debian `postgresql`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.db.migrate import upgrade
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.queue import jobs as q
from dicomnode.testing.images import make_radiograph
from dicomnode.testing.inprocess import InProcessNode
from dicomnode.testing.peers import wait_for
from dicomnode.testing.postgres import TempPostgres
from dicomnode.testing.queue import claim_concurrently

pytestmark = pytest.mark.skipif(
    not TempPostgres.available(), reason="PostgreSQL server or root missing"
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[TempPostgres]:
    server = TempPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def pg(postgres: TempPostgres) -> Iterator[Database]:
    upgrade(postgres.url)
    db = Database(postgres.url)
    assert db.is_postgres
    with db.engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE jobs, results, outputs, instances, reports, associations, peers"
        )
    yield db
    db.dispose()


def test_claims_never_overlap_with_skip_locked(pg: Database) -> None:
    with pg.session() as s:
        specs = [
            q.JobSpec(q.JobKind.INFER, f"1.{i}", 3, group_key="m:1", sop_instance_uid=f"1.{i}")
            for i in range(60)
        ]
        assert q.enqueue(s, specs) == 60
        assert q.enqueue(s, specs[:5]) == 0  # unique per key
    claimed = claim_concurrently(pg, q.JobKind.INFER, workers=6, limit=4, group_key="m:1")
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 60


def test_lease_and_dead_jobs_on_postgres(pg: Database) -> None:
    from dicomnode.queue.retry import RetryPolicy

    with pg.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, "x>PACS", 1, group_key="PACS", peer="PACS")])
    with pg.session() as s:
        job = q.claim(s, q.JobKind.SEND, "w", 30)[0]
        assert q.fail(s, job, "w", "refused", RetryPolicy(1, 1, 1)) == q.JobState.DEAD
    with pg.session() as s:
        assert [j.last_error for j in q.dead_jobs(s)] == ["refused"]
        assert q.requeue(s) == 1


def test_node_on_postgres_returns_sc_and_sr(
    postgres: TempPostgres, pg: Database, tmp_path: Path
) -> None:
    node = InProcessNode.start(tmp_path, database_url=postgres.url)
    try:
        image = make_radiograph(body_part="KNEE")
        assert node.send(image, image) == [0, 0]
        wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR")
        assert node.count(Instance) == 1
        assert sorted(str(d.Modality) for d in node.collector.received) == ["OT", "SR"]
    finally:
        node.close()
