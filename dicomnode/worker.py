"""The worker: claims jobs from the queue and runs the pipeline on them.

Three kinds of job, in this order of preference each turn:

``infer``   a batch of instances for one model -> results + Secondary Captures
``report``  a study round whose inference is finished -> TID 1500 SR, send jobs
``send``    result objects for one peer -> C-STORE over one association

Every claimed job is leased; a heartbeat thread extends the lease while the
job runs, so a worker that dies loses its jobs to the next claimer. Outputs,
results and the job's completion commit in one transaction.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

import pydicom
from pynetdicom import evt
from sqlalchemy import delete, exists, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from dicomnode import pipeline
from dicomnode.audit.objects import record_sent
from dicomnode.audit.trail import AuditTrail
from dicomnode.cards import card_for_report
from dicomnode.config import Settings, TlsSettings
from dicomnode.db.schema import Instance, Job, Output, Rejection, Report, Result
from dicomnode.db.session import Database, db_now
from dicomnode.encode.sr import SrImageItem
from dicomnode.errors import (
    ConfigError,
    DicomNodeError,
    EncodeError,
    ModelError,
    PeerError,
    StorageFullError,
)
from dicomnode.inference import Predictor
from dicomnode.logs import redact_quoted
from dicomnode.models.card import ModelCard, identity
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.peers import PeerInfo, destination_host, get_peer, peer_by_ae_title
from dicomnode.queue import jobs as q
from dicomnode.queue.retry import RetryPolicy
from dicomnode.rejections import listed_in
from dicomnode.send.commitment import (
    drop_request,
    queue_commitment,
    record_request,
    references,
    request_commitment,
    take_report,
    uncommitted,
)
from dicomnode.send.scu import Delivery, send_files
from dicomnode.send.stow import stow_files
from dicomnode.store.files import ensure_free_space, output_path, write_durably
from dicomnode.studies import KEPT, round_priority
from dicomnode.tls import client_context, https_context
from dicomnode.uids import transaction_uid
from dicomnode.values import ModelIdentity
from dicomnode.withdraw import after_last_withdrawal, sent_earlier, sent_results

log = logging.getLogger(__name__)

NO_RETRY = RetryPolicy(1, 0.0, 0.0)
"""For failures that waiting does not mend (a destination that is not a peer, a refusal
that repeats itself); `dicomnode retry` re-queues them once the cause is fixed."""

SEND_BATCH = 32
CONTEXTS: dict[str, tuple[Callable[[TlsSettings], ssl.SSLContext], str]] = {
    "tls": (client_context, "TLS peers"),
    "https": (https_context, "https DICOMweb services"),
}
"""The TLS contexts of sends: how each is made from ``tls.*``, and what its sends go to."""
DATABASE_PAUSE = 5.0
"""Seconds a worker waits after a database failure before it looks for work again."""
MAX_BATCH_PIXELS = 10_000_000
"""Source pixels prepared and classified together: a sub-batch closes at the first image
that reaches it (two 3000x3000 images per sub-batch)."""


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand the pages of freed arrays back to the operating system (glibc ``malloc_trim``).

    Each image leaves tens of MB of freed pixels, heatmaps and overlays that
    glibc keeps for reuse; without this the workers' idle heaps add to each
    other's peaks (issue 4 measures the node's PSS during a burst). A no-op
    where the C library has no ``malloc_trim``.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


DISK_FULL_PAUSE = 60.0
"""Seconds a job waits when the data folder is below ``storage.min_free_mb``."""
WRITING_KINDS = (q.JobKind.INFER, q.JobKind.REPORT)
"""The jobs that write result files (sending only reads them)."""


class Worker:
    """One worker (one process in production; tests may run it in a thread)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        registry: ModelRegistry,
        worker_id: str | None = None,
        audit: AuditTrail | None = None,
    ):
        self.settings = settings
        self.db = db
        self.registry = registry
        self.audit = audit or AuditTrail.from_settings(settings)
        self.worker_id = worker_id or q.worker_id_of(os.getpid())
        self.stop = threading.Event()
        self._disk_full_logged = -DISK_FULL_PAUSE
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._predictors: dict[str, Predictor] = {}
        w, s = settings.workers, settings.send
        self.job_policy = RetryPolicy(w.max_attempts, 2.0, 60.0)
        self.send_policy = RetryPolicy(
            s.max_attempts, s.backoff_initial_seconds, s.backoff_max_seconds
        )

    # -- loop ---------------------------------------------------------------
    def run(self) -> None:
        """Step until stopped. A database that cannot be reached (restarting, a connection
        dropped, a deadlock broken) pauses the worker, not ends it: its models stay loaded,
        and a job it held runs again when its lease runs out."""
        log.info("worker %s started", self.worker_id)
        while not self.stop.is_set():
            try:
                ran = self.step()
            except (OperationalError, InterfaceError) as exc:
                first_line = str(exc.orig or exc).strip().splitlines()[0:1]
                log.warning(
                    "worker %s: the database failed (%s: %s); trying again in %g s",
                    self.worker_id,
                    type(exc.orig or exc).__name__,
                    first_line[0] if first_line else "",
                    DATABASE_PAUSE,
                )
                self.stop.wait(DATABASE_PAUSE)
                continue
            if not ran:
                self.stop.wait(self.settings.workers.poll_seconds)
        log.info("worker %s stopped", self.worker_id)

    def step(self) -> bool:
        """Run at most one job batch of each kind; True when anything ran."""
        ran = self._infer_step()
        ran = self._report_step() or ran
        ran = self._send_step() or ran
        return self._commit_step() or ran

    # -- leases -------------------------------------------------------------
    def _claim(self, kind: q.JobKind, limit: int) -> list[q.ClaimedJob]:
        with self.db.session() as session:
            group = q.next_group(session, kind)
            if group is None:
                return []
            return q.claim(
                session, kind, self.worker_id, self.settings.workers.lease_seconds, limit, group
            )

    @contextmanager
    def _leased(self, jobs: Sequence[q.ClaimedJob]) -> Iterator[None]:
        done = threading.Event()
        interval = self.settings.workers.lease_seconds / 3
        ids = [j.id for j in jobs]

        def beat() -> None:
            while not done.wait(interval):
                try:
                    with self.db.session() as session:
                        q.heartbeat(
                            session, ids, self.worker_id, self.settings.workers.lease_seconds
                        )
                except Exception as exc:  # a busy or restarting database: beat again later
                    log.warning("heartbeat of jobs %s failed: %s", ids, type(exc).__name__)

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _fail_all(self, jobs: Sequence[q.ClaimedJob], exc: Exception, policy: RetryPolicy) -> None:
        """Record ``exc`` as the failure of ``jobs`` (retried with ``policy``, then dead); a
        full disk postpones them instead, uncharged."""
        if isinstance(exc, StorageFullError):
            for job in jobs:
                self._postpone(job, str(exc))
            return
        reason = _reason(exc, jobs[0].kind, jobs)
        if isinstance(exc, EncodeError):  # the same inputs encode the same way: not retried
            policy = NO_RETRY
        for job in jobs:
            self._fail(job, reason, policy)

    def _postpone(self, job: q.ClaimedJob, error: str) -> None:
        with self.db.session() as session:
            q.postpone(session, job, self.worker_id, error, DISK_FULL_PAUSE)
        log.warning(
            "job %s (%s) postponed %.0f s, attempt not counted: %s",
            job.id,
            job.kind,
            DISK_FULL_PAUSE,
            error,
        )

    def _disk_has_room(self) -> bool:
        """False (logged at most once a minute) while the data folder is below its floor:
        the jobs that write results wait unclaimed, and nothing is charged to them."""
        try:
            ensure_free_space(self.settings.storage.data_dir, self.settings.storage.min_free_mb)
        except StorageFullError as exc:
            now = time.monotonic()
            if now - self._disk_full_logged >= DISK_FULL_PAUSE:
                self._disk_full_logged = now
                log.error("results wait for disk space: %s", exc)
            return False
        return True

    def _fail(self, job: q.ClaimedJob, error: str, policy: RetryPolicy) -> None:
        """Record a failed attempt; quoted values (which may be header values) are redacted."""
        error = redact_quoted(error)
        with self.db.session() as session:
            state = q.fail(session, job, self.worker_id, error, policy)
        log.warning(
            "job %s (%s) attempt %s failed -> %s: %s", job.id, job.kind, job.attempts, state, error
        )

    def _run(
        self,
        kind: q.JobKind,
        limit: int,
        work: Callable[[list[q.ClaimedJob]], None],
        policy: RetryPolicy,
    ) -> bool:
        """Claim up to ``limit`` jobs of ``kind`` and run ``work`` on them under a lease.

        An error that escapes ``work`` fails every claimed job with the error
        as the reason (:meth:`_fail_all`).
        """
        if kind in WRITING_KINDS and not self._disk_has_room():
            return False
        jobs = self._claim(kind, limit)
        if not jobs:
            return False
        with self._leased(jobs):
            try:
                work(jobs)
            except Exception as exc:
                self._fail_all(jobs, exc, policy)
        return True

    def _write_output(self, dataset: pydicom.Dataset) -> Path:
        """Write a result object durably under the data folder; return its path."""
        path = output_path(
            self.settings.storage.data_dir,
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID),
        )
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        write_durably(path, buffer.getvalue())
        return path

    # -- infer --------------------------------------------------------------
    def _infer_step(self) -> bool:
        return self._run(
            q.JobKind.INFER, self.settings.workers.batch_size, self._infer, self.job_policy
        )

    def predictor(self, group_key: str) -> Predictor:
        """The loaded model for ``name:version`` (loaded once per worker)."""
        if group_key not in self._predictors:
            loaded = self._card_for(group_key)
            self._predictors[group_key] = Predictor.load(
                loaded.directory,
                loaded.card,
                self.settings.workers.device,
                batch_size=self.settings.workers.batch_size,
                heatmap_size=self.settings.results.overlay_max_size,
            )
        return self._predictors[group_key]

    def _card_for(self, group_key: str) -> LoadedCard:
        name, _, version = group_key.partition(":")
        for loaded in self.registry.cards:
            if loaded.card.name == name and loaded.card.version == version:
                return loaded
        raise ModelError(f"model {name} version {version} is no longer installed")

    def _infer(self, jobs: Sequence[q.ClaimedJob]) -> None:
        """Prepare, classify and encode ``jobs`` in sub-batches of at most MAX_BATCH_PIXELS.

        Large radiographs (9 megapixels, and heatmaps at the overlay's size) are held
        only a few at a time, so memory stays flat whatever ``batch_size`` is.
        """
        predictor = self.predictor(jobs[0].group_key)
        with self.db.session() as session:
            paths = {j.id: Path(_instance(session, j).path) for j in jobs}
        pending: list[tuple[q.ClaimedJob, pipeline.Prepared]] = []
        pixels = 0
        for index, job in enumerate(jobs):
            if self.stop.is_set():  # stopping: the rest waits for the next worker, uncharged
                self._give_back([*(j for j, _ in pending), *jobs[index:]])
                return
            prepared = pipeline.read_and_prepare(paths[job.id])
            pending.append((job, prepared))
            pixels += 0 if prepared.image is None else prepared.image.pixels.size
            if pixels >= MAX_BATCH_PIXELS:
                self._analyse_and_finish(predictor, pending)
                pending, pixels = [], 0
        if pending:
            self._analyse_and_finish(predictor, pending)

    def _give_back(self, jobs: Sequence[q.ClaimedJob]) -> None:
        """Return claimed jobs not analysed yet to the queue, their attempts not counted."""
        with self.db.session() as session:
            for job in jobs:
                q.postpone(session, job, self.worker_id, "the worker stopped before it", 0.0)
        log.info("worker %s stopping: jobs %s given back", self.worker_id, [j.id for j in jobs])

    def _analyse_and_finish(
        self, predictor: Predictor, pending: list[tuple[q.ClaimedJob, pipeline.Prepared]]
    ) -> None:
        analysed = pipeline.analyse(predictor, [prepared for _, prepared in pending])
        for (job, _), item in zip(pending, analysed, strict=True):
            try:
                self._finish_infer(job, item)
            except Exception as exc:  # one image's error fails that job, not its batch
                self._fail_all([job], exc, self.job_policy)
        del analysed
        release_freed_memory()

    def _finish_infer(self, job: q.ClaimedJob, item: pipeline.Analysed) -> None:
        if item.prepared.error:
            policy = NO_RETRY if item.prepared.lasting else self.job_policy
            self._fail(job, item.prepared.error, policy)
            return
        outputs: list[tuple[str, pydicom.Dataset, Path]] = []
        if item.result is not None:
            sc = pipeline.make_sc(
                item,
                uid_root=self.settings.node.uid_root,
                max_size=self.settings.results.overlay_max_size,
                jpeg_quality=self.settings.results.overlay_jpeg_quality,
                institution_name=self.settings.node.institution_name,
            )
            outputs.append(("SC", sc, self._write_output(sc)))
            outputs += self._presentation_state(job, item)
        with self.db.session() as session:
            _record_result(session, job, item, outputs)
            q.complete(session, job.id, self.worker_id)
        outcome = "skipped: " + item.prepared.skip_reason if item.result is None else "done"
        log.info("infer job %s sop=%s %s", job.id, job.sop_instance_uid, outcome)

    def _presentation_state(
        self, job: q.ClaimedJob, item: pipeline.Analysed
    ) -> list[tuple[str, pydicom.Dataset, Path]]:
        """The image's presentation state (``results.presentation_state``), written. One that
        cannot be made is logged and left out: the overlay and the SR still go."""
        if not (self.settings.results.presentation_state and pipeline.wants_pr(item)):
            return []
        try:
            pr = pipeline.make_pr(
                item,
                uid_root=self.settings.node.uid_root,
                institution_name=self.settings.node.institution_name,
            )
        except EncodeError as exc:
            log.error(
                "infer job %s sop=%s: no presentation state: %s", job.id, job.sop_instance_uid, exc
            )
            return []
        return [("PR", pr, self._write_output(pr))]

    # -- report -------------------------------------------------------------
    def _report_step(self) -> bool:
        return self._run(q.JobKind.REPORT, 1, lambda jobs: self._report(jobs[0]), self.job_policy)

    def _report(self, job: q.ClaimedJob) -> None:
        """The round's SR (of the study's images that are not rejected; none when every one
        is), after the rejection notes of what the node made from rejected images."""
        assert job.report_id is not None
        with self.db.session() as session:
            report = session.get(Report, job.report_id)
            assert report is not None
            card = card_for_report(session, self.registry, report.model_name, report.model_version)
            if report.withdrawal_code:  # `dicomnode withdraw`: the note, and no SR
                dead, items, predecessor = [], [], None
                withdrawals = _withdrawal_of_everything(session, report)
            else:
                dead = _dead_instances(session, report)
                items = self._sr_items(session, report, card, dead)
                predecessor = _predecessor(session, report)
                withdrawals = _withdrawals(session, report)
        made = [("KO", ko) for ko in self._rejection_notes(report, identity(card), withdrawals)]
        sr = None
        if items:
            sr = pipeline.make_sr(
                items,
                uid_root=self.settings.node.uid_root,
                sequence=report.sequence,
                predecessor=predecessor,
                not_analysed=len(dead),
                institution_name=self.settings.node.institution_name,
            )
            made.append(("SR", sr))
        written = [(kind, dataset, self._write_output(dataset)) for kind, dataset in made]
        with self.db.session() as session:
            for kind, dataset, path in written:
                _record_output(session, dataset, path, report.id, kind, None)
            session.flush()
            queued = self._queue_sends(session, report)
            _set_report_state(session, report.id, KEPT if self._kept_here(report) else "done")
            q.complete(session, job.id, self.worker_id)
        log.info(
            "report %s study=%s round=%s: %s, %d rejection note(s), %d sends queued",
            report.id,
            report.study_instance_uid,
            report.sequence,
            ("no SR (a withdrawal)" if report.withdrawal_code else "no SR (every image rejected)")
            if sr is None
            else f"SR {sr.SOPInstanceUID} "
            + (f"PARTIAL ({len(dead)} image(s) not analysed)" if dead else "COMPLETE"),
            len(written) - (sr is not None),
            queued,
        )

    def _rejection_notes(
        self, report: Report, model: ModelIdentity, withdrawals: Sequence[Withdrawal]
    ) -> list[pydicom.Dataset]:
        """The node's rejection notes of ``report``'s round: one per title."""
        return [
            pipeline.make_ko(
                [pydicom.dcmread(path, stop_before_pixels=True) for path in w.paths],
                w.code,
                model,
                uid_root=self.settings.node.uid_root,
                sequence=report.sequence,
                why=w.why,
                institution_name=self.settings.node.institution_name,
            )
            for w in withdrawals
        ]

    def _sr_items(
        self, session: Session, report: Report, card: ModelCard, dead: Sequence[Instance]
    ) -> list[SrImageItem]:
        """The study's images that the model's rounds up to ``report``'s answered: analysed,
        or skipped as unreadable by it (reported "Not assessed" with the reason), in the
        order received; then ``dead``, those whose analysis died (:func:`_dead_instances`),
        "Not assessed" as :data:`pipeline.ANALYSIS_FAILED` (the report is then PARTIAL)."""
        model, classes = identity(card), card.coded_classes()
        sc, pr = aliased(Output), aliased(Output)
        rows = session.execute(
            select(Result, Instance, sc.path, pr.path)
            .join(Instance, Instance.sop_instance_uid == Result.sop_instance_uid)
            .join(Report, Report.id == Result.report_id)
            .outerjoin(sc, _made_for(sc, "SC"))
            .outerjoin(pr, _made_for(pr, "PR"))
            .where(*_rounds_reported_by(report))
            .order_by(Instance.received_at)
        ).all()
        return [
            SrImageItem(
                source=pydicom.dcmread(instance.path, stop_before_pixels=True),
                sc=_header(sc_path),
                pr=_header(pr_path),
                result=pipeline.result_from_json(
                    model,
                    classes,
                    result.findings,
                    result.reason
                    if result.outcome == "ok"
                    else pipeline.not_analysed_reason(result.reason),
                ),
            )
            for result, instance, sc_path, pr_path in rows
        ] + [
            SrImageItem(
                source=pydicom.dcmread(instance.path, stop_before_pixels=True),
                sc=None,
                result=pipeline.result_from_json(model, classes, [], pipeline.ANALYSIS_FAILED),
            )
            for instance in dead
        ]

    def _destinations(self, session: Session, report: Report) -> list[str]:
        """The model's route (``results.routes``), else ``results.destinations``, else the
        caller when it is a known peer."""
        routed = self.settings.results.routes.get(report.model_name)
        if routed is not None:
            return list(routed)
        configured = list(self.settings.results.destinations)
        if configured:
            return configured
        caller = peer_by_ae_title(session, report.calling_ae)
        return [] if caller is None else [caller.name]

    def _kept_here(self, report: Report) -> bool:
        """The report's model has an empty route: its results are sent nowhere."""
        return self.settings.results.routes.get(report.model_name) == ()

    def _queue_sends(self, session: Session, report: Report) -> int:
        if self._kept_here(report):
            log.info(
                "report %s: results.routes sends %s's results nowhere; they are kept in the "
                "data folder",
                report.id,
                report.model_name,
            )
            return 0
        destinations = self._destinations(session, report)
        if not destinations:
            log.warning(
                "report %s: no destination (results.destinations is empty, caller %r is not a "
                "known peer); results are kept in the data folder",
                report.id,
                report.calling_ae,
            )
            return 0
        outputs = session.execute(
            select(Output)
            .where(Output.report_id == report.id, ~_made_from_rejected(Output))
            .order_by(Output.kind)
        ).scalars()
        priority = round_priority(session, report.id)
        specs = [
            q.JobSpec(
                q.JobKind.SEND,
                f"{o.sop_instance_uid}>{peer}",
                self.settings.send.max_attempts,
                group_key=peer,
                report_id=report.id,
                sop_instance_uid=o.sop_instance_uid,
                peer=peer,
                priority=priority,
            )
            for o in outputs
            for peer in _peers_of(session, o, destinations)
        ]
        return q.enqueue(session, specs)

    # -- send ---------------------------------------------------------------
    def _context(self, kind: Literal["tls", "https"]) -> ssl.SSLContext | None:
        """The context of sends to DICOM TLS peers, or to https DICOMweb services (each made
        once); None, logged, when the node's TLS files are missing or unusable (those sends
        then fail for good, saying why)."""
        if kind not in self._contexts:
            make, what = CONTEXTS[kind]
            try:
                self._contexts[kind] = make(self.settings.tls)
            except ConfigError as exc:
                log.error("sends to %s fail: %s", what, exc)
                return None
        return self._contexts[kind]

    def _send_step(self) -> bool:
        return self._run(q.JobKind.SEND, SEND_BATCH, self._send, self.send_policy)

    def _send(self, jobs: Sequence[q.ClaimedJob]) -> None:
        peer_name = jobs[0].peer or ""
        with self.db.session() as session:
            try:
                peer = get_peer(session, peer_name)
            except PeerError as exc:
                peer = None
                error = str(exc)
            paths = [Path(_output(session, j).path) for j in jobs]
        if peer is None:  # not a passing failure: dead at once, `dicomnode retry` once added
            for job in jobs:
                self._fail(job, error, NO_RETRY)
            return
        deliveries = self._deliver(peer, paths)
        outcomes = {d.path: "" if d.ok else d.reason or "not delivered" for d in deliveries}
        record_sent(self.audit, peer.ae_title, destination_host(peer), outcomes)
        for job, delivery in zip(jobs, deliveries, strict=True):
            if not delivery.ok:
                self._fail(job, delivery.reason, self.send_policy if delivery.retry else NO_RETRY)
                with self.db.session() as session:  # the last pending send may have died
                    self._ask_commitment(session, peer, job)
                continue
            with self.db.session() as session:
                recorded = q.complete(session, job.id, self.worker_id)
                hurried = q.hurry_sends(session, peer.name)
                self._ask_commitment(session, peer, job)  # in turn: no purge in between
            if hurried:
                log.info(
                    "%s takes deliveries again: %d waiting send(s) are due now", peer.name, hurried
                )
            log.info(
                "sent sop=%s to %s (job %s)%s",
                job.sop_instance_uid,
                peer.name,
                job.id,
                "" if recorded else ", but its lease was lost meanwhile: it may be sent again",
            )

    def _deliver(self, peer: PeerInfo, paths: list[Path]) -> list[Delivery]:
        """C-STORE ``paths`` to ``peer`` over one association, or STOW-RS them to its
        DICOMweb service (:func:`stow_files`: requests of at most 64 MiB)."""
        send = self.settings.send
        timeout = max(send.timeout_seconds, send.response_timeout_seconds)
        if peer.dicomweb:
            https = peer.dicomweb.startswith("https:")
            context = self._context("https") if https else None
            if https and context is None:
                reason = "the node's TLS files cannot be used for https (see the log)"
                return [Delivery(p, False, None, reason, retry=False) for p in paths]
            return stow_files(peer, paths, timeout=timeout, context=context)
        return send_files(
            peer,
            paths,
            calling_ae=self.settings.node.ae_title,
            timeout=send.timeout_seconds,
            response_timeout=send.response_timeout_seconds,
            tls=self._context("tls") if peer.tls else None,
        )

    def _ask_commitment(self, session: Session, peer: PeerInfo, job: q.ClaimedJob) -> None:
        """Queue the round's commit job to a peer marked ``commitment`` once none of its sends
        is pending (also when the last one died: what was delivered is committed)."""
        if peer.commitment and job.report_id is not None:
            queue_commitment(session, job.report_id, peer.name, self.settings.send.max_attempts)

    # -- storage commitment -------------------------------------------------
    def _commit_step(self) -> bool:
        return self._run(q.JobKind.COMMIT, 1, self._commit, self.send_policy)

    def _commit(self, jobs: Sequence[q.ClaimedJob]) -> None:
        """Ask the peer to commit to the round's delivered objects (:mod:`..send.commitment`)."""
        (job,) = jobs
        if job.attempts > job.max_attempts:  # every request went unanswered
            self._fail(
                job,
                f"no storage commitment report from {job.peer} after {job.max_attempts} requests",
                NO_RETRY,
            )
            return
        with self.db.session() as session:
            peer = get_peer(session, job.peer or "")
            objects = uncommitted(session, job.report_id or 0, peer.name)
        if not objects:  # committed meanwhile (a late report), or nothing delivered
            with self.db.session() as session:
                q.complete(session, job.id, self.worker_id)
            return
        refs = references(objects)
        transaction = transaction_uid(self.settings.node.uid_root)
        with self.db.session() as session:
            record_request(session, transaction, job.id)
        asked = request_commitment(
            peer,
            transaction,
            refs,
            calling_ae=self.settings.node.ae_title,
            timeout=self.settings.send.timeout_seconds,
            tls=self._context("tls") if peer.tls else None,
            on_report=self._on_report,
        )
        if not asked.ok:
            with self.db.session() as session:  # no report can come for it
                drop_request(session, transaction)
            self._fail(job, asked.reason, self.send_policy if asked.retry else NO_RETRY)
            return
        with self.db.session() as session:
            session.get(Job, job.id, with_for_update=True)  # in turn with the report's record
            if not uncommitted(session, job.report_id or 0, peer.name):  # it came already
                q.complete(session, job.id, self.worker_id)
            else:
                q.await_answer(
                    session,
                    job,
                    self.worker_id,
                    f"waiting for {peer.name}'s storage commitment report (transaction "
                    f"{transaction}, {len(refs)} object(s))",
                    self.settings.send.commitment_timeout_seconds,
                )
        log.info(
            "asked %s to commit %d object(s) of report %s (job %s, transaction %s)",
            peer.name,
            len(refs),
            job.report_id,
            job.id,
            transaction,
        )

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        """A storage commitment report sent back on the request's own association."""
        return take_report(self.db, event)


def _instance(session: Session, job: q.ClaimedJob) -> Instance:
    row = session.get(Instance, job.sop_instance_uid)
    if row is None:
        raise DicomNodeError(f"job {job.id}: instance {job.sop_instance_uid} is not recorded")
    return row


def _output(session: Session, job: q.ClaimedJob) -> Output:
    row = session.get(Output, job.sop_instance_uid)
    if row is None:
        raise DicomNodeError(f"job {job.id}: output {job.sop_instance_uid} is not recorded")
    return row


def _made_for(output: type[Output], kind: str) -> ColumnElement[bool]:
    """``output`` is the ``kind`` object (SC, PR) made for a result's image in its round."""
    return (
        (output.source_sop_instance_uid == Result.sop_instance_uid)
        & (output.kind == kind)
        & (output.report_id == Result.report_id)
    )


def _header(path: str | None) -> pydicom.Dataset | None:
    """A result object's header (None where none was made)."""
    return None if path is None else pydicom.dcmread(path, stop_before_pixels=True)


def _record_result(
    session: Session,
    job: q.ClaimedJob,
    item: pipeline.Analysed,
    outputs: Sequence[tuple[str, pydicom.Dataset, Path]],
) -> None:
    assert job.report_id is not None and job.sop_instance_uid is not None
    report = session.get(Report, job.report_id)
    assert report is not None
    session.execute(
        delete(Result).where(  # a re-run after a lost lease replaces the earlier answer
            (Result.sop_instance_uid == job.sop_instance_uid)
            & (Result.model_name == report.model_name)
            & (Result.model_version == report.model_version)
        )
    )
    result = item.result
    session.add(
        Result(
            sop_instance_uid=job.sop_instance_uid,
            report_id=report.id,
            model_name=report.model_name,
            model_version=report.model_version,
            outcome="ok" if result else "skipped",
            reason=result.not_assessed if result else item.prepared.skip_reason,
            findings=pipeline.findings_to_json(result) if result else [],
            created_at=db_now(session),
        )
    )
    instance = session.get(Instance, job.sop_instance_uid)
    if instance is not None:
        instance.state = "done" if result else "skipped"
        instance.reason = item.prepared.skip_reason
    for kind, dataset, path in outputs:
        _record_output(session, dataset, path, report.id, kind, job.sop_instance_uid)


def _record_output(
    session: Session,
    dataset: pydicom.Dataset,
    path: Path,
    report_id: int,
    kind: str,
    source: str | None,
) -> None:
    """Record a written result object (again, after a re-run: same UIDs, same row)."""
    session.merge(
        Output(
            sop_instance_uid=str(dataset.SOPInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            report_id=report_id,
            kind=kind,
            source_sop_instance_uid=source,
            path=str(path),
            created_at=db_now(session),
        )
    )


def _peers_of(session: Session, output: Output, destinations: Sequence[str]) -> list[str]:
    """Where ``output`` goes: the round's destinations; a rejection note also to every peer
    that was sent one of the objects it lists (a ``dicomnode resend`` to another archive),
    which holds them too."""
    if output.kind != "KO":
        return list(destinations)
    sent_to = session.execute(
        select(Job.peer)
        .where(
            Job.kind == q.JobKind.SEND,
            Job.sop_instance_uid.in_(listed_in(output.path)),
            Job.peer.is_not(None),
        )
        .distinct()
    ).scalars()
    return list(dict.fromkeys([*destinations, *(p for p in sent_to if p)]))


def _predecessor(session: Session, report: Report) -> pydicom.Dataset | None:
    """The SR of the round before ``report``'s, of the same model version.

    An SR of another version is not replaced: the new version's document lists only
    its own results, so calling it the successor would make the old findings look
    withdrawn. Nor is one before a withdrawal (``dicomnode withdraw``): it was withdrawn.
    """
    row = session.execute(
        select(Output.path)
        .join(Report, Report.id == Output.report_id)
        .where(
            Report.study_instance_uid == report.study_instance_uid,
            Report.model_name == report.model_name,
            Report.model_version == report.model_version,
            Report.sequence < report.sequence,
            after_last_withdrawal(report),
            Output.kind == "SR",
        )
        .order_by(Report.sequence.desc())
        .limit(1)
    ).scalar_one_or_none()
    return None if row is None else pydicom.dcmread(row, stop_before_pixels=True)


def _dead_instances(session: Session, report: Report) -> list[Instance]:
    """The images of the study's rounds up to ``report``'s (same model version) whose
    inference job is dead, in the order received."""
    return list(
        session.execute(
            select(Instance)
            .join(Job, Job.sop_instance_uid == Instance.sop_instance_uid)
            .join(Report, Report.id == Job.report_id)
            .where(
                Job.kind == q.JobKind.INFER,
                Job.state == q.JobState.DEAD,
                *_rounds_reported_by(report),
            )
            .order_by(Instance.received_at)
        ).scalars()
    )


def _rounds_reported_by(report: Report) -> tuple[ColumnElement[bool], ...]:
    """The rounds whose images ``report`` reports: its study's rounds of the same model
    version up to its own, since the last withdrawal, their images not rejected."""
    return (
        Report.study_instance_uid == report.study_instance_uid,
        Report.model_name == report.model_name,
        Report.model_version == report.model_version,
        Report.sequence <= report.sequence,
        after_last_withdrawal(report),
        _not_rejected(),
    )


def _not_rejected() -> ColumnElement[bool]:
    """The row's :class:`Instance` is not rejected by a rejection note."""
    return ~exists().where(Rejection.sop_instance_uid == Instance.sop_instance_uid)


def _made_from_rejected(output: type[Output]) -> ColumnElement[bool]:
    """``output`` was made from an image that a rejection note rejected (its overlay or
    presentation state)."""
    return exists().where(Rejection.sop_instance_uid == output.source_sop_instance_uid)


@dataclass(frozen=True)
class Withdrawal:
    """Result objects that the node rejects in turn, under one title."""

    code: str
    paths: tuple[str, ...]
    """The files of the result objects."""
    note_uids: tuple[str, ...] = ()
    """The rejection notes received that rejected their images."""
    note: str = ""
    """An administrator's words, for a withdrawal (``dicomnode withdraw``)."""

    @property
    def why(self) -> str:
        """Why they are withdrawn, for the note's Key Object Description."""
        if self.note_uids:
            return "the images they were made from were rejected by rejection note " + ", ".join(
                self.note_uids
            )
        return "at the site's request" + (f": {self.note}" if self.note else "")


def _withdrawal_of_everything(session: Session, report: Report) -> list[Withdrawal]:
    """A withdrawal round's note: every result object of the earlier rounds of its study and
    model version that was sent and not withdrawn yet (:func:`dicomnode.withdraw.sent_results`),
    under the title the administrator chose."""
    paths = tuple(o.path for o in sent_results(session, report))
    if not paths:
        return []
    return [Withdrawal(report.withdrawal_code, paths, note=report.withdrawal_note)]


def _withdrawals(session: Session, report: Report) -> list[Withdrawal]:
    """What earlier rounds of ``report``'s study (same model) made from images now rejected,
    sent (or began to send), and did not reject yet: their overlays and presentation states,
    and their SRs that name a rejected image; grouped by the title of the note that rejected
    the image. (An overlay of an image rejected before its round's report was never sent, nor
    were a shadow-mode round's results: no peer has them to hide.)"""
    rejected = {
        str(uid): (str(code), str(note))
        for uid, code, note in session.execute(
            select(
                Rejection.sop_instance_uid, Rejection.code, Rejection.note_sop_instance_uid
            ).where(Rejection.study_instance_uid == report.study_instance_uid)
        )
    }
    if not rejected:
        return []
    earlier = sent_earlier(session, report, same_version=False)
    done = {uid for o in earlier if o.kind == "KO" for uid in listed_in(o.path)}
    groups: dict[str, tuple[list[str], dict[str, None]]] = {}
    for output in earlier:
        if output.kind == "KO" or output.sop_instance_uid in done:
            continue
        sources = (
            listed_in(output.path) if output.kind == "SR" else [output.source_sop_instance_uid]
        )
        why = next((rejected[s] for s in sources if s in rejected), None)
        if why is not None:
            paths, notes = groups.setdefault(why[0], ([], {}))
            paths.append(output.path)
            notes[why[1]] = None
    return [Withdrawal(code, tuple(p), tuple(n)) for code, (p, n) in groups.items()]


def _set_report_state(session: Session, report_id: int, state: str) -> None:
    report = session.get(Report, report_id)
    if report is not None:
        report.state, report.finished_at = state, db_now(session)


def _reason(exc: Exception, kind: q.JobKind, jobs: Sequence[q.ClaimedJob]) -> str:
    """The failure reason a job records; an unexpected error is logged with its traceback."""
    if isinstance(exc, DicomNodeError):
        return str(exc)
    log.exception("%s jobs %s failed", kind, [j.id for j in jobs])
    return f"{type(exc).__name__}: {exc}"
