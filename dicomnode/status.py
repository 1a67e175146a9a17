"""What ``dicomnode status`` shows: storage, recent studies, queue, destinations, where each
model's results go, dead jobs, skipped instances.

:func:`node_status` reads it into frozen values (``status --json`` writes them as they are,
for scripts and monitoring); :func:`render_status` draws them as tables. Neither holds
patient data: studies and images are named by their UIDs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.config import ResultsSettings, Settings, StorageSettings
from dicomnode.db.schema import Instance, Job, Report
from dicomnode.db.session import db_now
from dicomnode.findings import ModelFindings, last_day
from dicomnode.queue.jobs import PENDING, JobKind, JobState, counts_by_state, dead_jobs
from dicomnode.store.files import free_mb
from dicomnode.store.instances import PURGED
from dicomnode.tls import TlsState
from dicomnode.values import Priority

DEAD_HINT = "(`dicomnode retry` re-queues, `dicomnode discard` gives up)"


@dataclass(frozen=True)
class ReportState:
    """One analysis round's report of a study: its model, round number and state."""

    model: str
    sequence: int
    state: str


@dataclass(frozen=True)
class StudyState:
    """A recent study: its images by state (``dead`` where their analysis died)."""

    study_instance_uid: str
    instances: int
    last_received: datetime
    instance_states: dict[str, int]
    reports: tuple[ReportState, ...]


@dataclass(frozen=True)
class DestinationState:
    """Result sends to one peer: waiting, retrying (the latest error), dead, last delivered."""

    peer: str
    waiting: int
    retrying: int
    next_attempt: datetime | None
    last_error: str | None
    dead: int
    last_delivered: datetime | None
    awaiting_commitment: int = 0
    """Rounds whose storage commitment the peer is asked for and has not reported yet."""


OTHER_MODELS = "*"
"""The model of the :class:`RouteState` that every model without a route of its own follows."""


@dataclass(frozen=True)
class RouteState:
    """Where one model's results go: ``rule`` ``route`` (its ``results.routes`` peers),
    ``shadow`` (an empty route: kept here), ``destinations`` (``results.destinations``) or
    ``caller`` (the calling AE, when it is a known peer). Model :data:`OTHER_MODELS`: the
    rule of every model without a route."""

    model: str
    peers: tuple[str, ...]
    rule: str


@dataclass(frozen=True)
class DeadJob:
    """A job that used up its attempts, with what it was for and why it died."""

    id: int
    kind: str
    target: str
    attempts: int
    reason: str


@dataclass(frozen=True)
class SkippedInstance:
    """A received image the node did not analyse, and why."""

    sop_instance_uid: str
    study_instance_uid: str
    reason: str


@dataclass(frozen=True)
class StorageState:
    """The data folder: free space against the floor, what it holds, the retention."""

    data_dir: Path
    free_mb: float
    min_free_mb: int
    images_held: int
    bytes_held: int
    images_purged: int
    retention_days: float
    records_days: float


@dataclass(frozen=True)
class AuditState:
    """The audit trail: where its messages go, and this host's waiting in the spool."""

    destination: str
    """``off``, ``udp|tcp|tls://HOST:PORT``, or ``file PATH``."""
    waiting: int
    oldest_waiting_since: datetime | None


def audit_state(settings: Settings) -> AuditState:
    from dicomnode.audit.spool import spool_of

    audit = settings.audit
    if audit.transport == "off":
        return AuditState("off", 0, None)
    if audit.transport == "file":
        destination = f"file {audit.file}"
    else:
        destination = f"{audit.transport}://{audit.host}:{audit.repository_port}"
    waiting, oldest = spool_of(settings).waiting()
    since = None if oldest is None else datetime.fromtimestamp(oldest, UTC).replace(tzinfo=None)
    return AuditState(destination, waiting, since)


@dataclass(frozen=True)
class TurnaroundState:
    """The time a radiologist waits for the AI: from a round's last image received to its
    last result delivered to every destination (a round kept here, or with nowhere to go: to
    its SR made), over the rounds whose results arrived in the last hour."""

    rounds: int
    median_seconds: float
    p95_seconds: float
    longest_seconds: float


@dataclass(frozen=True)
class NodeStatus:
    """Everything ``dicomnode status`` shows."""

    storage: StorageState | None
    studies: tuple[StudyState, ...]
    jobs: dict[str, dict[str, int]]
    destinations: tuple[DestinationState, ...]
    routing: tuple[RouteState, ...]
    dead_total: int
    dead: tuple[DeadJob, ...]
    skipped: tuple[SkippedInstance, ...]
    turnaround: TurnaroundState
    audit: AuditState | None = None
    urgent_waiting: dict[str, int] = field(default_factory=dict)
    """Urgent jobs (priority high) queued or waiting to be tried again, by kind."""
    tls: TlsState | None = None
    findings: tuple[ModelFindings, ...] = ()
    """What each model version found in the rounds reported in the last 24 hours."""


def node_status(
    session: Session,
    limit: int = 10,
    storage: StorageSettings | None = None,
    results: ResultsSettings | None = None,
    audit: AuditState | None = None,
    tls: TlsState | None = None,
) -> NodeStatus:
    """The node's state from the database (and the data folder, given ``storage``; the
    routing of results, given ``results``); ``limit`` caps the studies and the skipped
    instances listed."""
    jobs: dict[str, dict[str, int]] = {}
    for (kind, state), count in sorted(counts_by_state(session).items()):
        jobs.setdefault(kind, {})[state] = count
    return NodeStatus(
        storage=None if storage is None else _storage(session, storage),
        studies=_studies(session, limit),
        jobs=jobs,
        destinations=_destinations(session),
        routing=() if results is None else routing(results),
        dead_total=_count(session, (), JobState.DEAD),
        dead=_dead(session),
        skipped=_skipped(session, limit),
        turnaround=turnaround(session),
        audit=audit,
        urgent_waiting=_urgent_waiting(session),
        tls=tls,
        findings=last_day(session, db_now(session)),
    )


def _urgent_waiting(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.kind, func.count())
        .where(Job.priority == Priority.HIGH, Job.state.in_((JobState.QUEUED, JobState.FAILED)))
        .group_by(Job.kind)
    ).all()
    return {str(kind): int(count) for kind, count in rows}


def _studies(session: Session, limit: int) -> tuple[StudyState, ...]:
    rows = session.execute(
        select(Instance.study_instance_uid, func.count(), func.max(Instance.received_at))
        .group_by(Instance.study_instance_uid)
        .order_by(func.max(Instance.received_at).desc())
        .limit(limit)
    ).all()
    return tuple(_study(session, uid, count, received) for uid, count, received in rows)


def _study(session: Session, study_uid: str, count: int, received: datetime) -> StudyState:
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
    return StudyState(
        study_uid,
        int(count),
        received,
        {state: int(n) for state, n in states},
        tuple(ReportState(m, int(q), s) for m, q, s in reports),
    )


def _shown_state(
    state: InstrumentedAttribute[str], of_it: ColumnElement[bool], kind: JobKind
) -> ColumnElement[str]:
    """``state``, or ``dead`` while the job of ``kind`` that would move it on is dead: an
    image whose analysis died stays ``queued``, a round whose report died ``pending``."""
    dead = exists().where(of_it, Job.kind == kind, Job.state == JobState.DEAD)
    return case((dead, "dead"), else_=state)


def _destinations(session: Session) -> tuple[DestinationState, ...]:
    send = Job.kind == JobKind.SEND
    peers = session.execute(select(Job.peer).where(send).distinct().order_by(Job.peer)).scalars()
    return tuple(_destination(session, peer) for peer in peers)


def _destination(session: Session, peer: str | None) -> DestinationState:
    mine = (Job.kind == JobKind.SEND, Job.peer == peer)
    retrying = session.execute(
        select(Job.run_after, Job.last_error)
        .where(*mine, Job.state == JobState.FAILED)
        .order_by(Job.updated_at.desc())
        .limit(1)
    ).first()
    delivered = session.execute(
        select(func.max(Job.finished_at)).where(*mine, Job.state == JobState.DONE)
    ).scalar_one()
    return DestinationState(
        peer=peer or "-",
        waiting=_count(session, mine, JobState.QUEUED, JobState.RUNNING),
        retrying=_count(session, mine, JobState.FAILED),
        next_attempt=retrying[0] if retrying else None,
        last_error=retrying[1] if retrying else None,
        dead=_count(session, mine, JobState.DEAD),
        last_delivered=delivered,
        awaiting_commitment=_count(
            session, (Job.kind == JobKind.COMMIT, Job.peer == peer), *PENDING
        ),
    )


def routing(results: ResultsSettings) -> tuple[RouteState, ...]:
    """Each routed model's rule, then the rule of every other model."""
    routed = tuple(
        RouteState(model, tuple(peers), "route" if peers else "shadow")
        for model, peers in sorted(results.routes.items())
    )
    others = results.destinations
    return (*routed, RouteState(OTHER_MODELS, others, "destinations" if others else "caller"))


TURNAROUND_WINDOW = timedelta(hours=1)
"""The rounds whose results arrived this recently make the turnaround figures."""


def turnaround(session: Session) -> TurnaroundState:
    """The last hour's rounds' turnaround (:class:`TurnaroundState`)."""
    seconds = sorted(_turnarounds(session, db_now(session) - TURNAROUND_WINDOW))
    return TurnaroundState(
        len(seconds), _quantile(seconds, 0.5), _quantile(seconds, 0.95), _quantile(seconds, 1)
    )


def _turnarounds(session: Session, since: datetime) -> list[float]:
    """The turnaround of each round whose last result was delivered (or, with no sends, whose
    SR was made) since ``since``: a round held up by a PACS outage counts when it arrives."""
    rounds = _rounds_ended_since(session, since)
    if not rounds:
        return []
    made = dict(
        session.execute(select(Report.id, Report.finished_at).where(Report.id.in_(rounds))).all()
    )
    last_image = dict(
        session.execute(
            select(Instance.report_id, func.max(Instance.received_at))
            .where(Instance.report_id.in_(rounds))
            .group_by(Instance.report_id)
        ).all()
    )
    sent = and_(Job.kind == JobKind.SEND, ~Job.resend)
    sends = {
        report_id: (delivered, waiting)
        for report_id, delivered, waiting in session.execute(
            select(
                Job.report_id,
                func.max(Job.finished_at).filter(sent, Job.state == JobState.DONE),
                func.count().filter(sent, Job.state.in_(PENDING)),
            )
            .where(Job.report_id.in_(rounds))  # by its index alone, not all sends by kind
            .group_by(Job.report_id)
            .having(func.count().filter(sent) > 0)
        ).all()
    }
    spans = []
    for report_id in rounds:
        ended, waiting = sends.get(report_id, (made.get(report_id), 0))
        received = last_image.get(report_id)
        if waiting or received is None or ended is None or ended < since:
            continue  # results still on their way, ended earlier, or a round without images
        spans.append(max(0.0, (ended - received).total_seconds()))
    return spans


def _rounds_ended_since(session: Session, since: datetime) -> set[int]:
    """Rounds with an SR made, or a result delivered, since ``since``."""
    reported = session.execute(select(Report.id).where(Report.finished_at >= since)).scalars()
    delivered = session.execute(
        select(Job.report_id)
        .where(
            Job.kind == JobKind.SEND,
            Job.state == JobState.DONE,
            Job.finished_at >= since,
            ~Job.resend,  # `dicomnode resend`: not the round's first delivery
        )
        .distinct()
    ).scalars()
    return {*reported, *(r for r in delivered if r is not None)}


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of ``ordered`` (the nearest rank; 0 when empty)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _count(session: Session, where: tuple[ColumnElement[bool], ...], *states: JobState) -> int:
    statement = select(func.count()).select_from(Job).where(*where, Job.state.in_(states))
    return int(session.execute(statement).scalar_one())


def _dead(session: Session) -> tuple[DeadJob, ...]:
    shown = []
    for job in dead_jobs(session):
        target = job.sop_instance_uid or f"report {job.report_id}"
        if job.peer:
            target += f" -> {job.peer}"
        shown.append(DeadJob(job.id, job.kind, target, job.attempts, job.last_error or ""))
    return tuple(shown)


def _skipped(session: Session, limit: int) -> tuple[SkippedInstance, ...]:
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.study_instance_uid, Instance.reason)
        .where(Instance.state == "skipped")
        .order_by(Instance.received_at.desc())
        .limit(limit)
    ).all()
    return tuple(SkippedInstance(sop, study, reason or "") for sop, study, reason in rows)


def _storage(session: Session, storage: StorageSettings) -> StorageState:
    held = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.size), 0)).where(
            Instance.state != PURGED
        )
    ).one()
    purged = session.execute(
        select(func.count()).select_from(Instance).where(Instance.state == PURGED)
    ).scalar_one()
    return StorageState(
        data_dir=storage.data_dir,
        free_mb=free_mb(storage.data_dir),  # of its nearest existing parent if not made yet
        min_free_mb=storage.min_free_mb,
        images_held=int(held[0]),
        bytes_held=int(held[1]),
        images_purged=int(purged),
        retention_days=storage.retention_days,
        records_days=storage.records_days,
    )


# --- tables ---------------------------------------------------------------------------------


def _when(value: datetime | None, missing: str = "-") -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else missing


def _studies_table(studies: tuple[StudyState, ...]) -> Table:
    table = Table("study", "instances", "received", "states", "reports", title="Recent studies")
    for study in studies:
        table.add_row(
            study.study_instance_uid,
            str(study.instances),
            _when(study.last_received),
            ", ".join(f"{s}={n}" for s, n in study.instance_states.items()),
            ", ".join(f"{r.model}#{r.sequence}:{r.state}" for r in study.reports) or "-",
        )
    return table


def _queue_table(jobs: dict[str, dict[str, int]]) -> Table:
    table = Table("kind", "state", "jobs", title="Jobs by state")
    for kind, states in jobs.items():
        for state, count in states.items():
            table.add_row(kind, state, str(count))
    return table


def _urgent_table(urgent: dict[str, int]) -> Table:
    table = Table("kind", "jobs", title="Urgent work waiting (claimed first)", min_width=40)
    for kind, count in sorted(urgent.items()):
        table.add_row(kind, str(count))
    return table


def _destinations_table(destinations: tuple[DestinationState, ...]) -> Table:
    """Per destination: what waits, what is retrying and why, what died, the last delivery,
    the rounds whose storage commitment it has not reported yet."""
    table = Table(
        "destination",
        "waiting",
        "retrying",
        "next attempt",
        "last error",
        "dead",
        "last delivered",
        "awaiting commitment",
        title="Destinations (result sends)",
    )
    for d in destinations:
        table.add_row(
            d.peer,
            str(d.waiting),
            str(d.retrying),
            _when(d.next_attempt),
            Text(d.last_error) if d.last_error is not None else "-",
            str(d.dead),
            _when(d.last_delivered, "never"),
            f"{d.awaiting_commitment} round(s)" if d.awaiting_commitment else "-",
        )
    return table


ROUTE_WORDS = {
    "shadow": "none: kept here (shadow mode)",
    "caller": "the calling AE, when it is a known peer",
}


def _routing_table(routes: tuple[RouteState, ...]) -> Table:
    """Where each model's results go (``results.routes``, ``results.destinations``)."""
    table = Table("model", "results go to", "set by", title="Where results go")
    setting = {
        "route": "results.routes",
        "shadow": "results.routes",
        "destinations": "results.destinations",
        "caller": "results.destinations is empty",
    }
    for r in routes:
        model = "every other model" if r.model == OTHER_MODELS else r.model
        table.add_row(model, ROUTE_WORDS.get(r.rule, ", ".join(r.peers)), setting[r.rule])
    return table


def _dead_table(dead: tuple[DeadJob, ...], total: int) -> Table:
    title = f"Dead jobs {DEAD_HINT}"
    if total > len(dead):
        title = f"Dead jobs, the {len(dead)} latest of {total} {DEAD_HINT}"
    table = Table("job", "kind", "target", "attempts", "reason", title=title)
    for job in dead:
        table.add_row(str(job.id), job.kind, job.target, str(job.attempts), Text(job.reason))
    return table


def _skipped_table(skipped: tuple[SkippedInstance, ...]) -> Table:
    table = Table("instance", "study", "reason", title="Skipped instances")
    for item in skipped:
        # header text: never read as markup
        table.add_row(item.sop_instance_uid, item.study_instance_uid, Text(item.reason))
    return table


def _storage_table(storage: StorageState) -> Table:
    table = Table("what", "value", title="Storage")
    days = storage.retention_days
    table.add_row("data folder", str(storage.data_dir))
    table.add_row(
        "free", f"{storage.free_mb:,.0f} MB (senders turned away below {storage.min_free_mb:,} MB)"
    )
    table.add_row(
        "images held", f"{storage.images_held:,} ({storage.bytes_held / 1e6:,.1f} MB as received)"
    )
    table.add_row("images purged (headers kept)", f"{storage.images_purged:,}")
    table.add_row(
        "retention",
        f"{days:g} days after a study's newest image, once it is finished" if days else "off",
    )
    records = storage.records_days
    table.add_row(
        "records",
        f"a purged study is forgotten {records:g} days after its newest image"
        if records
        else "kept for good",
    )
    return table


def _turnaround_table(state: TurnaroundState) -> Table:
    table = Table("rounds", "median", "95%", "longest", title="Turnaround, last hour")
    if not state.rounds:
        table.add_row("0", "-", "-", "-")
        table.caption = "no results arrived"
        return table
    table.add_row(
        str(state.rounds),
        *(f"{s:,.1f} s" for s in (state.median_seconds, state.p95_seconds, state.longest_seconds)),
    )
    table.caption = "from a round's last image received to its last result delivered"
    return table


def _findings_table(found: tuple[ModelFindings, ...]) -> Table:
    table = Table(
        "model", "findings by class", "localisation uncertain", "not assessed",
        title="What the models found, last 24 h",
    )  # fmt: skip
    for m in found:
        classes = ", ".join(f"{name} {count}" for name, count in m.classes)
        share = f" ({m.uncertain / m.findings:.0%})" if m.findings else ""
        table.add_row(
            f"{m.model} {m.version}", escape(classes), f"{m.uncertain}{share}", str(m.not_assessed)
        )
    if not found:
        table.caption = "no round reported"
    else:
        table.caption = "rounds reported in the last 24 h; a finding is an image or a knee joint"
    return table


def render_status(status: NodeStatus) -> list[Table]:
    """The status as the tables ``dicomnode status`` prints, storage first when known."""
    tables = [
        _studies_table(status.studies),
        _queue_table(status.jobs),
        *([_urgent_table(status.urgent_waiting)] if status.urgent_waiting else []),
        _turnaround_table(status.turnaround),
        _findings_table(status.findings),
        _destinations_table(status.destinations),
        *([_routing_table(status.routing)] if status.routing else []),
        _dead_table(status.dead, status.dead_total),
        _skipped_table(status.skipped),
    ]
    if status.audit is not None:
        tables.append(_audit_table(status.audit))
    if status.tls is not None:
        tables.append(_tls_table(status.tls, datetime.now(UTC)))
    return tables if status.storage is None else [_storage_table(status.storage), *tables]


def _tls_table(tls: TlsState, now: datetime) -> Table:
    table = Table("file", "subject", "ends (UTC)", "left", title="TLS certificates and lists")
    if tls.problem:
        table.add_row("[red]cannot be read[/red]", escape(tls.problem), "", "")
    for item in tls.files:
        days = item.days_left(now)
        left = (
            "[red]ended[/red]"
            if days <= 0
            else f"[yellow]{days:.0f} days: renew it[/yellow]"
            if days < tls.warning_days
            else f"{days:.0f} days"
        )
        table.add_row(item.setting, escape(item.subject), _when(item.ends), left)
    return table


def _audit_table(audit: AuditState) -> Table:
    table = Table("what", "value", title="Audit trail (IHE ATNA)")
    table.add_row("messages go to", audit.destination)
    if audit.destination != "off":
        oldest = audit.oldest_waiting_since
        since = "" if oldest is None else f", the oldest since {_when(oldest)} UTC"
        table.add_row("waiting in this host's spool", f"{audit.waiting:,}{since}")
    return table
