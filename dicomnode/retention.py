"""Retention: the pixel data of finished studies go after ``storage.retention_days``.

The node is not an archive: the PACS keeps the radiographs, and the node's own
copies would otherwise fill its disk (a 3,000-pixel DX is 14 MB; at 500 a day,
7 GB a day) until every C-STORE is refused with 0xA700. A study is *finished*
when

* its newest instance arrived more than ``retention_days`` ago,
* every instance is analysed or skipped (none waits to be routed or analysed),
* every round is reported (none is open or pending), and
* none of its jobs is pending or dead (a dead job waits for ``dicomnode retry``, or
  ``dicomnode discard``),
  and every result object of it was delivered to at least one destination
  (results kept because no destination is configured are kept for good).

Purging rewrites each of its instance files and Secondary Captures as the same
dataset without Pixel Data (a few kB; durably, as everything the node writes)
and marks the instances ``purged``; a received object that is not an image (a PDF, an
SR of another system, a waveform: stored and skipped) loses its content the same way
(:data:`PAYLOAD_TAGS`). The headers stay because a follow-up image
of the study makes a new SR that references every earlier image and overlay;
the SRs themselves are small and stay whole. Records stay too, so a re-sent
instance is still acknowledged as already stored.

A study can also be *forgotten* (:func:`forget_study`, ``dicomnode forget``): its files,
results and records deleted outright, for a patient's erasure request or a study routed
to the node by mistake. With ``storage.records_days`` set (off by default: a hospital
chooses how long the node's history of a study is kept), a purged study whose newest image
arrived longer ago than that is forgotten too (:func:`forget_expired`), with the records of
associations that delivered nothing still held, so the tables stop growing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import ColumnElement

from dicomnode.audit.objects import record_deleted
from dicomnode.audit.trail import AuditTrail
from dicomnode.config import StorageSettings
from dicomnode.db.schema import Association, Instance, Job, Output, Rejection, Report, Result
from dicomnode.db.session import Database
from dicomnode.errors import DicomNodeError, StorageError
from dicomnode.queue.jobs import PENDING, JobKind, JobState
from dicomnode.store.files import write_durably
from dicomnode.store.instances import PURGED
from dicomnode.studies import KEPT, OPEN, lock_study

log = logging.getLogger(__name__)


FINISHED = ("done", "skipped")
"""Instance states after which nothing more is done with the pixel data."""

_AT_REST = (*FINISHED, PURGED)
"""Instance states of a study that no image is arriving for."""


@dataclass(frozen=True)
class PurgeSummary:
    """What a purge did (or, dry, would do)."""

    studies: tuple[str, ...]
    files: int
    bytes_freed: int
    dry_run: bool


def expired_studies(session: Session, older_than: datetime) -> list[str]:
    """Studies whose images are all finished and whose newest arrived before ``older_than``.

    The candidates: :func:`purge_study` checks the rest (rounds, jobs,
    deliveries) in the transaction that purges.
    """
    unfinished = aliased(Instance)
    statement = (
        select(Instance.study_instance_uid)
        .where(Instance.state.in_(FINISHED))
        .where(
            ~exists().where(
                unfinished.study_instance_uid == Instance.study_instance_uid,
                unfinished.state.not_in(_AT_REST),
            )
        )
        .group_by(Instance.study_instance_uid)
        .having(func.max(Instance.received_at) < older_than)
    )
    return list(session.execute(statement).scalars())


def _arriving(session: Session, study_uid: str) -> bool:
    """True when an image of the study waits to be routed or analysed."""
    return bool(
        session.execute(
            select(
                exists().where(
                    Instance.study_instance_uid == study_uid,
                    Instance.state.not_in(_AT_REST),
                )
            )
        ).scalar_one()
    )


def _settled(session: Session, study_uid: str) -> bool:
    """No round of the study is open or pending, no job waits or is dead, every output was sent
    (or its sending discarded: `dicomnode discard`)."""
    reports = select(Report.id).where(Report.study_instance_uid == study_uid)
    if session.execute(
        select(exists().where(Report.id.in_(reports), Report.state.in_((OPEN, "pending"))))
    ).scalar_one():
        return False
    waiting = (*PENDING, JobState.DEAD)
    if session.execute(
        select(exists().where(Job.report_id.in_(reports), Job.state.in_(waiting)))
    ).scalar_one():
        return False
    sent = aliased(Job)
    to_deliver = reports.where(Report.state != KEPT)  # a shadow-mode round's stay here
    undelivered = exists().where(
        Output.report_id.in_(to_deliver),
        ~exists().where(
            and_(
                sent.kind == JobKind.SEND,
                sent.sop_instance_uid == Output.sop_instance_uid,
                sent.state.in_((JobState.DONE, JobState.DISCARDED)),
            )
        ),
    )
    return not session.execute(select(undelivered)).scalar_one()


def purge_study(
    session: Session, study_uid: str, *, dry_run: bool = False
) -> tuple[int, int] | None:
    """Strip the pixel data of one finished study's instances and SCs; (files, bytes freed).

    ``None`` when the study is not finished (see module notes), checked in this
    transaction: an image that arrived since the study was listed leaves it as
    it is, and so does an overlay not yet delivered.
    """
    if _arriving(session, study_uid) or not _settled(session, study_uid):
        return None
    instances = list(
        session.execute(
            select(Instance).where(
                Instance.study_instance_uid == study_uid, Instance.state.in_(FINISHED)
            )
        ).scalars()
    )
    overlays = session.execute(  # all delivered: _settled checked it above
        select(Output.path)
        .join(Report, Report.id == Output.report_id)
        .where(Report.study_instance_uid == study_uid, Output.kind == "SC")
    ).scalars()
    files = freed = 0
    for path in [*(Path(i.path) for i in instances), *(Path(p) for p in overlays)]:
        saved = _strip_pixels(path, dry_run)
        files, freed = files + (saved > 0), freed + saved
    if not dry_run:
        for instance in instances:
            instance.state = PURGED
    return files, freed


PAYLOAD_TAGS = frozenset(
    {
        0x00420011,  # Encapsulated Document (a PDF or CDA: a referral letter, a prior report)
        0x00880200,  # Icon Image Sequence (a thumbnail of the image)
        0x0040A730,  # Content Sequence (a Structured Report's content)
        0x54000100,  # Waveform Sequence (an ECG)
        0x56000020,  # Spectroscopy Data
        0x7FE00008,  # Float Pixel Data
        0x7FE00009,  # Double Float Pixel Data
    }
)
"""What a purge deletes besides Pixel Data: the content of objects that are not images.
The node stores every storage SOP class a PACS routes to it (and skips those it does not
analyse); their headers are kept like the images', their content is not."""


def _payload(tag: BaseTag) -> bool:
    group = tag.group & 0xFF00
    return (
        tag in PAYLOAD_TAGS
        or (group == 0x6000 and tag.element == 0x3000)  # Overlay Data
        or group == 0x5000  # curves and audio (retired)
    )


def _strip_pixels(path: Path, dry_run: bool) -> int:
    """Rewrite ``path`` without its Pixel Data and other content (:data:`PAYLOAD_TAGS`); the
    bytes saved (0 when already without)."""
    try:
        size = path.stat().st_size
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        log.warning(
            "purge: %s is missing (removed by hand, or storage.data_dir is not the folder, "
            "shared by every host, where it was written)",
            path.name,
        )
        return 0
    except (OSError, InvalidDicomError) as exc:
        raise StorageError(f"cannot read {path.name} to purge it: {exc}") from exc
    for tag in [element.tag for element in dataset if _payload(element.tag)]:
        del dataset[tag]
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    header = buffer.getvalue()
    if len(header) >= size:
        return 0
    if not dry_run:
        write_durably(path, header)
    return size - len(header)


def purge_expired(
    db: Database,
    retention_days: float,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    audit: AuditTrail | None = None,
) -> PurgeSummary:
    """Purge every finished study older than ``retention_days`` (0: keep everything)."""
    if retention_days <= 0:
        return PurgeSummary((), 0, 0, dry_run)
    older_than = (now or db.now()) - timedelta(days=retention_days)
    with db.session() as session:
        studies = expired_studies(session, older_than)
    files = freed = 0
    purged: list[str] = []
    for study_uid in studies:
        try:
            with db.session() as session:
                outcome = purge_study(session, study_uid, dry_run=dry_run)
        except StorageError as exc:  # one unreadable file must not stop the others
            log.error("cannot purge study=%s: %s", study_uid, exc)
            continue
        if outcome is None:
            continue
        count, saved = outcome
        purged.append(study_uid)
        if audit is not None and audit.on and not dry_run:
            _audit_purged(db, audit, study_uid)
        files, freed = files + count, freed + saved
        log.info(
            "%s study=%s: %d file(s), %.1f MB",
            "would purge" if dry_run else "purged",
            study_uid,
            count,
            saved / 1e6,
        )
    return PurgeSummary(tuple(purged), files, freed, dry_run)


def _audit_purged(db: Database, audit: AuditTrail, study_uid: str) -> None:
    """DICOM Study Deleted for a purged study (its headers say whose it is)."""
    with db.reading() as session:
        paths = session.execute(
            select(Instance.path).where(
                Instance.study_instance_uid == study_uid, Instance.state == PURGED
            )
        ).scalars()
        files = [Path(path) for path in paths]
    record_deleted(audit, files, by_operator=False, reason=PURGE_REASON)


PURGE_REASON = "pixel data deleted after storage.retention_days (headers kept)"
FORGET_REASON = "study forgotten: its files and records deleted"


def apply_retention(db: Database, storage: StorageSettings, audit: AuditTrail) -> None:
    """What the node does hourly: purge the pixel data of expired studies
    (``storage.retention_days``), then forget the purged studies whose records expired
    (``storage.records_days``); each part off at 0."""
    if storage.retention_days > 0:
        purge_expired(db, storage.retention_days, audit=audit)
    if storage.records_days > 0:
        forget_expired(db, storage.records_days, storage.data_dir, audit=audit)


class StudyBusyError(DicomNodeError):
    """The study has jobs queued or running: forget it once they are done, or stop the node."""


@dataclass(frozen=True)
class ForgottenStudy:
    """What :func:`forget_study` deleted (or, dry, would delete)."""

    study_uid: str
    instances: int
    outputs: int
    files: tuple[Path, ...]
    """The study's files: deleted after the records were (see :func:`remove_files`)."""
    dry_run: bool


def forget_study(
    session: Session, study_uid: str, *, dry_run: bool = False, purged_only: bool = False
) -> ForgottenStudy:
    """Delete the records of one study: its instances, rounds, results, outputs and jobs.

    Refused (:class:`StudyBusyError`) while a job of it is queued, running or waiting to be
    retried: a worker would write results for a study that is gone. Dead and finished jobs
    go with it. The files are returned, to be removed once this transaction is committed
    (a failed commit then leaves every file its records name). ``purged_only``: instances
    in another state than purged stay (one received while the study is forgotten, which
    opens a round of its own)."""
    reports = select(Report.id).where(Report.study_instance_uid == study_uid)
    busy = session.execute(
        select(func.count()).where(Job.report_id.in_(reports), Job.state.in_(PENDING))
    ).scalar_one()
    if busy:
        raise StudyBusyError(
            f"study {study_uid} has {busy} job(s) queued, running or waiting to be retried: "
            "forget it once they are done (`dicomnode status`), or with the node stopped"
        )
    of_study: ColumnElement[bool] = Instance.study_instance_uid == study_uid
    if purged_only:
        of_study = and_(of_study, Instance.state == PURGED)
    images = select(Instance.sop_instance_uid).where(of_study)
    paths = [Path(p) for p in session.execute(select(Instance.path).where(of_study)).scalars()]
    outputs = [
        Path(p)
        for p in session.execute(select(Output.path).where(Output.report_id.in_(reports))).scalars()
    ]
    forgotten = ForgottenStudy(study_uid, len(paths), len(outputs), (*paths, *outputs), dry_run)
    if dry_run:
        return forgotten
    session.execute(delete(Job).where(Job.report_id.in_(reports)))
    session.execute(
        delete(Result).where(
            or_(Result.report_id.in_(reports), Result.sop_instance_uid.in_(images))
        )
    )
    session.execute(delete(Output).where(Output.report_id.in_(reports)))
    rejections = Rejection.study_instance_uid == study_uid
    if purged_only:
        rejections = and_(rejections, Rejection.sop_instance_uid.in_(images))
    session.execute(delete(Rejection).where(rejections))
    if purged_only:  # an instance that stays leaves its (deleted) round
        session.execute(
            update(Instance)
            .where(Instance.study_instance_uid == study_uid, Instance.state != PURGED)
            .values(report_id=None)
        )
    session.execute(delete(Instance).where(of_study))
    session.execute(delete(Report).where(Report.study_instance_uid == study_uid))
    return forgotten


@dataclass(frozen=True)
class ForgetSummary:
    """What :func:`forget_expired` did (or, dry, would do)."""

    studies: tuple[str, ...]
    files: int
    associations: int
    """Records of associations that no remaining image came over."""
    left: tuple[Path, ...]
    """Files that could not be deleted (they hold patient data: remove them by hand)."""
    dry_run: bool


def _records_expired(older_than: datetime) -> ColumnElement[bool]:
    """Every instance of the study is purged, and the newest arrived before ``older_than``
    (for a HAVING over the study's instances)."""
    return and_(
        func.max(Instance.received_at) < older_than,
        func.count().filter(Instance.state != PURGED) == 0,
    )


def expired_records(
    session: Session, older_than: datetime, study_uid: str | None = None
) -> list[str]:
    """Purged studies (of them, ``study_uid`` when given) whose newest image arrived before
    ``older_than``."""
    statement = select(Instance.study_instance_uid)
    if study_uid is not None:
        statement = statement.where(Instance.study_instance_uid == study_uid)
    statement = statement.group_by(Instance.study_instance_uid).having(_records_expired(older_than))
    return list(session.execute(statement).scalars())


def _forget_if_expired(
    session: Session, study_uid: str, older_than: datetime, dry_run: bool
) -> ForgottenStudy | None:
    """Forget one study whose records expired, checked again in this transaction (taking
    turns with the study's scheduling): ``None`` when an image arrived since, or a round or
    send of it is not finished."""
    lock_study(session, study_uid)
    if not expired_records(session, older_than, study_uid) or not _settled(session, study_uid):
        return None
    try:
        return forget_study(session, study_uid, dry_run=dry_run, purged_only=True)
    except StudyBusyError:  # a dead job retried since
        return None


def forget_expired(
    db: Database,
    records_days: float,
    data_dir: Path,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    audit: AuditTrail | None = None,
) -> ForgetSummary:
    """Forget every purged study whose newest image arrived more than ``records_days`` ago
    (0: keep every record), and the associations that no remaining image came over."""
    if records_days <= 0:
        return ForgetSummary((), 0, 0, (), dry_run)
    older_than = (now or db.now()) - timedelta(days=records_days)
    with db.reading() as session:
        candidates = expired_records(session, older_than)
    forgotten: list[str] = []
    files = 0
    left: list[Path] = []
    for study_uid in candidates:
        with db.session() as session:
            outcome = _forget_if_expired(session, study_uid, older_than, dry_run)
        if outcome is None:
            continue
        forgotten.append(study_uid)
        files += len(outcome.files)
        if not dry_run:
            if audit is not None:
                record_deleted(audit, outcome.files, by_operator=False, reason=FORGET_REASON)
            left += remove_files(data_dir, outcome.files)
        log.info(
            "%s the records of study=%s: %d instance(s), %d result object(s)",
            "would forget" if dry_run else "forgot",
            study_uid,
            outcome.instances,
            outcome.outputs,
        )
    with db.session() as session:
        associations = _forget_associations(session, older_than, dry_run)
    for path in left:
        log.error("cannot delete %s: remove it by hand", path.name)
    return ForgetSummary(tuple(forgotten), files, associations, tuple(left), dry_run)


def _forget_associations(session: Session, older_than: datetime, dry_run: bool) -> int:
    """Delete (or count) the associations ended before ``older_than`` that no instance
    record names (their images forgotten, or none stored: a C-ECHO, a rejected copy)."""
    unused = and_(
        Association.released_at < older_than,
        ~exists().where(Instance.association_id == Association.id),
    )
    if dry_run:
        return int(session.execute(select(func.count()).where(unused)).scalar_one())
    result = session.execute(delete(Association).where(unused))
    return int(getattr(result, "rowcount", 0) or 0)


def remove_files(data_dir: Path, files: tuple[Path, ...]) -> list[Path]:
    """Delete ``files`` and the folders they leave empty under ``data_dir``; the files that
    could not be deleted (to be removed by hand: they hold patient data)."""
    left: list[Path] = []
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            left.append(path)
            continue
        _remove_empty_folders(path.parent, data_dir)
    return left


def _remove_empty_folders(folder: Path, data_dir: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to the data folder's
    ``instances/`` and ``outputs/`` (which stay)."""
    root = data_dir.resolve()
    stop = {root, root / "instances", root / "outputs"}
    folder = folder.resolve()
    while folder not in stop and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (another series), or gone
            return
        folder = folder.parent
