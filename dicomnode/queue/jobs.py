"""Jobs in the database, claimed atomically with a lease.

States::

    queued --claim--> running --complete--> done
                         |--fail--> failed (waits run_after) --claim--> running ...
                         |--fail, attempts used up--> dead
                         |--worker died or lease expired--> failed (LOST_LEASE), or dead
                                                            when its attempts are used up

A job whose worker died counts the attempt, like any failure: an image that
kills the process (a decoder crash, memory exhausted) ends dead after
``max_attempts`` instead of taking the worker down forever. Such a job is
claimed alone next time, so that the jobs of its batch are not charged for it
again and the culprit is found.

A job is unique per ``(kind, dedupe_key)``; enqueueing it again is a no-op,
so the same SOP Instance UID is never queued twice for one model version.
Claiming is one ``WITH candidates AS MATERIALIZED (SELECT ... LIMIT n FOR UPDATE SKIP
LOCKED) UPDATE ... WHERE id IN candidates`` statement: atomic on SQLite (one writer at a
time) and on PostgreSQL (rows locked by another claimer are skipped).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import CTE, Select, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.db.schema import Job, Output, Report
from dicomnode.db.session import db_now, insert_new
from dicomnode.queue.retry import RetryPolicy
from dicomnode.values import Priority


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    DISCARDED = "discarded"
    """A dead job an administrator gave up (``dicomnode discard``): its study may be purged."""


class JobKind(StrEnum):
    INFER = "infer"
    REPORT = "report"
    SEND = "send"
    COMMIT = "commit"
    """A storage commitment request to a peer, for a round's objects delivered to it."""


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
    resend: bool = False
    """Queued by ``dicomnode resend`` (a delivery made again, left out of the turnaround)."""
    priority: int = Priority.MEDIUM
    """Due jobs of a kind are claimed highest :class:`~dicomnode.values.Priority` first."""


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
    now = db_now(session)
    rows = [
        {
            "kind": str(s.kind),
            "dedupe_key": s.dedupe_key,
            "state": str(JobState.QUEUED),
            "group_key": s.group_key,
            "report_id": s.report_id,
            "sop_instance_uid": s.sop_instance_uid,
            "peer": s.peer,
            "resend": s.resend,
            "priority": int(s.priority),
            "attempts": 0,
            "max_attempts": s.max_attempts,
            "run_after": now,
            "last_error": "",
            "created_at": now,
            "updated_at": now,
        }
        for s in specs
    ]
    statement = insert_new(session, Job, rows, ["kind", "dedupe_key"]).returning(Job.id)
    return len(session.execute(statement).all())


LOST_LEASE = "the worker running this job stopped or lost its lease"
"""``last_error`` of a job whose worker died or stopped renewing its lease."""


WORKER_HOST_CHARS = 56
"""A worker id is ``host:pid`` in a column of 64 characters: the host name (Linux allows
64) is cut to leave room for the largest pid (7 digits) and the colon."""


def worker_id_of(pid: int) -> str:
    """The queue's id of this host's worker process ``pid``."""
    return f"{os.uname().nodename[:WORKER_HOST_CHARS]}:{pid}"


def _claimable(now: datetime) -> ColumnElement[bool]:
    return and_(Job.state.in_([JobState.QUEUED, JobState.FAILED]), Job.run_after <= now)


def due_since(moment: datetime, kind: JobKind | None = None) -> ColumnElement[bool]:
    """Jobs (of ``kind``, when given) a worker could have claimed at ``moment`` and still
    could: due by then, and ready now (a report's round analysed, an SR's overlays and
    earlier rounds' SRs sent first). What :func:`claim` and :func:`next_group` select (with
    ``moment`` now), and what ``dicomnode health`` counts as waiting. Given ``kind``, only
    its own conditions are asked: each is a correlated subquery per candidate row, and
    SQLite evaluates it even where the kind alone settles the answer."""
    conditions = [_claimable(moment)]
    if kind is None or kind == JobKind.REPORT:
        conditions.append(_report_ready())
    if kind is None or kind == JobKind.SEND:
        conditions += [_overlays_sent_first(), _earlier_rounds_sent_first()]
    return and_(*conditions)


def _end_leases(session: Session, held: ColumnElement[bool], now: datetime) -> int:
    """Running jobs matching ``held`` fail with :data:`LOST_LEASE` (dead when attempts are used)."""
    running = and_(Job.state == JobState.RUNNING, held)
    common = {"last_error": LOST_LEASE, "updated_at": now, "lease_expires_at": None}
    used_up = Job.attempts >= Job.max_attempts
    dead = session.execute(
        update(Job)
        .where(running, used_up)
        .values(state=JobState.DEAD, finished_at=now, **common)
        .execution_options(synchronize_session=False)
    )
    failed = session.execute(
        update(Job)
        .where(running, ~used_up)
        .values(state=JobState.FAILED, run_after=now, **common)
        .execution_options(synchronize_session=False)
    )
    return sum(int(getattr(r, "rowcount", 0) or 0) for r in (dead, failed))


def expire_lost_leases(session: Session, kind: JobKind, now: datetime | None = None) -> int:
    """Jobs of ``kind`` whose lease ran out by ``now`` (default: the database's now) fail,
    or die: their worker hung, or its host died.

    Returns how many. Called before a worker looks for work (:func:`next_group`,
    :func:`claim`); the claim index (kind, state) keeps it cheap.
    """
    now = now or db_now(session)
    return _end_leases(session, and_(Job.kind == kind, Job.lease_expires_at < now), now)


def _overlays_sent_first() -> ColumnElement[bool]:
    """A report's SR is sent to a peer once none of the report's overlays (nor presentation
    states) waits for that peer.

    A PACS that files or routes on the SR then finds every image it references, and every
    annotation of them. An overlay that died does not hold the SR back (the dead job is
    listed, and the SR says nothing of it that is wrong).
    """
    overlay_job, overlay = aliased(Job), aliased(Output)
    overlay_waiting = exists().where(
        overlay_job.kind == JobKind.SEND,
        overlay_job.report_id == Job.report_id,
        overlay_job.peer == Job.peer,
        overlay_job.state.in_(PENDING),
        overlay.sop_instance_uid == overlay_job.sop_instance_uid,
        overlay.kind != "SR",
    )
    return or_(Job.kind != JobKind.SEND, ~_sends("SR"), ~overlay_waiting)


def _earlier_rounds_sent_first() -> ColumnElement[bool]:
    """A study's SR is sent to a peer once no SR of an earlier round of the study (by the same
    model) waits for that peer; its rejection note (KO) once nothing of an earlier round does.

    After an outage each send keeps its own backoff, so the SR of round 2, which supersedes
    round 1's, could arrive first; a RIS that keeps the last SR it received would keep the
    incomplete one. A rejection note rejects objects of earlier rounds: an archive should
    have them before it is told to hide them. A dead earlier send does not hold a later one
    back.
    """
    sr_waits = _earlier_round_waiting(("SR",))
    ko_waits = _earlier_round_waiting(None)
    return or_(
        Job.kind != JobKind.SEND,
        and_(~_sends("SR"), ~_sends("KO")),
        and_(_sends("SR"), ~sr_waits),
        and_(_sends("KO"), ~ko_waits),
    )


def _earlier_round_waiting(kinds: tuple[str, ...] | None) -> ColumnElement[bool]:
    """A send to the job's peer of an object (of ``kinds``, None: any) of an earlier round of
    the job's study and model waits."""
    earlier_job, earlier_document = aliased(Job), aliased(Output)
    conditions = [
        earlier_job.kind == JobKind.SEND,
        earlier_job.peer == Job.peer,
        earlier_job.state.in_(PENDING),
        *_of_an_earlier_round(earlier_job),
    ]
    if kinds is not None:
        conditions += [
            earlier_document.sop_instance_uid == earlier_job.sop_instance_uid,
            earlier_document.kind.in_(kinds),
        ]
    return exists().where(*conditions)


def _sends(kind: str) -> ColumnElement[bool]:
    """The job sends an object of ``kind`` (SR, KO: its object is such an output)."""
    document = aliased(Output)
    return exists().where(document.sop_instance_uid == Job.sop_instance_uid, document.kind == kind)


def hurry_sends(session: Session, peer: str) -> int:
    """Sends to ``peer`` waiting out a backoff are due now: the peer just took a delivery.

    After an outage each send waits its own backoff (up to ten minutes by default),
    so results kept trickling in for minutes after the PACS was back
    (``send.backoff_max_seconds``).
    """
    now = db_now(session)
    result = session.execute(
        update(Job)
        .where(
            Job.kind == JobKind.SEND,
            Job.peer == peer,
            Job.state == JobState.FAILED,
            Job.run_after > now,
        )
        .values(run_after=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _report_ready() -> ColumnElement[bool]:
    """A report job waits until none of its round's inference jobs is pending, nor the report
    job of an earlier round of its study and model: rounds report in turn, so that a round's
    SR and rejection note see what the earlier rounds made."""
    infer, earlier_job = aliased(Job), aliased(Job)
    pending = exists().where(
        infer.report_id == Job.report_id,
        infer.kind == JobKind.INFER,
        infer.state.in_(PENDING),
    )
    earlier_pending = exists().where(
        earlier_job.kind == JobKind.REPORT,
        earlier_job.state.in_(PENDING),
        *_of_an_earlier_round(earlier_job),
    )
    return or_(Job.kind != JobKind.REPORT, and_(~pending, ~earlier_pending))


def _of_an_earlier_round(earlier_job: type[Job]) -> list[ColumnElement[bool]]:
    """``earlier_job`` belongs to an earlier round of the job's study and model."""
    earlier_report, report = aliased(Report), aliased(Report)
    return [
        earlier_report.id == earlier_job.report_id,
        report.id == Job.report_id,
        earlier_report.study_instance_uid == report.study_instance_uid,
        earlier_report.model_name == report.model_name,
        earlier_report.sequence < report.sequence,
    ]


def _due(
    session: Session, kind: JobKind, now: datetime, group_key: str | None = None
) -> Select[int] | None:
    """The due jobs of ``kind`` (of one group, if given) at the highest priority that has
    any, the one due longest first (then the oldest); None when no job is due.

    One level at a time, not ``ORDER BY priority DESC, run_after``: with the claimable states
    an ``IN`` of two, no index gives that order, and sorting a backlog of 180,000 due jobs
    took a claim from 12 to 260 ms on SQLite. Per level, ``ix_jobs_priority`` finds the
    level's jobs and ``run_after`` orders them as before."""
    base = select(Job.id).where(Job.kind == kind, due_since(now, kind))
    if group_key is not None:
        base = base.where(Job.group_key == group_key)
    for level in sorted(Priority, reverse=True):
        at_level = base.where(Job.priority == level)
        if session.execute(at_level.limit(1)).first() is not None:
            return at_level.order_by(Job.run_after, Job.id)
    return None


def claim(
    session: Session,
    kind: JobKind,
    worker_id: str,
    lease_seconds: float,
    limit: int = 1,
    group_key: str | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` runnable jobs of ``kind`` (of one group, if given) to ``worker_id``.

    Lost leases are ended first (:func:`expire_lost_leases`); when the first job due lost
    its worker before, it is claimed alone.
    """
    now = db_now(session)
    expire_lost_leases(session, kind, now)
    due = _due(session, kind, now, group_key)
    if due is None:
        return []
    first_error = session.execute(
        due.with_only_columns(Job.last_error).limit(1)
    ).scalar_one_or_none()
    if first_error == LOST_LEASE:
        limit = 1
    statement = (
        update(Job)
        .where(Job.id.in_(select(_candidates(due.limit(limit)).c.id)), _claimable(now))
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


def _candidates(due: Select[int]) -> CTE:
    """The due jobs' ids, locked (``FOR UPDATE SKIP LOCKED``) and computed once per claim.

    ``MATERIALIZED`` matters on PostgreSQL: as a plain ``IN (subquery)`` the planner may run
    the subquery again for every row the ``UPDATE`` changes, each run skipping the rows the
    statement has just locked, so that a claim of ``limit`` jobs took every due job. SQLite
    ignores row locks; one writer at a time makes its claim atomic."""
    return (
        due.with_for_update(skip_locked=True)
        .cte("candidates")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )


def next_group(session: Session, kind: JobKind) -> str | None:
    """The group key of the oldest runnable job of ``kind`` (to batch one model or one peer).

    Lost leases of ``kind`` are ended first, so that a job whose worker hung is found.
    """
    now = db_now(session)
    expire_lost_leases(session, kind, now)
    due = _due(session, kind, now)
    if due is None:
        return None
    return session.execute(due.with_only_columns(Job.group_key).limit(1)).scalar_one_or_none()


def heartbeat(
    session: Session, job_ids: Sequence[int], worker_id: str, lease_seconds: float
) -> None:
    """Extend the lease of jobs still held by ``worker_id``."""
    if not job_ids:
        return
    now = db_now(session)
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
    )


def complete(session: Session, job_id: int, worker_id: str) -> bool:
    """Mark a job done; False when the lease was lost to another worker meanwhile."""
    now = db_now(session)
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
    now = db_now(session)
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


def postpone(
    session: Session, job: ClaimedJob, worker_id: str, error: str, delay_seconds: float
) -> None:
    """Give a claimed job back without charging its attempt: it stopped for a reason of the
    node's (its disk is full, its worker is stopping), not of the job, and runs again after
    ``delay_seconds``."""
    _wait(session, job, worker_id, error, delay_seconds, charged=False)


def await_answer(
    session: Session, job: ClaimedJob, worker_id: str, note: str, seconds: float
) -> None:
    """The job asked a peer, which answers later: it waits ``seconds`` (state ``failed``, its
    attempt counted) and runs again unless the answer finishes it first."""
    _wait(session, job, worker_id, note, seconds, charged=True)


def _wait(
    session: Session,
    job: ClaimedJob,
    worker_id: str,
    note: str,
    seconds: float,
    *,
    charged: bool,
) -> None:
    """A claimed job of ``worker_id`` waits ``seconds`` (state ``failed``, ``note`` its last
    error), its attempt counted or not."""
    now = db_now(session)
    still_ours = (Job.id == job.id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
    session.execute(
        update(Job)
        .where(*still_ours)
        .values(
            state=JobState.FAILED,
            attempts=Job.attempts if charged else Job.attempts - 1,
            last_error=note[:2000],
            updated_at=now,
            lease_expires_at=None,
            run_after=now + timedelta(seconds=seconds),
        )
    )


def release_worker(session: Session, worker_id: str) -> int:
    """The running jobs of a worker known dead fail at once (:data:`LOST_LEASE`), or die."""
    return _end_leases(session, Job.worker_id == worker_id, db_now(session))


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
    now = db_now(session)
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
