"""What an audit message says about stored files: their studies, patients and SOP classes,
read from the files' headers (the database holds no patient data)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicomnode.audit.events import (
    instances_received,
    instances_sent,
    results_withdrawn,
    study_deleted,
    transfer_ordered,
)
from dicomnode.audit.messages import AuditEvent, StudyObject, count_by_class
from dicomnode.audit.trail import AuditTrail

log = logging.getLogger(__name__)

TAGS = ["PatientID", "StudyInstanceUID", "SOPClassUID"]


@dataclass(frozen=True)
class StudyFiles:
    """One study of a set of files: its patient, and its instances by SOP class."""

    study: StudyObject
    patient_id: str
    paths: tuple[Path, ...]


def studies_in(paths: Iterable[Path]) -> list[StudyFiles]:
    """The studies of ``paths``, read from their headers (a file that cannot be read is left
    out, and logged by name: a message about the rest is better than none)."""
    patients: dict[str, str] = {}
    classes: dict[str, list[str]] = {}
    files: dict[str, list[Path]] = {}
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
            study_uid = str(header.StudyInstanceUID)
            sop_class = str(header.SOPClassUID)
        except Exception as exc:  # pydicom raises many types for broken data
            log.warning("audit: %s cannot be read (%s)", path.name, type(exc).__name__)
            continue
        patients.setdefault(study_uid, str(header.get("PatientID", "") or ""))
        classes.setdefault(study_uid, []).append(sop_class)
        files.setdefault(study_uid, []).append(path)
    return [
        StudyFiles(StudyObject(uid, count_by_class(sop_classes)), patients[uid], tuple(files[uid]))
        for uid, sop_classes in classes.items()
    ]


def record_each(
    audit: AuditTrail, paths: Iterable[Path], event_of: Callable[[StudyFiles], AuditEvent]
) -> None:
    """Record ``event_of`` each study of ``paths`` (their headers read only when the trail
    is on)."""
    if audit.on:
        for found in studies_in(paths):
            audit.record(event_of(found))


def record_deleted(
    audit: AuditTrail, paths: Iterable[Path], *, by_operator: bool, reason: str
) -> None:
    """DICOM Study Deleted for each study of ``paths`` (read before they are deleted)."""
    record_each(
        audit,
        paths,
        lambda found: study_deleted(
            audit.ae_title,
            study=found.study,
            patient_id=found.patient_id,
            by_operator=by_operator,
            reason=reason,
        ),
    )


def record_ordered(audit: AuditTrail, peer_ae: str, peer_host: str, paths: Iterable[Path]) -> None:
    """Begin Transferring DICOM Instances for each study of ``paths`` an operator had sent."""
    record_each(
        audit,
        paths,
        lambda found: transfer_ordered(
            audit.ae_title,
            peer_ae=peer_ae,
            peer_host=peer_host,
            study=found.study,
            patient_id=found.patient_id,
        ),
    )


def record_withdrawn(audit: AuditTrail, paths: Iterable[Path], description: str) -> None:
    """DICOM Instances Accessed (delete) for each study of the result objects ``paths`` an
    operator withdrew."""
    record_each(
        audit,
        paths,
        lambda found: results_withdrawn(
            audit.ae_title,
            study=found.study,
            patient_id=found.patient_id,
            description=description,
        ),
    )


class ReceivedStudies:
    """The studies stored over each open association, recorded when it ends: one DICOM
    Instances Transferred message per study (an aborted association's as a minor failure:
    the sender may not have sent all it meant to)."""

    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._open: dict[int, dict[str, tuple[str, list[str]]]] = {}
        self._lock = threading.Lock()

    def stored(self, association: int, study_uid: str, patient_id: str, sop_class: str) -> None:
        if not self.audit.on:
            return
        with self._lock:
            studies = self._open.setdefault(association, {})
            studies.setdefault(study_uid, (patient_id, []))[1].append(sop_class)

    def ended(self, association: int, caller_ae: str, caller_address: str, aborted: bool) -> None:
        with self._lock:
            studies = self._open.pop(association, {})
        failure = "the association was aborted" if aborted else ""
        for study_uid, (patient_id, sop_classes) in studies.items():
            self.audit.record(
                instances_received(
                    self.audit.ae_title,
                    caller_ae=caller_ae,
                    caller_address=caller_address,
                    study=StudyObject(study_uid, count_by_class(sop_classes)),
                    patient_id=patient_id,
                    failure=failure,
                )
            )


def record_sent(
    audit: AuditTrail, peer_ae: str, peer_host: str, outcomes: Mapping[Path, str]
) -> None:
    """DICOM Instances Transferred for each study of files sent to a peer over one
    association (``outcomes``: each file's failure, empty when delivered); a study with a
    file not delivered is a minor failure saying how many and why."""

    def sent(found: StudyFiles) -> AuditEvent:
        failures = [outcomes[path] for path in found.paths if outcomes[path]]
        return instances_sent(
            audit.ae_title,
            peer_ae=peer_ae,
            peer_host=peer_host,
            study=found.study,
            patient_id=found.patient_id,
            failure=f"{len(failures)} not delivered: {failures[0]}" if failures else "",
        )

    record_each(audit, outcomes, sent)
