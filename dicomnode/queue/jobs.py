"""Jobs in the database, claimed atomically with a lease.

States::

    queued --claim--> running --complete--> done
                         |--fail--> failed (waits run_after) --claim--> running ...
                         |--fail, attempts used up--> dead
                         |--lease expires (worker died)--> claimable again

A job is unique per ``(kind, dedupe_key)``; enqueueing it again is a no-op,
so the same SOP Instance UID is never queued twice for one model version.
Claiming is one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``
statement: atomic on SQLite (one writer at a time) and on PostgreSQL (rows
locked by another claimer are skipped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.db.schema import Job
from dicomnode.db.session import utcnow
from dicomnode.queue.retry import RetryPolicy


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"


class JobKind(StrEnum):
    INFER = "infer"
    REPORT = "report"
    SEND = "send"


PENDING = (JobState.QUEUED, JobState.RUNNING, JobState.FAILED)


@dataclass(frozen=True)
class JobSpec:
    """What to enqueue."""

    kind: JobKind
    dedupe_key: str
    max_attempts: int
    group_key: str = ""
    report_id: int | None = None
    sop_instance_uid: str | None = None
    peer: str | None = None


@dataclass(frozen=True)
class ClaimedJob:
    """A job leased to one worker."""

    id: int
    kind: JobKind
    attempts: int
    max_attempts: int
    group_key: str
    report_id: int | None
    sop_instance_uid: str | None
    peer: str | None


def enqueue(session: Session, specs: Sequence[JobSpec]) -> int:
    """Insert jobs that are not queued yet; return how many were new."""
    if not specs:
        return 0
    now = utcnow()
    rows = [
        {
            "kind": str(s.kind),
            "dedupe_key": s.dedupe_key,
            "state": str(JobState.QUEUED),
            "group_key": s.group_key,
            "report_id": s.report_id,
            "sop_instance_uid": s.sop_instance_uid,
            "peer": s.peer,
            "attempts": 0,
            "max_attempts": s.max_attempts,
            "run_after": now,
            "last_error": "",
            "created_at": now,
            "updated_at": now,
        }
        for s in specs
    ]
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = (
        insert(Job)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["kind", "dedupe_key"])
        .returning(Job.id)
    )
    return len(session.execute(statement).all())


def _claimable(now: datetime) -> ColumnElement[bool]:
    waiting = and_(Job.state.in_([JobState.QUEUED, JobState.FAILED]), Job.run_after <= now)
    lease_lost = and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
    return or_(waiting, lease_lost)


def _report_ready() -> ColumnElement[bool]:
    """A report job waits until none of its round's inference jobs is pending."""
    infer = aliased(Job)
    pending = exists().where(
        infer.report_id == Job.report_id,
        infer.kind == JobKind.INFER,
        infer.state.in_(PENDING),
    )
    return or_(Job.kind != JobKind.REPORT, ~pending)


def claim(
    session: Session,
    kind: JobKind,
    worker_id: str,
    lease_seconds: float,
    limit: int = 1,
    group_key: str | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` runnable jobs of ``kind`` (of one group, if given) to ``worker_id``."""
    now = utcnow()
    candidates = (
        select(Job.id)
        .where(Job.kind == kind, _claimable(now), _report_ready())
        .order_by(Job.run_after, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if group_key is not None:
        candidates = candidates.where(Job.group_key == group_key)
    statement = (
        update(Job)
        .where(Job.id.in_(candidates.scalar_subquery()), _claimable(now))
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            updated_at=now,
        )
        .returning(
            Job.id,
            Job.kind,
            Job.attempts,
            Job.max_attempts,
            Job.group_key,
            Job.report_id,
            Job.sop_instance_uid,
            Job.peer,
        )
        .execution_options(synchronize_session=False)
    )
    rows = session.execute(statement).all()
    return sorted(
        (ClaimedJob(r[0], JobKind(r[1]), r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows),
        key=lambda j: j.id,
    )


def next_group(session: Session, kind: JobKind) -> str | None:
    """The group key of the oldest runnable job of ``kind`` (to batch one model or one peer)."""
    now = utcnow()
    statement = (
        select(Job.group_key)
        .where(Job.kind == kind, _claimable(now), _report_ready())
        .order_by(Job.run_after, Job.id)
        .limit(1)
    )
    return session.execute(statement).scalar_one_or_none()


def heartbeat(
    session: Session, job_ids: Sequence[int], worker_id: str, lease_seconds: float
) -> None:
    """Extend the lease of jobs still held by ``worker_id``."""
    if not job_ids:
        return
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
    )


def complete(session: Session, job_id: int, worker_id: str) -> bool:
    """Mark a job done; False when the lease was lost to another worker meanwhile."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(
            state=JobState.DONE,
            finished_at=now,
            updated_at=now,
            lease_expires_at=None,
            last_error="",
        )
    )
    return bool(getattr(result, "rowcount", 0))


def fail(
    session: Session, job: ClaimedJob, worker_id: str, error: str, policy: RetryPolicy
) -> JobState:
    """Record a failed attempt: retry later with backoff, or ``dead`` when attempts are used up."""
    now = utcnow()
    dead = job.attempts >= job.max_attempts or policy.exhausted(job.attempts)
    state = JobState.DEAD if dead else JobState.FAILED
    values: dict[str, object] = {
        "state": state,
        "last_error": error[:2000],
        "updated_at": now,
        "lease_expires_at": None,
        "run_after": now + timedelta(seconds=0 if dead else policy.delay(job.attempts)),
    }
    if dead:
        values["finished_at"] = now
    still_ours = (Job.id == job.id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
    session.execute(update(Job).where(*still_ours).values(**values))
    return state


def release_worker(session: Session, worker_id: str) -> int:
    """Make the running jobs of a worker that is known dead claimable at once."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(lease_expires_at=now - timedelta(seconds=1), updated_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def running_workers(session: Session) -> list[str]:
    """Worker ids that hold running jobs."""
    statement = select(Job.worker_id).where(Job.state == JobState.RUNNING).distinct()
    return [w for w in session.execute(statement).scalars() if w]


def requeue(
    session: Session,
    job_ids: Sequence[int] | None = None,
    states: Sequence[JobState] = (JobState.DEAD,),
) -> int:
    """Put dead (or given) jobs back in the queue with fresh attempts (``dicomnode retry``)."""
    now = utcnow()
    statement = update(Job).where(Job.state.in_(states))
    if job_ids:
        statement = statement.where(Job.id.in_(job_ids))
    result = session.execute(
        statement.values(
            state=JobState.QUEUED, attempts=0, run_after=now, updated_at=now, finished_at=None
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def counts_by_state(session: Session) -> dict[tuple[str, str], int]:
    """Number of jobs per (kind, state)."""
    rows = session.execute(
        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
    ).all()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def dead_jobs(session: Session, limit: int = 20) -> list[Job]:
    """The most recent dead jobs, with their last error."""
    statement = (
        select(Job).where(Job.state == JobState.DEAD).order_by(Job.updated_at.desc()).limit(limit)
    )
    return list(session.execute(statement).scalars())
