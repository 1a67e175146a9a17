"""Rejection notes (IHE IOCM): the PACS withdraws images, and the node withdraws what it made
of them.

A technologist who rejects an image (a wrong patient, a wrong side, a retake) makes the PACS
store a Key Object Selection document titled with the reason, listing the rejected instances,
and send it on to the systems that had them. When the node routes such a note
(:func:`read_rejection_note`, from :func:`dicomnode.studies.queue_new_instances`):

- every instance it lists is recorded (table ``rejections``): an inference still waiting for
  it is discarded, and one that arrives after its note is not analysed;
- each model version whose report already named one of them gets a new round of the study,
  closed at once. Its report (:mod:`dicomnode.worker`) leaves the rejected images out (and makes
  no SR when none is left) and rejects, with a note of the same title, the overlays and
  presentation states made from them and the earlier SRs that named them.

A round not reported yet leaves the rejected images out of its report, and its overlays of
them are never sent. The note itself is stored and recorded as skipped, with what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Select, exists, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.db.schema import Instance, Job, Output, Rejection, Report, Result
from dicomnode.db.session import db_now
from dicomnode.queue.jobs import JobKind, JobState
from dicomnode.values import REJECTION_TITLES

log = logging.getLogger(__name__)

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
"""Key Object Selection Document Storage: the SOP class of a rejection note."""

_WAITING = (JobState.QUEUED, JobState.FAILED)


@dataclass(frozen=True)
class RejectionNote:
    """What a received rejection note says."""

    sop_uid: str
    code: str
    """Its title's DCM code value (a key of :data:`REJECTION_TITLES`)."""
    instances: tuple[tuple[str, str], ...]
    """The (Study, SOP) Instance UIDs it rejects, of every study it lists."""

    @property
    def meaning(self) -> str:
        return REJECTION_TITLES[self.code]


def read_rejection_note(instance: Instance) -> RejectionNote | None:
    """The rejection note that ``instance`` is, or None: another kind of object, a Key Object
    Selection with another title (a radiologist's key images, say), or an unreadable one."""
    if instance.sop_class_uid != KEY_OBJECT_SELECTION:
        return None
    try:
        note = pydicom.dcmread(Path(instance.path), stop_before_pixels=True)
        title = note.ConceptNameCodeSequence[0]
        code, scheme = str(title.CodeValue), str(title.CodingSchemeDesignator)
    except (OSError, AttributeError, IndexError, KeyError, ValueError) as exc:
        log.warning(
            "sop=%s: a Key Object Selection without a readable title (%s)",
            instance.sop_instance_uid,
            type(exc).__name__,
        )
        return None
    if scheme != "DCM" or code not in REJECTION_TITLES:
        return None
    return RejectionNote(instance.sop_instance_uid, code, tuple(listed(note)))


def listed(document: pydicom.Dataset) -> Iterable[tuple[str, str]]:
    """The (Study, SOP) Instance UIDs of a rejection note's (or an SR's) Current Requested
    Procedure Evidence Sequence."""
    for study in document.get("CurrentRequestedProcedureEvidenceSequence", []):
        study_uid = str(study.get("StudyInstanceUID", ""))
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                uid = str(item.get("ReferencedSOPInstanceUID", ""))
                if uid:
                    yield study_uid, uid


def record_rejection(session: Session, note: RejectionNote) -> tuple[int, list[Report]]:
    """Record the note's rejection of every instance it lists (once; one that has not come
    yet is not analysed when it does), discard the waiting inference of those the node
    holds, and find the rounds whose reports named them.

    Returns how many of them the node holds and the reported rounds that named one of them
    (the latest of each study and model version)."""
    now = db_now(session)
    held: list[str] = []
    for study_uid, sop_uid in dict.fromkeys(note.instances):
        instance = session.get(Instance, sop_uid)
        if instance is not None:
            held.append(sop_uid)
            study_uid = instance.study_instance_uid
        if session.get(Rejection, sop_uid) is not None:
            continue
        session.add(
            Rejection(
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                code=note.code,
                note_sop_instance_uid=note.sop_uid,
                rejected_at=now,
            )
        )
        if instance is not None:
            _withdraw(session, instance, note, now)
    session.flush()
    return len(held), _reported_rounds(session, held)


def _withdraw(session: Session, instance: Instance, note: RejectionNote, now: datetime) -> None:
    """No inference for a rejected instance: a waiting job is discarded (one running ends
    as it will; the report leaves its result out)."""
    reason = f"rejected ({note.meaning}) by rejection note {note.sop_uid}"
    session.execute(
        update(Job)
        .where(
            Job.kind == JobKind.INFER,
            Job.sop_instance_uid == instance.sop_instance_uid,
            Job.state.in_(_WAITING),
        )
        .values(state=JobState.DISCARDED, finished_at=now, updated_at=now, last_error=reason)
        .execution_options(synchronize_session=False)
    )
    if instance.state in ("received", "queued"):
        instance.state, instance.reason = "skipped", reason
    log.info(
        "rejected sop=%s study=%s: %s",
        instance.sop_instance_uid,
        instance.study_instance_uid,
        note.meaning,
    )


def _reported_rounds(session: Session, sop_uids: list[str]) -> list[Report]:
    """The latest reported round of each study and model version that named one of
    ``sop_uids`` (its result, or its analysis that died: "Not assessed"), or whose report is
    being made now (a round whose report has not started leaves them out by itself)."""
    if not sop_uids:
        return []
    reporting = exists().where(
        Job.report_id == Report.id, Job.kind == JobKind.REPORT, Job.state == JobState.RUNNING
    )
    reported = (Report.state != "open", or_(Report.state != "pending", reporting))
    analysed = select(Result.report_id).where(Result.sop_instance_uid.in_(sop_uids))
    died = select(Job.report_id).where(
        Job.kind == JobKind.INFER,
        Job.state == JobState.DEAD,
        Job.sop_instance_uid.in_(sop_uids),
    )
    rounds = session.execute(
        select(Report).where(or_(Report.id.in_(analysed), Report.id.in_(died)), *reported)
    ).scalars()
    latest: dict[tuple[str, str, str], Report] = {}
    for report in rounds:
        key = (report.study_instance_uid, report.model_name, report.model_version)
        if key not in latest or report.sequence > latest[key].sequence:
            latest[key] = report
    return list(latest.values())


def rejected_codes(session: Session, study_uid: str) -> dict[str, str]:
    """The study's rejected instances: SOP Instance UID -> the title code that rejected it."""
    rows = session.execute(
        select(Rejection.sop_instance_uid, Rejection.code).where(
            Rejection.study_instance_uid == study_uid
        )
    ).all()
    return {str(uid): str(code) for uid, code in rows}


def is_rejected(session: Session, sop_uid: str) -> bool:
    return session.get(Rejection, sop_uid) is not None


def listed_in(path: str) -> list[str]:
    """The SOP Instance UIDs an SR or a Key Object Selection file lists as its evidence
    (none when the file cannot be read)."""
    try:
        document = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, ValueError):
        return []
    return [uid for _, uid in listed(document)]


def withdrawn(session: Session, studies: str | Select[Any]) -> set[str]:
    """The node's result objects of the study (a UID, or a query of study UIDs) that its own
    rejection notes withdrew, and those made from a rejected image (never sent)."""

    def of_studies(column: InstrumentedAttribute[str]) -> ColumnElement[bool]:
        return column == studies if isinstance(studies, str) else column.in_(studies)

    notes = session.execute(
        select(Output.path)
        .join(Report, Report.id == Output.report_id)
        .where(of_studies(Report.study_instance_uid), Output.kind == "KO")
    ).scalars()
    made_from_rejected = session.execute(
        select(Output.sop_instance_uid)
        .join(Rejection, Rejection.sop_instance_uid == Output.source_sop_instance_uid)
        .where(of_studies(Rejection.study_instance_uid))
    ).scalars()
    return {uid for path in notes for uid in listed_in(path)} | set(made_from_rejected)
