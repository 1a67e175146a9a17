"""Prometheus metrics: the node's state, read from its database at each scrape.

With ``metrics.port`` set, ``serve`` answers ``GET /metrics`` on ``metrics.host`` (loopback by
default) in Prometheus' text format; ``dicomnode metrics`` prints the same text, or writes it
for node_exporter's textfile collector (``--out``). A scrape reads the database, so the figures
are those of the whole node (every receiving host and worker that shares the database), except
the data folder's free space and the process figures, which are this host's and this process'.

What a radiology IT engineer alerts on: jobs dead (``dicomnode_jobs{state="dead"}``), work
waiting too long (``dicomnode_jobs_oldest_due_age_seconds``), a destination that stopped
taking results (``dicomnode_sends`` retrying, ``dicomnode_destination_last_delivery_timestamp_
seconds``), no images or reports for too long, and the disk. No patient data: job kinds and
states, model names, AE titles, counts and times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import Collector
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode import __version__
from dicomnode.config import MetricsSettings, Settings
from dicomnode.db.schema import Instance, Job, Output, Rejection, Report
from dicomnode.db.session import Database, db_now
from dicomnode.errors import ConfigError
from dicomnode.findings import last_day
from dicomnode.queue.jobs import JobKind, JobState, counts_by_state, due_since
from dicomnode.status import turnaround
from dicomnode.store.files import free_mb
from dicomnode.store.instances import PURGED
from dicomnode.values import REJECTION_TITLES, Priority

log = logging.getLogger(__name__)

MB = 1024 * 1024


class NodeCollector(Collector):
    """The node's figures from its database (and this host's data folder), at each scrape.

    When the database cannot be read, only ``dicomnode_database_up 0`` and the build and
    disk figures are given (and a warning logged), so an alert on the database fires instead
    of every other figure vanishing."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.database_up = False
        """Whether the latest scrape read the database."""

    def collect(self) -> Iterator[Metric]:
        yield _gauge("dicomnode_build_info", "the running version", 1, version=__version__)
        yield from _storage_free(self.settings)
        yield from _audit_spool(self.settings)
        yield from _tls_expiries(self.settings)
        try:
            with self.db.reading() as session:
                figures = list(_from_database(session))
        except Exception as exc:  # any driver error means the same: the database is down
            log.warning("metrics: the database cannot be read (%s)", type(exc).__name__)
            log.debug("metrics: the database's error", exc_info=True)
            self.database_up = False
            yield _gauge("dicomnode_database_up", "1 when the database answers", 0)
            return
        self.database_up = True
        yield _gauge("dicomnode_database_up", "1 when the database answers", 1)
        yield from figures


def registry(node: NodeCollector) -> CollectorRegistry:
    """The node's figures, with this process' (memory, CPU, open files) and Python's."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(node)
    ProcessCollector(registry=collectors)
    PlatformCollector(registry=collectors)
    return collectors


def exposition(db: Database, settings: Settings) -> tuple[bytes, bool]:
    """The metrics in Prometheus' text format (what ``GET /metrics`` answers), and whether
    the database could be read for them."""
    node = NodeCollector(db, settings)
    text = generate_latest(registry(node))
    return text, node.database_up


class MetricsServer:
    """``GET /metrics`` over HTTP, in a daemon thread, until :meth:`stop`."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(db: Database, settings: Settings) -> MetricsServer | None:
    """Serve the metrics on ``metrics.host``:``metrics.port``; None when the port is 0."""
    wanted: MetricsSettings = settings.metrics
    if not wanted.port:
        return None
    try:
        server, thread = start_http_server(
            wanted.port, wanted.host, registry(NodeCollector(db, settings))
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {wanted.host}:{wanted.port}: {exc.strerror} "
            "(is another program using this port? change metrics.port)"
        ) from exc
    log.info("metrics at http://%s:%d/metrics", wanted.host, server.server_address[1])
    return MetricsServer(server, thread)


# --- the figures ------------------------------------------------------------------------------


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _labelled(
    name: str, documentation: str, labels: list[str], rows: Iterable[tuple[tuple[str, ...], float]]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def _epoch(moment: datetime | None) -> float:
    """Seconds since 1970 of a database time (UTC, held without a zone); 0 for never."""
    if moment is None:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _storage_free(settings: Settings) -> Iterator[Metric]:
    storage = settings.storage
    yield _gauge(
        "dicomnode_storage_free_bytes",
        "free space of the data folder's file system on this host",
        free_mb(storage.data_dir) * MB,
    )
    yield _gauge(
        "dicomnode_storage_min_free_bytes",
        "storage.min_free_mb: below it C-STORE is refused (0xA700)",
        storage.min_free_mb * MB,
    )


def _audit_spool(settings: Settings) -> Iterator[Metric]:
    """With the audit trail on: this host's messages waiting for the repository."""
    if settings.audit.transport == "off":
        return
    from dicomnode.audit.spool import spool_of

    count, oldest = spool_of(settings).waiting()
    yield _gauge(
        "dicomnode_audit_spooled_messages",
        "audit messages of this host waiting in the spool for the audit record repository",
        count,
    )
    yield _gauge(
        "dicomnode_audit_oldest_spooled_age_seconds",
        "how long the oldest of them has waited (0: none waits)",
        0.0 if oldest is None else max(0.0, time.time() - oldest),
    )


def _tls_expiries(settings: Settings) -> Iterator[Metric]:
    """When each certificate of the TLS files expires and each revocation list is due (a
    file that cannot be read is left out, and logged: ``dicomnode health`` says why)."""
    from dicomnode.tls import tls_state

    state = tls_state(settings.tls)
    if state is None:
        return
    if state.problem:
        log.warning("metrics: %s", state.problem)
        return
    yield _labelled(
        "dicomnode_tls_expiry_timestamp_seconds",
        "when a certificate of the TLS files expires (its notAfter), or a revocation list is "
        "due (its nextUpdate), as a Unix time",
        ["setting", "subject"],
        (((e.setting, e.subject), e.ends.timestamp()) for e in state.files),
    )


def _from_database(session: Session) -> Iterator[Metric]:
    yield from _jobs(session)
    yield from _images(session)
    yield from _reports(session)
    yield from _rejections(session)
    yield from _turnaround(session)
    yield from _findings(session)
    yield from _sends(session)


def _jobs(session: Session) -> Iterator[Metric]:
    counts = counts_by_state(session)
    yield _labelled(
        "dicomnode_jobs",
        "jobs by kind (infer, report, send) and state",
        ["kind", "state"],
        (((k, s), counts.get((k, s), 0)) for k in JobKind for s in JobState),
    )
    now = db_now(session)
    yield _labelled(
        "dicomnode_jobs_oldest_due_age_seconds",
        "how long the oldest job that a worker could run now has waited (0: none waits)",
        ["kind"],
        (((kind,), _oldest_due_age(session, kind, now)) for kind in JobKind),
    )
    yield _labelled(
        "dicomnode_jobs_oldest_urgent_due_age_seconds",
        "how long the oldest urgent job (priority high: routing.urgent_callers, C-STORE "
        "Priority HIGH) that a worker could run now has waited (0: none waits)",
        ["kind"],
        (((kind,), _oldest_due_age(session, kind, now, Priority.HIGH)) for kind in JobKind),
    )


def _oldest_due_age(
    session: Session, kind: JobKind, now: datetime, priority: Priority | None = None
) -> float:
    """Seconds the oldest due job of ``kind`` (of ``priority``, when given) has waited."""
    due = select(func.min(Job.run_after)).where(Job.kind == kind, due_since(now, kind))
    if priority is not None:
        due = due.where(Job.priority == priority)
    oldest = session.execute(due).scalar_one()
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


def _images(session: Session) -> Iterator[Metric]:
    rows = session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    yield _labelled(
        "dicomnode_images",
        "images recorded, by state (purged: deleted by retention, the record kept)",
        ["state"],
        (((state,), int(count)) for state, count in rows),
    )
    held, last = session.execute(
        select(
            func.coalesce(func.sum(Instance.size).filter(Instance.state != PURGED), 0),
            func.max(Instance.received_at),
        )
    ).one()
    yield _gauge("dicomnode_stored_bytes", "bytes of received images held", int(held))
    yield _gauge(
        "dicomnode_last_image_received_timestamp_seconds",
        "when the latest image was received (0: never)",
        _epoch(last),
    )


def _reports(session: Session) -> Iterator[Metric]:
    rows = session.execute(
        select(Report.model_name, Report.state, func.count()).group_by(
            Report.model_name, Report.state
        )
    ).all()
    yield _labelled(
        "dicomnode_reports",
        "analysis rounds (one SR each) by model and state",
        ["model", "state"],
        (((model, state), int(count)) for model, state, count in rows),
    )
    finished = session.execute(
        select(Report.model_name, func.max(Report.finished_at)).group_by(Report.model_name)
    ).all()
    yield _labelled(
        "dicomnode_last_report_timestamp_seconds",
        "when the model's latest round was reported (0: never)",
        ["model"],
        (((model,), _epoch(when)) for model, when in finished),
    )


def _rejections(session: Session) -> Iterator[Metric]:
    """What rejection notes (IHE IOCM) withdrew: images, by the note's title; and the node's
    own results, by model (a reader hid an AI result in the PACS: worth watching)."""
    images = dict(
        session.execute(
            select(Rejection.code, func.count()).where(~_is_a_result()).group_by(Rejection.code)
        ).all()
    )
    yield _labelled(
        "dicomnode_rejected_images",
        "images that a rejection note withdrew, by its title (DCM code: 113001 quality, "
        "113037 patient safety, 113038 worklist entry, 113039 retention)",
        ["code"],
        (((code,), int(images.get(code, 0))) for code in sorted({*REJECTION_TITLES, *images})),
    )
    results = dict(
        session.execute(
            select(Report.model_name, func.count())
            .select_from(Output)
            .join(Report, Report.id == Output.report_id)
            .where(Output.sop_instance_uid.in_(select(Rejection.sop_instance_uid)))
            .group_by(Report.model_name)  # by the few rejections, not every result object
        ).all()
    )
    models = session.execute(select(Report.model_name).distinct()).scalars()
    yield _labelled(
        "dicomnode_rejected_results",
        "the node's result objects that a rejection note from the PACS withdrew, by model "
        "(every model that reported, zero too)",
        ["model"],
        (((model,), int(results.get(model, 0))) for model in sorted(set(models))),
    )


def _is_a_result() -> ColumnElement[bool]:
    return exists().where(Output.sop_instance_uid == Rejection.sop_instance_uid)


def _turnaround(session: Session) -> Iterator[Metric]:
    """The time a radiologist waits for the AI (:func:`dicomnode.status.turnaround`)."""
    state = turnaround(session)
    yield _labelled(
        "dicomnode_turnaround_last_hour_seconds",
        "from a round's last image received to its results delivered, over the rounds whose "
        "results arrived in the last hour (quantile 1: the longest)",
        ["quantile"],
        (
            (("0.5",), state.median_seconds),
            (("0.95",), state.p95_seconds),
            (("1",), state.longest_seconds),
        ),
    )
    yield _gauge(
        "dicomnode_turnaround_last_hour_rounds",
        "rounds whose results arrived in the last hour (what the turnaround is of)",
        state.rounds,
    )


def _findings(session: Session) -> Iterator[Metric]:
    """What each model version found in the rounds reported in the last day
    (:mod:`dicomnode.findings`)."""
    found = last_day(session, db_now(session))
    yield _labelled(
        "dicomnode_findings_last_day",
        "findings (one per image, or per knee joint) of the rounds reported in the last 24 h, "
        "by model version and class (every class of the card, zeros too)",
        ["model", "version", "class"],
        (((m.model, m.version, name), count) for m in found for name, count in m.classes),
    )
    yield _labelled(
        "dicomnode_findings_uncertain_last_day",
        "of those findings, the ones whose localisation the SR flags as uncertain",
        ["model", "version"],
        (((m.model, m.version), m.uncertain) for m in found),
    )
    yield _labelled(
        "dicomnode_images_not_assessed_last_day",
        "images of those rounds that their model could not assess (not assessed in the SR)",
        ["model", "version"],
        (((m.model, m.version), m.not_assessed) for m in found),
    )


def _sends(session: Session) -> Iterator[Metric]:
    send = Job.kind == JobKind.SEND
    rows = session.execute(
        select(Job.peer, Job.state, func.count()).where(send).group_by(Job.peer, Job.state)
    ).all()
    yield _labelled(
        "dicomnode_sends",
        "result sends by destination (AE title name) and state (done: delivered)",
        ["peer", "state"],
        (((peer or "-", state), int(count)) for peer, state, count in rows),
    )
    delivered = session.execute(
        select(Job.peer, func.max(Job.finished_at))
        .where(send, Job.state == JobState.DONE)
        .group_by(Job.peer)
    ).all()
    yield _labelled(
        "dicomnode_destination_last_delivery_timestamp_seconds",
        "when the destination last took a result",
        ["peer"],
        (((peer or "-",), _epoch(when)) for peer, when in delivered),
    )
