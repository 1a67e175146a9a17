"""The queue and the node on PostgreSQL, the scale-out database (Debian `postgresql`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.queue import jobs as q
from dicomnode.testing.images import make_radiograph
from dicomnode.testing.inprocess import InProcessNode
from dicomnode.testing.peers import LOOPBACK, wait_for
from dicomnode.testing.postgres import TempPostgres
from dicomnode.testing.queue import claim_concurrently

pytestmark = pytest.mark.skipif(
    not TempPostgres.available(), reason="the PostgreSQL server is not installed"
)


@pytest.fixture
def pg(postgres: TempPostgres) -> Iterator[Database]:
    db = postgres.emptied_database()
    assert db.is_postgres
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


def test_the_same_instance_stored_at_once_twice_keeps_its_file(
    pg: Database, tmp_path: Path
) -> None:
    """Two associations deliver one SOP Instance UID at the same moment (a modality retry):
    one copy is recorded, the other is a duplicate, and the recorded file is on disk."""
    import threading

    from dicomnode.store.instances import InstanceFacts, store_instance

    data = tmp_path / "data"
    incoming = data / "incoming"
    incoming.mkdir(parents=True)
    rounds, outcomes, errors = 12, [], []
    for n in range(rounds):
        facts = InstanceFacts(
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            sop_uid=f"1.2.3.4.{n + 1}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="DX",
            body_part="KNEE",
            descriptions="",
        )
        barrier = threading.Barrier(2)

        def deliver(
            copy: int, facts: InstanceFacts = facts, barrier: threading.Barrier = barrier
        ) -> None:
            received = incoming / f".receiving-{facts.sop_uid}-{copy}"
            received.write_bytes(b"DICM" * 1000)
            barrier.wait()
            try:
                outcomes.append(
                    store_instance(
                        pg, data, facts, received, calling_ae="MOD", association_id=f"a{copy}"
                    )
                )
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=deliver, args=(c,)) for c in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert sorted(o.duplicate for o in outcomes) == [False] * rounds + [True] * rounds
    with pg.session() as s:
        paths = [Path(i.path) for i in s.query(Instance).all()]
    assert len(paths) == rounds
    assert all(p.is_file() for p in paths)


def test_a_failed_start_leaves_no_server_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """createdb fails after the server started: start() stops it and removes the cluster."""
    server = TempPostgres()
    run = server._run

    def createdb_fails(*command: str) -> None:
        if Path(command[0]).name == "createdb":
            raise RuntimeError("createdb exited 1")
        run(*command)

    monkeypatch.setattr(server, "_run", createdb_fails)
    with pytest.raises(RuntimeError, match="createdb"):
        server.start()
    assert not server.folder.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex((LOOPBACK, server.port)) != 0  # nothing listens any more


def test_worker_hosts_share_the_work_and_leave_the_receivers_associations_open(
    postgres: TempPostgres, pg: Database, tmp_path: Path
) -> None:
    """Scale-out: `serve` receives (no workers), two `dicomnode worker` processes run the
    jobs. Workers starting while a modality is mid-study do not close its association, so
    the study is reported once, with both images; every object reaches the PACS once."""
    import subprocess

    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from sqlalchemy import select

    from dicomnode.db.schema import Job, Report
    from dicomnode.testing.models import make_tiny_model
    from dicomnode.testing.node import NodeProcess, stop_processes
    from dicomnode.testing.peers import CollectingSCP

    models = tmp_path / "models"
    make_tiny_model(models / "tiny-knee", num_classes=5, input_size=(96, 96))
    collector = CollectingSCP(ae_title="PACS").start()
    node = NodeProcess.create(
        tmp_path / "node",
        models,
        peers={"PACS": ("PACS", collector.port), "MOD": ("MOD", 1)},
        destinations=["PACS"],
        extra={"database": {"url": postgres.url}, "workers": {"count": 0}},
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        node.start()
        first = make_radiograph(body_part="KNEE")
        second = make_radiograph(body_part="KNEE", study_uid=first.StudyInstanceUID)
        sender = AE(ae_title="MOD")
        sender.add_requested_context(first.SOPClassUID, ExplicitVRLittleEndian)
        assoc = sender.associate(LOOPBACK, node.port, ae_title="DICOMNODE")
        assert assoc.is_established and assoc.send_c_store(first).Status == 0
        workers += [node.start_worker(1), node.start_worker(1)]

        def analysed() -> int:
            with pg.session() as s:
                jobs = s.execute(select(Job).where(Job.kind == "infer")).scalars()
                return sum(job.state == "done" for job in jobs)

        wait_for(lambda: analysed() == 1, 120, what="the first image analysed by a worker")
        assert assoc.send_c_store(second).Status == 0
        assoc.release()
        wait_for(lambda: len(collector.received) >= 3, 120, what="2 SC and 1 SR")
        wait_for(lambda: analysed() == 2, 30, what="both images analysed")
    finally:
        stop_processes(workers)
        node.stop()
        collector.stop()
    modalities = sorted(str(d.Modality) for d in collector.received)
    assert modalities == ["OT", "OT", "SR"]  # the study reported once, not early then again
    assert len({str(d.SOPInstanceUID) for d in collector.received}) == 3
    with pg.session() as s:
        assert [r.sequence for r in s.execute(select(Report)).scalars()] == [1]
        attempts = [j.attempts for j in s.execute(select(Job)).scalars()]
    assert attempts and set(attempts) == {1}  # no job ran twice
