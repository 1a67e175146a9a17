"""The job queue on a real (SQLite) database."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from dicomnode.db.schema import Job
from dicomnode.db.session import Database, utcnow
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy
from dicomnode.testing.queue import add_report, claim_concurrently
from dicomnode.testing.rows import output_row
from dicomnode.values import Priority

pytestmark = pytest.mark.both_databases  # every test taking `db` runs on SQLite and PostgreSQL


@dataclass
class Clock:
    """The queue's clock, standing still until a test moves it on."""

    now: datetime

    def __call__(self, session: object = None) -> datetime:
        """Stands in for ``db_now(session)``: the same moment on SQLite and PostgreSQL."""
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Leases and back-offs expire when the test says so, however loaded the machine."""
    fake = Clock(utcnow())
    monkeypatch.setattr(q, "db_now", fake)
    return fake


def _spec(
    key: str, report_id: int | None = None, kind: q.JobKind = q.JobKind.INFER, attempts: int = 3
) -> q.JobSpec:
    return q.JobSpec(
        kind, key, attempts, group_key="m:1", report_id=report_id, sop_instance_uid=key
    )


def test_enqueue_is_unique_per_key(db: Database) -> None:
    with db.session() as s:
        assert q.enqueue(s, [_spec("1.1"), _spec("1.2")]) == 2
    with db.session() as s:
        assert q.enqueue(s, [_spec("1.1"), _spec("1.3")]) == 1
        assert q.counts_by_state(s) == {("infer", "queued"): 3}


def test_a_claim_takes_no_more_than_its_limit_oldest_first(db: Database) -> None:
    """A worker's batch is what it asked for: more images than ``limit`` would outgrow the
    memory a batch is sized for (PostgreSQL re-ran a ``LIMIT`` subquery per updated row
    and handed out every due job)."""
    with db.session() as s:
        q.enqueue(s, [_spec(f"1.{i}") for i in range(10)])
    with db.session() as s:
        first = q.claim(s, q.JobKind.INFER, "w1", 600, limit=3)
        one = q.claim(s, q.JobKind.INFER, "w2", 600, limit=1)
        rest = q.claim(s, q.JobKind.INFER, "w3", 600, limit=100)
    assert [j.sop_instance_uid for j in first] == ["1.0", "1.1", "1.2"]
    assert [j.sop_instance_uid for j in one] == ["1.3"]
    assert len(rest) == 6


def test_urgent_jobs_are_claimed_first_and_background_ones_last(db: Database, clock: Clock) -> None:
    """Higher priority first; within one, the job due longest (a retried job keeps its turn)."""
    order = [("1.1", Priority.LOW), ("1.2", Priority.MEDIUM), ("1.3", Priority.HIGH)]
    order += [("1.4", Priority.MEDIUM), ("1.5", Priority.HIGH)]
    for key, priority in order:
        with db.session() as s:
            q.enqueue(s, [replace(_spec(key), priority=priority, group_key=f"m:{key}")])
        clock.advance(1)
    with db.session() as s:
        assert q.next_group(s, q.JobKind.INFER) == "m:1.3"  # a worker batches the urgent model
        claimed = [q.claim(s, q.JobKind.INFER, "w", 600)[0].sop_instance_uid for _ in order]
    assert claimed == ["1.3", "1.5", "1.2", "1.4", "1.1"]


def test_claims_never_overlap_between_threads(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec(f"1.{i}") for i in range(40)])
    claimed = claim_concurrently(db, q.JobKind.INFER, workers=4, limit=3)
    assert len(claimed) == 40
    assert len(set(claimed)) == 40


def test_lost_lease_is_claimed_again(db: Database, clock: Clock) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec("1.1")])
    with db.session() as s:
        first = q.claim(s, q.JobKind.INFER, "dead-worker", 20)
    assert len(first) == 1
    clock.advance(19)
    with db.session() as s:
        assert q.claim(s, q.JobKind.INFER, "other", 30) == []
    clock.advance(2)
    with db.session() as s:
        again = q.claim(s, q.JobKind.INFER, "other", 30)
    assert [j.id for j in again] == [first[0].id]
    assert again[0].attempts == 2
    with db.session() as s:  # the dead worker cannot complete a job it lost
        assert q.complete(s, first[0].id, "dead-worker") is False
        assert q.complete(s, first[0].id, "other") is True


def test_release_worker_makes_jobs_claimable_at_once(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec("1.1")])
    with db.session() as s:
        q.claim(s, q.JobKind.INFER, "w1", 600)
    with db.session() as s:
        assert q.release_worker(s, "w1") == 1
    with db.session() as s:
        assert len(q.claim(s, q.JobKind.INFER, "w2", 600)) == 1


def test_a_job_that_kills_its_worker_ends_dead_and_spares_its_batch(db: Database) -> None:
    """A crash counts the attempt: the culprit dies after max_attempts; each suspect runs alone."""
    with db.session() as s:
        q.enqueue(s, [_spec(f"1.{i}", attempts=2) for i in range(4)])
    with db.session() as s:
        batch = q.claim(s, q.JobKind.INFER, "w1", 600, limit=4)
    assert len(batch) == 4
    with db.session() as s:  # the worker died (the supervisor saw it exit)
        assert q.release_worker(s, "w1") == 4
        assert q.counts_by_state(s) == {("infer", "failed"): 4}
    with db.session() as s:
        alone = q.claim(s, q.JobKind.INFER, "w2", 600, limit=4)
    assert [j.id for j in alone] == [batch[0].id]  # claimed alone: it lost its worker
    assert alone[0].attempts == 2
    with db.session() as s:  # it kills this worker too: attempts used up
        assert q.release_worker(s, "w2") == 1
        dead = q.dead_jobs(s)
    assert [(d.id, d.last_error) for d in dead] == [(batch[0].id, q.LOST_LEASE)]
    for job in batch[1:]:  # the others run alone, one after another, and succeed
        with db.session() as s:
            (claimed,) = q.claim(s, q.JobKind.INFER, "w3", 600, limit=4)
            assert claimed.id == job.id
            assert q.complete(s, claimed.id, "w3")
    with db.session() as s:
        assert q.counts_by_state(s) == {("infer", "dead"): 1, ("infer", "done"): 3}


def test_an_expired_lease_with_attempts_used_up_ends_dead_not_running(
    db: Database, clock: Clock
) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec("1.1", attempts=1)])
    with db.session() as s:
        q.claim(s, q.JobKind.INFER, "hung", 20)
    clock.advance(21)
    with db.session() as s:
        assert q.claim(s, q.JobKind.INFER, "other", 30) == []
        assert q.counts_by_state(s) == {("infer", "dead"): 1}
        assert q.dead_jobs(s)[0].last_error == q.LOST_LEASE


def test_failures_back_off_then_die_and_retry_requeues(db: Database, clock: Clock) -> None:
    policy = RetryPolicy(max_attempts=2, initial_seconds=20, maximum_seconds=600)
    with db.session() as s:
        q.enqueue(s, [_spec("1.1", attempts=2)])
    with db.session() as s:
        job = q.claim(s, q.JobKind.INFER, "w", 30)[0]
        assert q.fail(s, job, "w", "boom", policy) == q.JobState.FAILED
    clock.advance(19)
    with db.session() as s:
        assert q.claim(s, q.JobKind.INFER, "w", 30) == []  # waiting for its backoff
    clock.advance(2)
    with db.session() as s:
        job = q.claim(s, q.JobKind.INFER, "w", 30)[0]
        assert q.fail(s, job, "w", "boom again", policy) == q.JobState.DEAD
    with db.session() as s:
        dead = q.dead_jobs(s)
        assert [d.last_error for d in dead] == ["boom again"]
        assert q.requeue(s) == 1
    with db.session() as s:
        assert q.claim(s, q.JobKind.INFER, "w", 30)[0].attempts == 1


def test_backoff_is_exponential_and_bounded() -> None:
    policy = RetryPolicy(5, 5, 600)
    assert [policy.delay(a) for a in range(1, 9)] == [5, 10, 20, 40, 80, 160, 320, 600]


def test_report_job_waits_for_its_inference_jobs(db: Database) -> None:
    report_id = add_report(db)
    with db.session() as s:
        q.enqueue(
            s, [_spec("1.1", report_id), q.JobSpec(q.JobKind.REPORT, "r1", 3, report_id=report_id)]
        )
    with db.session() as s:
        assert q.claim(s, q.JobKind.REPORT, "w", 30) == []
        infer = q.claim(s, q.JobKind.INFER, "w", 30)[0]
    with db.session() as s:
        assert q.claim(s, q.JobKind.REPORT, "w", 30) == []  # still running
        q.complete(s, infer.id, "w")
    with db.session() as s:
        assert len(q.claim(s, q.JobKind.REPORT, "w", 30)) == 1


def test_next_group_orders_by_due_time(db: Database) -> None:
    with db.session() as s:
        q.enqueue(
            s,
            [
                q.JobSpec(q.JobKind.SEND, "a", 3, group_key="PACS"),
                q.JobSpec(q.JobKind.SEND, "b", 3, group_key="ARCHIVE"),
            ],
        )
        s.execute(
            update(Job).where(Job.dedupe_key == "a").values(run_after=utcnow() + timedelta(hours=1))
        )
    with db.session() as s:
        assert q.next_group(s, q.JobKind.SEND) == "ARCHIVE"


def test_claim_uses_skip_locked_on_postgresql(clock: Clock) -> None:
    """The same claim statement compiles to FOR UPDATE SKIP LOCKED for PostgreSQL (the
    recording session has no database: ``clock`` stands in for its clock)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.orm import Session as OrmSession

    captured: list[str] = []

    class NoRows:
        rowcount = 0

        def scalar_one_or_none(self) -> None:
            return None

        def first(self) -> tuple[int]:  # a job is due at the first priority asked
            return (1,)

        def all(self) -> list[object]:
            return []

    class Recorder(OrmSession):
        def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
            captured.append(str(statement.compile(dialect=dialect)))
            return NoRows()

    assert q.claim(Recorder(), q.JobKind.INFER, "w", 30, limit=4, group_key="m:1") == []
    (claim,) = [c for c in captured if "RETURNING" in c]
    assert "FOR UPDATE SKIP LOCKED" in claim


def test_running_workers_lists_holders_of_running_jobs(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec("1.1"), _spec("1.2")])
    with db.session() as s:
        q.claim(s, q.JobKind.INFER, "host:1", 30)
        q.claim(s, q.JobKind.INFER, "host:2", 30)
    with db.session() as s:
        assert sorted(q.running_workers(s)) == ["host:1", "host:2"]


def test_a_reports_sr_is_sent_after_its_overlays_and_presentation_states(db: Database) -> None:
    """A PACS that routes on the SR finds every overlay (and presentation state) of its
    images already stored."""

    report_id = add_report(db)
    queued = (("9.3", "SR"), ("9.1", "SC"), ("9.2", "SC"), ("9.4", "PR"))  # the SR first
    for uid, kind in queued:
        _send_output(db, report_id, uid, kind)
    with db.session() as s:
        first = q.claim(s, q.JobKind.SEND, "w", 30, limit=8, group_key="PACS")
    assert sorted(j.sop_instance_uid or "" for j in first) == ["9.1", "9.2", "9.4"]
    with db.session() as s:
        assert q.claim(s, q.JobKind.SEND, "w2", 30, limit=8) == []  # SCs, PR still in flight
        q.complete(s, first[0].id, "w")
        q.fail(s, first[1], "w", "refused", RetryPolicy(1, 1, 1))  # one overlay died
    with db.session() as s:
        assert q.claim(s, q.JobKind.SEND, "w2", 30, limit=8) == []  # the PR still in flight
        q.complete(s, first[2].id, "w")
    with db.session() as s:
        (sr,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert sr.sop_instance_uid == "9.3"


def _send_output(db: Database, report_id: int, uid: str, kind: str = "SR") -> None:
    """The result object ``uid`` (an SR, SC or PR) of report ``report_id``, and its send to
    PACS."""
    with db.session() as s:
        s.add(output_row(uid, report_id, kind))
        q.enqueue(
            s,
            [
                q.JobSpec(
                    q.JobKind.SEND,
                    f"{uid}>PACS",
                    5,
                    group_key="PACS",
                    report_id=report_id,
                    sop_instance_uid=uid,
                    peer="PACS",
                )
            ],
        )


def test_a_later_rounds_sr_waits_for_the_earlier_rounds_sr(db: Database, clock: Clock) -> None:
    """After an outage, round 2's SR (which supersedes round 1's) was sent first whenever its
    backoff ran out first: a RIS keeping the last SR received kept the incomplete one."""
    first, second = add_report(db, "1.2", 1), add_report(db, "1.2", 2)
    other_study = add_report(db, "1.3", 2)
    _send_output(db, first, "8.1")
    with db.session() as s:
        (job,) = q.claim(s, q.JobKind.SEND, "w", 30)
        q.fail(s, job, "w", "PACS down", RetryPolicy(5, 60, 600))  # waits a minute
    _send_output(db, second, "8.2")
    _send_output(db, other_study, "8.3")
    with db.session() as s:
        (due,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
        assert due.sop_instance_uid == "8.3"  # another study's SR is not held back
        q.complete(s, due.id, "w")
    clock.advance(61)
    with db.session() as s:
        (due,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert due.sop_instance_uid == "8.1"
    with db.session() as s:
        assert q.claim(s, q.JobKind.SEND, "w", 30, limit=8) == []  # round 1 still in flight
        q.complete(s, due.id, "w")
    with db.session() as s:
        (due,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert due.sop_instance_uid == "8.2"


def test_a_delivery_makes_the_peers_waiting_sends_due(db: Database, clock: Clock) -> None:
    """Each send kept its own backoff (up to ten minutes) after the PACS was back."""
    _send_output(db, add_report(db, "1.2"), "8.1")
    _send_output(db, add_report(db, "1.3"), "8.2")
    with db.session() as s:
        for job in q.claim(s, q.JobKind.SEND, "w", 30, limit=8):
            q.fail(s, job, "w", "PACS down", RetryPolicy(5, 600, 600))
    with db.session() as s:
        assert q.claim(s, q.JobKind.SEND, "w", 30, limit=8) == []
        assert q.hurry_sends(s, "OTHER") == 0
        assert q.hurry_sends(s, "PACS") == 2
    with db.session() as s:
        assert len(q.claim(s, q.JobKind.SEND, "w", 30, limit=8)) == 2


def test_a_hung_workers_job_is_found_again_when_its_lease_runs_out(
    db: Database, clock: Clock
) -> None:
    """No supervisor sees a hung worker die: looking for work ends its expired lease."""
    with db.session() as s:
        q.enqueue(s, [_spec("1.1")])
    with db.session() as s:
        q.claim(s, q.JobKind.INFER, "hung", 20)
    clock.advance(19)
    with db.session() as s:
        assert q.next_group(s, q.JobKind.INFER) is None  # still leased
    clock.advance(2)
    with db.session() as s:
        assert q.next_group(s, q.JobKind.INFER) == "m:1"
        (again,) = q.claim(s, q.JobKind.INFER, "other", 30, limit=4, group_key="m:1")
    assert again.attempts == 2


def test_a_postponed_job_keeps_its_attempts_and_waits(db: Database) -> None:
    with db.session() as s:
        q.enqueue(s, [_spec("1.1", attempts=2)])
    with db.session() as s:
        (job,) = q.claim(s, q.JobKind.INFER, "w", 30, 1)
        assert job.attempts == 1
        q.postpone(s, job, "w", "disk full", 3600)
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row is not None
        assert (row.state, row.attempts, row.last_error) == ("failed", 0, "disk full")
        assert q.claim(s, q.JobKind.INFER, "w", 30, 1) == []  # not before its delay


def test_a_worker_on_a_host_with_a_long_name_gets_an_id_that_fits(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux allows host names of 64 characters; Job.worker_id holds 64 (PostgreSQL
    refused the longer id, and the worker died at its first claim, again and again)."""
    import os

    long_name = "gpu-worker-01-radiology-inference-pool-a.hospital.example.org"
    uname = os.uname()
    fake = os.uname_result((uname.sysname, long_name, *tuple(uname)[2:]))
    monkeypatch.setattr(os, "uname", lambda: fake)
    worker = q.worker_id_of(4194304)  # the largest pid Linux gives
    assert len(worker) <= 64 and worker.startswith(long_name[:56]) and worker.endswith(":4194304")
    with db.session() as s:
        q.enqueue(s, [_spec("1.1")])
        (claimed,) = q.claim(s, q.JobKind.INFER, worker, 30)
    with db.session() as s:
        assert q.running_workers(s) == [worker] and q.complete(s, claimed.id, worker)


def test_rounds_report_in_turn(db: Database) -> None:
    """Round 2's report (made again after a rejection note, say) waits for round 1's, so that
    it sees the SR round 1 made and can reject it."""
    first, second = add_report(db, "1.2", 1), add_report(db, "1.2", 2)
    other_study = add_report(db, "1.3", 2)
    with db.session() as s:
        q.enqueue(
            s,
            [
                q.JobSpec(q.JobKind.REPORT, f"report:{r}", 3, report_id=r)
                for r in (second, other_study, first)
            ],
        )
    with db.session() as s:
        claimed = q.claim(s, q.JobKind.REPORT, "w", 30, limit=8)
    assert sorted(j.report_id or 0 for j in claimed) == sorted([first, other_study])
    with db.session() as s:
        assert q.claim(s, q.JobKind.REPORT, "w", 30, limit=8) == []  # round 1 still running
        q.complete(s, next(j.id for j in claimed if j.report_id == first), "w")
    with db.session() as s:
        (due,) = q.claim(s, q.JobKind.REPORT, "w", 30, limit=8)
    assert due.report_id == second


def test_the_nodes_rejection_note_waits_for_every_earlier_send(db: Database) -> None:
    """An archive should hold the objects before it is told to hide them."""
    first, second = add_report(db, "1.2", 1), add_report(db, "1.2", 2)
    _send_output(db, first, "7.1", "SC")
    _send_output(db, second, "7.2", "KO")
    _send_output(db, second, "7.3", "SR")
    with db.session() as s:
        (overlay,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert overlay.sop_instance_uid == "7.1"  # neither the note nor the SR after it
    with db.session() as s:
        q.complete(s, overlay.id, "w")
    with db.session() as s:
        (note,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert note.sop_instance_uid == "7.2"
    with db.session() as s:
        assert q.claim(s, q.JobKind.SEND, "w", 30, limit=8) == []  # the SR after its note
        q.complete(s, note.id, "w")
    with db.session() as s:
        (sr,) = q.claim(s, q.JobKind.SEND, "w", 30, limit=8)
    assert sr.sop_instance_uid == "7.3"
