"""DICOM audit messages (PS3.15 A.5): frozen values, and their XML.

The node writes the messages of IHE ATNA that concern it: Application Activity (start,
stop), DICOM Instances Transferred (an image received, a result sent), Begin Transferring
(``resend``), DICOM Instances Accessed (results withdrawn: ``withdraw``), DICOM Study Deleted
(retention, ``forget``) and Security Alert (a caller refused, peers changed). One message
names one patient, as A.5.3 asks; a study's instances are counted per SOP class.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Code:
    """A coded value of the audit schema (``csd-code``, ``codeSystemName``, ``originalText``)."""

    value: str
    meaning: str
    scheme: str = "DCM"


APPLICATION_ACTIVITY = Code("110100", "Application Activity")
BEGIN_TRANSFERRING = Code("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "Security Alert")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
NETWORK_CONFIGURATION = Code("110128", "Network Configuration")
ROLE_APPLICATION = Code("110150", "Application")
ROLE_LAUNCHER = Code("110151", "Application Launcher")
ROLE_DESTINATION = Code("110152", "Destination Role ID")
ROLE_SOURCE = Code("110153", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
APPLICATION_SERVER = "4"
"""AuditSourceTypeCode: an application server process (PS3.15 A.5.1.2.1)."""

XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'
"""On the message's one line (syslog and the audit file take one line per message)."""

SUCCESS = 0
MINOR_FAILURE = 4
"""EventOutcomeIndicator: the action was not completed (a refusal, a part not delivered)."""

MACHINE_NAME = "1"
IP_ADDRESS = "2"
"""NetworkAccessPointTypeCode of a host name, of an IP address."""


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an application (AE titles), a host, or a person (OS user)."""

    user_id: str
    role: Code | None = None
    requestor: bool = False
    ae_titles: tuple[str, ...] = ()
    address: str = ""
    name: str = ""


@dataclass(frozen=True)
class StudyObject:
    """A study's instances in the event, counted per SOP class (``{sop_class: count}``)."""

    study_uid: str
    sop_classes: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEvent:
    """One audit message, before the source and the time are stamped on it."""

    event: Code
    action: str
    participants: tuple[Participant, ...]
    event_type: Code | None = None
    outcome: int = SUCCESS
    outcome_description: str = ""
    studies: tuple[StudyObject, ...] = ()
    patient_id: str | None = None
    """Set for events about patient data (transfers, deletions): the Patient participant."""

    @property
    def failed(self) -> bool:
        return self.outcome != SUCCESS


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who writes the messages."""

    source_id: str
    enterprise_site_id: str = ""


def to_xml(event: AuditEvent, source: AuditSource, when: datetime) -> bytes:
    """The message as UTF-8 XML of the DICOM audit schema (PS3.15 A.5.1)."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        _attributes(
            EventActionCode=event.action,
            EventDateTime=when.isoformat(timespec="milliseconds"),
            EventOutcomeIndicator=str(event.outcome),
        ),
    )
    _coded(ident, "EventID", event.event)
    if event.event_type is not None:
        _coded(ident, "EventTypeCode", event.event_type)
    if event.outcome_description:
        description = " ".join(event.outcome_description.split())  # one line
        ET.SubElement(ident, "EventOutcomeDescription").text = description
    for participant in event.participants:
        _participant(root, participant)
    audit_source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        _attributes(
            AuditEnterpriseSiteID=source.enterprise_site_id, AuditSourceID=source.source_id
        ),
    )
    # one of the schema's own values, bare (a code system would say whose code it is)
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": APPLICATION_SERVER})
    for study in event.studies:
        _study(root, study)
    if event.patient_id is not None:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": event.patient_id,
                "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1",
            },
        )
        _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    return XML_DECLARATION + ET.tostring(root, encoding="unicode").encode("utf-8")


def _attributes(**values: str) -> dict[str, str]:
    """The non-empty attributes (an optional attribute is left out, not written empty)."""
    return {name: value for name, value in values.items() if value}


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _participant(root: ET.Element, participant: Participant) -> None:
    alternative = f"AETITLES={';'.join(participant.ae_titles)}" if participant.ae_titles else ""
    element = ET.SubElement(
        root,
        "ActiveParticipant",
        _attributes(
            UserID=participant.user_id,
            AlternativeUserID=alternative,
            UserName=participant.name,
            UserIsRequestor="true" if participant.requestor else "false",
            NetworkAccessPointID=participant.address,
            NetworkAccessPointTypeCode=_access_point_type(participant.address),
        ),
    )
    if participant.role is not None:
        _coded(element, "RoleIDCode", participant.role)


def _access_point_type(address: str) -> str:
    if not address:
        return ""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return MACHINE_NAME
    return IP_ADDRESS


def _study(root: ET.Element, study: StudyObject) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study.study_uid,
            "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3",
        },
    )
    _coded(element, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    if study.sop_classes:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        for sop_class, count in sorted(study.sop_classes.items()):
            attributes = {"UID": sop_class, "NumberOfInstances": str(count)}
            ET.SubElement(description, "SOPClass", attributes)


def count_by_class(sop_classes: Iterable[str]) -> dict[str, int]:
    """``{sop_class: instances}`` of a sequence of SOP Class UIDs."""
    counts: dict[str, int] = {}
    for sop_class in sop_classes:
        counts[sop_class] = counts.get(sop_class, 0) + 1
    return counts
