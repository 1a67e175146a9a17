"""Storage commitment's records: when a round's commit job is queued, what a report does,
and a peer that never answers (the Orthanc round trip is in tests/acceptance/test_orthanc.py,
a failure report in tests/integration/test_node.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import select, update

from dicomnode.config import Settings
from dicomnode.db.schema import Job, Output
from dicomnode.db.session import Database, utcnow
from dicomnode.models.registry import ModelRegistry
from dicomnode.queue import jobs as q
from dicomnode.send.commitment import (
    SOME_FAILED,
    Answer,
    parse_report,
    queue_commitment,
    record_report,
    record_request,
)
from dicomnode.testing.rows import round_row

pytestmark = pytest.mark.both_databases


def _round_with_sends(db: Database, states: tuple[q.JobState, ...]) -> int:
    """A done round with one output per state, each sent to PACS and left in that state."""
    report_id = round_row(db, "7", image_at=utcnow(), made_at=utcnow())  # study 1.2.7
    with db.session() as session:
        for n, state in enumerate(states):
            uid = f"2.25.{n + 1}"
            session.add(
                Output(
                    sop_instance_uid=uid,
                    series_instance_uid="2.25.9",
                    report_id=report_id,
                    kind="SC" if n else "SR",
                    path=f"/nowhere/{uid}.dcm",
                    created_at=utcnow(),
                )
            )
            spec = q.JobSpec(q.JobKind.SEND, f"{uid}>PACS", 5, "PACS", report_id, uid, peer="PACS")
            q.enqueue(session, [spec])
            session.execute(update(Job).where(Job.dedupe_key == f"{uid}>PACS").values(state=state))
    return report_id


def _asked(db: Database, states: tuple[q.JobState, ...], job_state: q.JobState) -> tuple[int, int]:
    """A round whose sends are in ``states``, its commit job queued, then in ``job_state``,
    having made request ``2.25.100``; (round id, commit job id)."""
    report_id = _round_with_sends(db, states)
    with db.session() as session:
        queue_commitment(session, report_id, "PACS", 5)
        job_id = session.execute(select(Job.id).where(Job.kind == "commit")).scalar_one()
        session.execute(update(Job).where(Job.id == job_id).values(state=job_state))
        record_request(session, "2.25.100", job_id)
    return report_id, job_id


def _after_a_step(db: Database, settings: Settings) -> tuple[str, str]:
    """A worker's step; then the commit job's state and last error."""
    from dicomnode.worker import Worker

    assert Worker(settings, db, ModelRegistry([]), worker_id="w").step()
    with db.session() as session:
        state, error = session.execute(
            select(Job.state, Job.last_error).where(Job.kind == "commit")
        ).one()
    return str(state), str(error)


def _commit_jobs(db: Database) -> list[tuple[str, int]]:
    with db.session() as session:
        return [
            (str(state), int(attempts))
            for state, attempts in session.execute(
                select(Job.state, Job.attempts).where(Job.kind == q.JobKind.COMMIT)
            ).all()
        ]


def test_a_commit_job_waits_for_every_send_of_the_round(db: Database) -> None:
    report_id = _round_with_sends(db, (q.JobState.DONE, q.JobState.FAILED))
    with db.session() as session:
        assert not queue_commitment(session, report_id, "PACS", 5)  # a send is retrying
        session.execute(update(Job).where(Job.kind == "send").values(state=q.JobState.DONE))
    with db.session() as session:
        assert queue_commitment(session, report_id, "PACS", 5)
        assert not queue_commitment(session, report_id, "PACS", 5)  # queued already
    assert _commit_jobs(db) == [("queued", 0)]


def test_a_report_marks_what_is_committed_and_sends_the_failed_again(db: Database) -> None:
    delivered = (q.JobState.DONE,) * 3
    report_id, job_id = _asked(db, delivered, q.JobState.FAILED)  # waiting for the report
    with db.session() as session:
        assert record_report(session, Answer("2.25.999", ("2.25.1",), {})) is None
        recorded = record_report(
            session, Answer("2.25.100", ("2.25.1",), {"2.25.2": 0x0112, "2.25.3": 0x0122})
        )
    assert recorded is not None
    # nothing delivered is left uncommitted: done until the object sent again is delivered
    assert (recorded.committed, recorded.sent_again, recorded.refused) == (1, 1, 1)
    assert recorded.job_done
    assert _commit_jobs(db) == [("done", 0)]
    with db.session() as session:
        sends = {
            uid: (str(state), committed is not None, error)
            for uid, state, committed, error in session.execute(
                select(Job.sop_instance_uid, Job.state, Job.committed_at, Job.last_error).where(
                    Job.kind == "send"
                )
            ).all()
        }
    assert sends["2.25.1"] == ("done", True, "")
    assert sends["2.25.2"] == (
        "queued",
        False,
        "PACS did not commit it (failure reason 0x0112): sent again",
    )
    assert sends["2.25.3"] == (  # SOP class not supported: sending it again would fail again
        "dead",
        False,
        "PACS refuses to commit it (failure reason 0x0122): `dicomnode retry` once mended "
        "there, or `dicomnode discard`",
    )
    with db.session() as session:  # delivered again: the commit job is asked again
        session.execute(
            update(Job).where(Job.sop_instance_uid == "2.25.2").values(state=q.JobState.DONE)
        )
        session.execute(update(Job).where(Job.id == job_id).values(attempts=3))
        assert queue_commitment(session, report_id, "PACS", 5)
        record_request(session, "2.25.101", job_id)
    assert _commit_jobs(db) == [("queued", 3)]  # its requests stay counted: bounded
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=q.JobState.FAILED))
    with db.session() as session:
        done = record_report(session, Answer("2.25.101", ("2.25.2",), {}))
    assert done is not None and done.job_done
    assert _commit_jobs(db) == [("done", 3)]


def test_a_peer_that_never_reports_leaves_the_commit_job_dead(
    db: Database, settings: Settings
) -> None:
    """Each request unanswered for send.commitment_timeout_seconds is made again; after
    send.max_attempts requests the job dies, saying so (the study is not purged)."""
    report_id = _round_with_sends(db, (q.JobState.DONE,))
    with db.session() as session:
        queue_commitment(session, report_id, "PACS", 2)
        session.execute(update(Job).where(Job.kind == "commit").values(attempts=2))
    assert _after_a_step(db, settings) == (
        "dead",
        "no storage commitment report from PACS after 2 requests",
    )


def test_the_report_names_committed_and_failed_objects() -> None:
    information = Dataset()
    information.TransactionUID = "2.25.100"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ok.ReferencedSOPInstanceUID, bad.ReferencedSOPInstanceUID = "2.25.1", "2.25.2"
    bad.FailureReason = 0x0119
    information.ReferencedSOPSequence = [ok]
    information.FailedSOPSequence = [bad]
    answer = parse_report(SOME_FAILED, information)
    assert answer == Answer("2.25.100", ("2.25.1",), {"2.25.2": 0x0119})


def test_a_round_without_deliveries_asks_nothing(db: Database, tmp_path: Path) -> None:
    report_id = _round_with_sends(db, (q.JobState.DEAD,))
    with db.session() as session:
        assert not queue_commitment(session, report_id, "PACS", 5)
    assert _commit_jobs(db) == []


def test_a_request_the_peer_did_not_take_is_retried_and_leaves_no_transaction(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """No association (the PACS is down): the commit job retries with the send back-off, and
    the transaction it named is dropped (no report can come for it)."""
    from dicomnode.db.schema import CommitmentRequest
    from dicomnode.peers import PeerInfo, add_peer
    from dicomnode.testing.images import make_radiograph, write_dataset
    from dicomnode.testing.peers import free_port

    report_id = _round_with_sends(db, (q.JobState.DONE,))
    overlay = write_dataset(make_radiograph(rows=16, columns=16), tmp_path / "sc.dcm")
    with db.session() as session:
        session.execute(update(Output).values(path=str(overlay)))
        add_peer(session, PeerInfo("PACS", "PACS", "127.0.0.1", free_port(), commitment=True))
        queue_commitment(session, report_id, "PACS", 5)
    state, error = _after_a_step(db, settings)
    assert state == "failed" and error.startswith("no association with PACS")
    with db.session() as session:
        assert session.execute(select(CommitmentRequest)).first() is None


def test_a_forgotten_study_takes_its_commitment_requests_along(db: Database) -> None:
    """`dicomnode forget` (or storage.records_days) deletes the study's jobs: the requests of
    its commit jobs go with them (a late report is then not this node's)."""
    from dicomnode.db.schema import CommitmentRequest
    from dicomnode.retention import forget_study

    _asked(db, (q.JobState.DONE,), q.JobState.DONE)
    with db.session() as session:
        forget_study(session, "1.2.7")
    with db.session() as session:
        assert session.execute(select(CommitmentRequest)).first() is None
        assert record_report(session, Answer("2.25.100", ("2.25.1",), {})) is None
