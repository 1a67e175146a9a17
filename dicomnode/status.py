"""What ``dicomnode status`` shows: storage, recent studies, queue, destinations, dead jobs,
skipped instances."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.config import StorageSettings
from dicomnode.db.schema import Instance, Job, Report
from dicomnode.queue.jobs import JobKind, JobState, counts_by_state, dead_jobs
from dicomnode.store.files import free_mb
from dicomnode.store.instances import PURGED

DEAD_HINT = "(`dicomnode retry` re-queues, `dicomnode discard` gives up)"


def _studies(session: Session, limit: int) -> Table:
    table = Table("study", "instances", "received", "states", "reports", title="Recent studies")
    rows = session.execute(
        select(Instance.study_instance_uid, func.count(), func.max(Instance.received_at))
        .group_by(Instance.study_instance_uid)
        .order_by(func.max(Instance.received_at).desc())
        .limit(limit)
    ).all()
    for study_uid, count, received in rows:
        instance_state = _shown_state(
            Instance.state, Job.sop_instance_uid == Instance.sop_instance_uid, JobKind.INFER
        )
        states = session.execute(
            select(instance_state, func.count())
            .where(Instance.study_instance_uid == study_uid)
            .group_by(instance_state)
        ).all()
        report_state = _shown_state(Report.state, Job.report_id == Report.id, JobKind.REPORT)
        reports = session.execute(
            select(Report.model_name, Report.sequence, report_state).where(
                Report.study_instance_uid == study_uid
            )
        ).all()
        table.add_row(
            study_uid,
            str(count),
            f"{received:%Y-%m-%d %H:%M:%S}",
            ", ".join(f"{s}={n}" for s, n in states),
            ", ".join(f"{m}#{q}:{s}" for m, q, s in reports) or "-",
        )
    return table


def _shown_state(
    state: InstrumentedAttribute[str], of_it: ColumnElement[bool], kind: JobKind
) -> ColumnElement[str]:
    """``state``, or ``dead`` while the job of ``kind`` that would move it on is dead: an
    image whose analysis died stays ``queued``, a round whose report died ``pending``."""
    dead = exists().where(of_it, Job.kind == kind, Job.state == JobState.DEAD)
    return case((dead, "dead"), else_=state)


def _queue(session: Session) -> Table:
    table = Table("kind", "state", "jobs", title="Jobs by state")
    for (kind, state), count in sorted(counts_by_state(session).items()):
        table.add_row(kind, state, str(count))
    return table


def _destinations(session: Session) -> Table:
    """Per destination: what waits, what is retrying and why, what died, the last delivery."""
    table = Table(
        "destination",
        "waiting",
        "retrying",
        "next attempt",
        "last error",
        "dead",
        "last delivered",
        title="Destinations (result sends)",
    )
    send = Job.kind == JobKind.SEND
    peers = session.execute(select(Job.peer).where(send).distinct().order_by(Job.peer)).scalars()
    for peer in peers:
        mine = (send, Job.peer == peer)
        retrying = session.execute(
            select(Job.run_after, Job.last_error)
            .where(*mine, Job.state == JobState.FAILED)
            .order_by(Job.updated_at.desc())
            .limit(1)
        ).first()
        delivered = session.execute(
            select(func.max(Job.finished_at)).where(*mine, Job.state == JobState.DONE)
        ).scalar_one()
        table.add_row(
            peer or "-",
            str(_count(session, mine, JobState.QUEUED, JobState.RUNNING)),
            str(_count(session, mine, JobState.FAILED)),
            f"{retrying[0]:%Y-%m-%d %H:%M:%S}" if retrying else "-",
            Text(retrying[1]) if retrying else "-",
            str(_count(session, mine, JobState.DEAD)),
            f"{delivered:%Y-%m-%d %H:%M:%S}" if delivered else "never",
        )
    return table


def _count(session: Session, where: tuple[ColumnElement[bool], ...], *states: JobState) -> int:
    statement = select(func.count()).select_from(Job).where(*where, Job.state.in_(states))
    return int(session.execute(statement).scalar_one())


def _dead(session: Session) -> Table:
    table = Table(
        "job",
        "kind",
        "target",
        "attempts",
        "reason",
        title=f"Dead jobs {DEAD_HINT}",
    )
    total = _count(session, (), JobState.DEAD)
    shown = dead_jobs(session)
    if total > len(shown):
        table.title = f"Dead jobs, the {len(shown)} latest of {total} {DEAD_HINT}"
    for job in shown:
        target = job.sop_instance_uid or f"report {job.report_id}"
        if job.peer:
            target += f" -> {job.peer}"
        table.add_row(str(job.id), job.kind, target, str(job.attempts), Text(job.last_error))
    return table


def _skipped(session: Session, limit: int) -> Table:
    table = Table("instance", "study", "reason", title="Skipped instances")
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.study_instance_uid, Instance.reason)
        .where(Instance.state == "skipped")
        .order_by(Instance.received_at.desc())
        .limit(limit)
    ).all()
    for sop, study, reason in rows:
        table.add_row(sop, study, Text(reason))  # header text: never read as markup
    return table


def _storage(session: Session, storage: StorageSettings) -> Table:
    table = Table("what", "value", title="Storage")
    held = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.size), 0)).where(
            Instance.state != PURGED
        )
    ).one()
    purged = session.execute(
        select(func.count()).select_from(Instance).where(Instance.state == PURGED)
    ).scalar_one()
    free = free_mb(storage.data_dir) if storage.data_dir.exists() else float("nan")
    days = storage.retention_days
    table.add_row("data folder", str(storage.data_dir))
    table.add_row("free", f"{free:,.0f} MB (senders turned away below {storage.min_free_mb:,} MB)")
    table.add_row("images held", f"{held[0]:,} ({held[1] / 1e6:,.1f} MB as received)")
    table.add_row("images purged (headers kept)", f"{purged:,}")
    table.add_row(
        "retention",
        f"{days:g} days after a study's newest image, once it is finished" if days else "off",
    )
    return table


def render_status(
    session: Session, limit: int = 10, storage: StorageSettings | None = None
) -> list[Table]:
    tables = [
        _studies(session, limit),
        _queue(session),
        _destinations(session),
        _dead(session),
        _skipped(session, limit),
    ]
    return tables if storage is None else [_storage(session, storage), *tables]
