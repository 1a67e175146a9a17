"""`dicomnode health`: the queue check tells waiting from stuck."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dicomnode.db.schema import Job
from dicomnode.db.session import Database, utcnow
from dicomnode.health import check_queue
from dicomnode.queue import jobs as q
from dicomnode.testing.queue import add_report

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


def _age_every_job(db: Database, minutes: float) -> None:
    then = utcnow() - timedelta(minutes=minutes)
    with db.session() as s:
        for job in s.query(Job):
            job.run_after = job.created_at = job.updated_at = then


def test_jobs_that_wait_while_nothing_moves_fail_the_check(db: Database) -> None:
    with db.session() as s:
        assert check_queue(s, 10).ok  # an empty queue
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, f"{i}>PACS", 5, peer="PACS") for i in range(3)])
    with db.session() as s:
        assert check_queue(s, 10).ok  # just queued: waiting is not stalling
    _age_every_job(db, 25)
    with db.session() as s:
        stalled = check_queue(s, 10)
    assert not stalled.ok
    assert "3 job(s) could run 25 min ago" in stalled.detail and "workers" in stalled.detail
    with db.session() as s:  # a worker takes one: the queue moves again
        q.claim(s, q.JobKind.SEND, "w", 30)
    with db.session() as s:
        moving = check_queue(s, 10)
    assert moving.ok and "jobs are moving" in moving.detail


def test_jobs_waiting_for_their_retry_time_are_not_stalled(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [q.JobSpec(q.JobKind.SEND, "1>PACS", 5, peer="PACS")])
    _age_every_job(db, 60)
    with db.session() as s:
        for job in s.query(Job):
            job.state, job.run_after = "failed", utcnow() + timedelta(minutes=5)  # backing off
    with db.session() as s:
        assert check_queue(s, 10).ok


def test_a_report_waiting_for_its_round_is_not_stalled(db: Database) -> None:
    """A report job is claimed once its round's images are analysed: while one of them
    backs off after a failure, the report is not a job that could run."""
    report_id = add_report(db, "1.2.3")
    with db.session() as s:
        q.enqueue(
            s,
            [
                q.JobSpec(q.JobKind.INFER, "1.2.3.4", 3, report_id=report_id),
                q.JobSpec(q.JobKind.REPORT, "report-1", 3, report_id=report_id),
            ],
        )
    _age_every_job(db, 60)
    with db.session() as s:
        infer = s.query(Job).filter(Job.kind == "infer").one()
        infer.state, infer.run_after = "failed", utcnow() + timedelta(minutes=5)
    with db.session() as s:
        assert check_queue(s, 10).ok
