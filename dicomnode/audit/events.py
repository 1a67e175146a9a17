"""The audit events of the node, one function each (PS3.15 A.5.3).

``node`` is the node itself as a participant (:func:`node_participant`); the others are
the peer or the person on the other side of the event.
"""

from __future__ import annotations

import getpass
import os
import socket

from dicomnode.audit.messages import (
    APPLICATION_ACTIVITY,
    APPLICATION_START,
    APPLICATION_STOP,
    BEGIN_TRANSFERRING,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    MINOR_FAILURE,
    NETWORK_CONFIGURATION,
    NODE_AUTHENTICATION,
    ROLE_APPLICATION,
    ROLE_DESTINATION,
    ROLE_LAUNCHER,
    ROLE_SOURCE,
    SECURITY_ALERT,
    STUDY_DELETED,
    SUCCESS,
    AuditEvent,
    Code,
    Participant,
    StudyObject,
)


def node_participant(
    ae_title: str, role: Code | None = None, requestor: bool = False
) -> Participant:
    """The node: its process (``host:pid``), its AE title, its host's name."""
    host = socket.gethostname()
    return Participant(
        user_id=f"{host}:{os.getpid()}",
        role=role,
        requestor=requestor,
        ae_titles=(ae_title,),
        address=host,
    )


def operator() -> Participant:
    """The person running an admin command (the operating system's user)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return Participant(user_id=user, requestor=True)


def application_activity(ae_title: str, *, started: bool) -> AuditEvent:
    return AuditEvent(
        event=APPLICATION_ACTIVITY,
        action="E",
        event_type=APPLICATION_START if started else APPLICATION_STOP,
        participants=(
            node_participant(ae_title, ROLE_APPLICATION),
            _with_role(operator(), ROLE_LAUNCHER),
        ),
    )


def instances_received(
    ae_title: str,
    *,
    caller_ae: str,
    caller_address: str,
    study: StudyObject,
    patient_id: str,
    failure: str = "",
) -> AuditEvent:
    """A study's instances stored from a sender over one association (``failure``: the
    association was aborted, so the sender may not have sent all it meant to)."""
    return _transferred(
        action="C",
        source=Participant(
            user_id=caller_ae,
            role=ROLE_SOURCE,
            requestor=True,
            ae_titles=(caller_ae,),
            address=caller_address,
        ),
        destination=node_participant(ae_title, ROLE_DESTINATION),
        study=study,
        patient_id=patient_id,
        failure=failure,
    )


def instances_sent(
    ae_title: str,
    *,
    peer_ae: str,
    peer_host: str,
    study: StudyObject,
    patient_id: str,
    failure: str = "",
) -> AuditEvent:
    """A study's results sent to a peer over one association (``failure``: not all were
    delivered, and why)."""
    return _transferred(
        action="R",
        source=node_participant(ae_title, ROLE_SOURCE, requestor=True),
        destination=Participant(
            user_id=peer_ae,
            role=ROLE_DESTINATION,
            ae_titles=(peer_ae,),
            address=peer_host,
        ),
        study=study,
        patient_id=patient_id,
        failure=failure,
    )


def transfer_ordered(
    ae_title: str, *, peer_ae: str, peer_host: str, study: StudyObject, patient_id: str
) -> AuditEvent:
    """An operator had a study's results sent to a peer (``dicomnode resend``): Begin
    Transferring DICOM Instances, the operator its requestor. The sends themselves are
    audited as they happen (:func:`instances_sent`)."""
    return AuditEvent(
        event=BEGIN_TRANSFERRING,
        action="E",
        participants=(
            operator(),
            node_participant(ae_title, ROLE_SOURCE),
            Participant(
                user_id=peer_ae, role=ROLE_DESTINATION, ae_titles=(peer_ae,), address=peer_host
            ),
        ),
        studies=(study,),
        patient_id=patient_id,
    )


def _transferred(
    *,
    action: str,
    source: Participant,
    destination: Participant,
    study: StudyObject,
    patient_id: str,
    failure: str,
) -> AuditEvent:
    return AuditEvent(
        event=INSTANCES_TRANSFERRED,
        action=action,
        outcome=MINOR_FAILURE if failure else SUCCESS,
        outcome_description=failure,
        participants=(source, destination),
        studies=(study,),
        patient_id=patient_id,
    )


def study_deleted(
    ae_title: str, *, study: StudyObject, patient_id: str, by_operator: bool, reason: str
) -> AuditEvent:
    """A study's data deleted: by retention (the node) or by ``forget`` (an operator)."""
    node = node_participant(ae_title, ROLE_APPLICATION, requestor=not by_operator)
    participants = (operator(), node) if by_operator else (node,)
    return AuditEvent(
        event=STUDY_DELETED,
        action="D",
        outcome_description=reason,
        participants=participants,
        studies=(study,),
        patient_id=patient_id,
    )


def results_withdrawn(
    ae_title: str, *, study: StudyObject, patient_id: str, description: str
) -> AuditEvent:
    """An operator withdrew the node's results of a study from the PACS (``dicomnode
    withdraw``): DICOM Instances Accessed, action Delete, the operator its requestor, the
    study's withdrawn objects counted per SOP class. The rejection note that withdraws them is
    audited as it is sent (:func:`instances_sent`)."""
    return AuditEvent(
        event=INSTANCES_ACCESSED,
        action="D",
        outcome_description=description,
        participants=(operator(), node_participant(ae_title, ROLE_APPLICATION)),
        studies=(study,),
        patient_id=patient_id,
    )


def caller_refused(
    ae_title: str, *, caller_ae: str, caller_address: str, reason: str
) -> AuditEvent:
    """An association refused because the caller is not who it may be (unknown AE title,
    the wrong host, plain DICOM from a TLS peer): a Node Authentication failure."""
    return AuditEvent(
        event=SECURITY_ALERT,
        action="E",
        event_type=NODE_AUTHENTICATION,
        outcome=MINOR_FAILURE,
        outcome_description=reason,
        participants=(
            node_participant(ae_title, ROLE_APPLICATION, requestor=True),
            Participant(  # an unknown caller (a failed TLS handshake): named by its address
                user_id=caller_ae or caller_address,
                ae_titles=(caller_ae,) if caller_ae else (),
                address=caller_address,
            ),
        ),
    )


def peers_changed(ae_title: str, *, change: str) -> AuditEvent:
    """An operator added, changed or removed a peer (who may send, where results go)."""
    return AuditEvent(
        event=SECURITY_ALERT,
        action="E",
        event_type=NETWORK_CONFIGURATION,
        outcome_description=change,
        participants=(operator(), node_participant(ae_title, ROLE_APPLICATION)),
    )


def _with_role(participant: Participant, role: Code) -> Participant:
    return Participant(
        user_id=participant.user_id,
        role=role,
        requestor=participant.requestor,
        ae_titles=participant.ae_titles,
        address=participant.address,
        name=participant.name,
    )
