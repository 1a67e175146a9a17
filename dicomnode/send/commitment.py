"""Storage commitment (Push Model): a peer marked ``commitment`` commits to keeping what the
node delivered to it, before the node's copies are purged.

Once none of a round's sends to such a peer is pending, a ``commit`` job
(:func:`queue_commitment`) asks the peer (N-ACTION, Request Storage Commitment) to commit to
the objects delivered to it and not committed yet, under a Transaction UID recorded with the
job. The peer answers later, as a rule on an association of its own to the node's SCP
(N-EVENT-REPORT, :func:`record_report`; a report on the request's own association is taken
too):

* the objects it commits are marked ``committed_at`` on their sends;
* those it could not commit (Failed SOP Sequence) are sent again when the reason may pass
  (a processing failure, the object missing: :data:`SEND_AGAIN`), and once delivered a new
  request follows; for any other reason the send dies, saying why (``dicomnode retry`` once
  the PACS is mended, or ``discard``);
* the commit job is done when every delivered object is committed.

A peer that does not answer within ``send.commitment_timeout_seconds`` is asked again (a new
transaction), up to ``send.max_attempts`` requests for the round, counting those after objects
were sent again; then the job is dead, and the study is not
purged until ``dicomnode retry`` or ``dicomnode discard``: retention waits for the commit jobs
as for every job of a round.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence as DicomSequence
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import Select, delete, select, update
from sqlalchemy.orm import Session

from dicomnode.db.schema import CommitmentRequest, Job, Output
from dicomnode.db.session import Database, db_now
from dicomnode.peers import PeerInfo
from dicomnode.queue.jobs import PENDING, JobKind, JobSpec, JobState, enqueue

log = logging.getLogger(__name__)

REQUEST_STORAGE_COMMITMENT = 1
"""N-ACTION Action Type ID of the Storage Commitment Push Model."""
ALL_COMMITTED, SOME_FAILED = 1, 2
"""N-EVENT-REPORT Event Type IDs: every object committed; some could not be."""
SUCCESS, NO_SUCH_EVENT_TYPE = 0x0000, 0x0113
"""N-EVENT-REPORT response statuses."""
SEND_AGAIN = frozenset({0x0110, 0x0112})
"""Failure Reasons after which the object is sent again: a processing failure, and no such
object (the PACS lost it). The others (0x0119 class/instance conflict, 0x0122 SOP class not
supported, 0x0131 duplicate transaction, …) would fail again: the send dies, saying why."""


@dataclass(frozen=True)
class Reference:
    """An object delivered to the peer, to be committed."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Asked:
    """The outcome of an N-ACTION request: accepted, or why not and whether to retry."""

    ok: bool
    reason: str = ""
    retry: bool = True


@dataclass(frozen=True)
class Answer:
    """What a storage commitment report says."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: Mapping[str, int]
    """SOP Instance UID → Failure Reason (0x0110 processing failure, 0x0112 no such object,
    0x0119 class/instance conflict, 0x0122 SOP class not supported, …)."""


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_report` did with an answer."""

    job_id: int
    committed: int
    sent_again: int
    refused: int
    """Objects the peer will not commit as they are (their sends now dead)."""
    job_done: bool


def commit_key(report_id: int, peer: str) -> str:
    return f"commit:{report_id}>{peer}"


# --- the database ---------------------------------------------------------------------------


def _sends(report_id: int, peer: str) -> Select[Job]:
    return select(Job).where(Job.kind == JobKind.SEND, Job.report_id == report_id, Job.peer == peer)


def uncommitted(session: Session, report_id: int, peer: str) -> list[tuple[str, Path]]:
    """The round's objects delivered to ``peer`` and not committed: (SOP Instance UID, file)."""
    rows = session.execute(
        select(Job.sop_instance_uid, Output.path)
        .join(Output, Output.sop_instance_uid == Job.sop_instance_uid)
        .where(
            Job.kind == JobKind.SEND,
            Job.report_id == report_id,
            Job.peer == peer,
            Job.state == JobState.DONE,
            Job.committed_at.is_(None),
        )
        .order_by(Job.id)
    ).all()
    unique = {str(uid): Path(path) for uid, path in rows}  # a resend: the same object twice
    return list(unique.items())


def queue_commitment(session: Session, report_id: int, peer: str, max_attempts: int) -> bool:
    """Queue (or queue again) the round's commit job to ``peer`` when none of its sends to the
    peer is pending and some delivered object is not committed; True when queued."""
    pending = session.execute(
        _sends(report_id, peer).where(Job.state.in_(PENDING)).limit(1)
    ).first()
    if pending is not None or not uncommitted(session, report_id, peer):
        return False
    key = commit_key(report_id, peer)
    job = session.execute(
        select(Job).where(Job.kind == JobKind.COMMIT, Job.dedupe_key == key)
    ).scalar_one_or_none()
    if job is None:
        spec = JobSpec(
            JobKind.COMMIT, key, max_attempts, group_key=peer, report_id=report_id, peer=peer
        )
        return enqueue(session, [spec]) > 0
    if job.state in PENDING:
        return False
    now = db_now(session)
    # attempts are kept: requests for the round, however often its objects are sent again,
    # stay within max_attempts (a PACS failing an object for ever is not asked for ever)
    job.state, job.run_after, job.updated_at = JobState.QUEUED, now, now
    job.finished_at, job.last_error = None, ""
    return True


def record_request(session: Session, transaction_uid: str, job_id: int) -> None:
    session.add(
        CommitmentRequest(
            transaction_uid=transaction_uid, job_id=job_id, requested_at=db_now(session)
        )
    )


def drop_request(session: Session, transaction_uid: str) -> None:
    """Forget a request the peer did not take (no association, a refusal)."""
    session.execute(
        delete(CommitmentRequest).where(CommitmentRequest.transaction_uid == transaction_uid)
    )


def record_report(session: Session, answer: Answer) -> Recorded | None:
    """Mark the committed sends, queue the failed ones again, finish the commit job when
    nothing delivered is left uncommitted. ``None``: not a transaction of this node (or one
    of a study forgotten since)."""
    request = session.get(CommitmentRequest, answer.transaction_uid)
    job = None if request is None else session.get(Job, request.job_id, with_for_update=True)
    if request is None or job is None or job.report_id is None or job.peer is None:
        return None
    now = db_now(session)
    ours = (
        Job.kind == JobKind.SEND,
        Job.report_id == job.report_id,
        Job.peer == job.peer,
        Job.state == JobState.DONE,
    )
    committed = session.execute(
        update(Job)
        .where(*ours, Job.sop_instance_uid.in_(answer.committed), Job.committed_at.is_(None))
        .values(committed_at=now)
        .execution_options(synchronize_session=False)
    )
    again = refused = 0
    for sop_uid, reason in answer.failed.items():
        if reason in SEND_AGAIN:
            values: dict[str, object] = {
                "state": JobState.QUEUED,
                "attempts": 0,
                "run_after": now,
                "finished_at": None,
                "last_error": f"{job.peer} did not commit it (failure reason 0x{reason:04X}): "
                "sent again",
            }
        else:
            values = {
                "state": JobState.DEAD,
                "finished_at": now,
                "last_error": f"{job.peer} refuses to commit it (failure reason "
                f"0x{reason:04X}): `dicomnode retry` once mended there, or `dicomnode discard`",
            }
        result = session.execute(
            update(Job)
            .where(*ours, Job.sop_instance_uid == sop_uid)
            .values(updated_at=now, committed_at=None, **values)
            .execution_options(synchronize_session=False)
        )
        count = int(getattr(result, "rowcount", 0) or 0)
        again, refused = (
            (again + count, refused) if reason in SEND_AGAIN else (again, refused + count)
        )
    session.delete(request)
    done = not uncommitted(session, job.report_id, job.peer) and job.state != JobState.RUNNING
    if done:
        job.state, job.finished_at, job.updated_at, job.last_error = JobState.DONE, now, now, ""
        job.lease_expires_at = None
    return Recorded(job.id, int(getattr(committed, "rowcount", 0) or 0), again, refused, done)


def take_report(db: Database, event: evt.Event) -> tuple[int, None]:
    """Record an N-EVENT-REPORT of a storage commitment (an ``EVT_N_EVENT_REPORT`` handler's
    work, on the node's SCP or on a request's association); the status to answer, and no
    Event Reply."""
    information = event.event_information  # type: ignore[attr-defined]
    event_type = int(getattr(event.request, "EventTypeID", 0) or 0)
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        log.warning("storage commitment report of unknown event type %s ignored", event_type)
        return NO_SUCH_EVENT_TYPE, None
    answer = parse_report(event_type, information)
    with db.session() as session:
        recorded = record_report(session, answer)
    if recorded is None:
        log.warning(
            "storage commitment report for transaction %s, which is not this node's (or its "
            "study was forgotten): ignored",
            answer.transaction_uid,
        )
        return SUCCESS, None
    log.info(
        "storage commitment report (transaction %s, job %s): %d committed, %d sent again, "
        "%d refused%s",
        answer.transaction_uid,
        recorded.job_id,
        recorded.committed,
        recorded.sent_again,
        recorded.refused,
        ", every delivered object committed" if recorded.job_done else "",
    )
    return SUCCESS, None


# --- the network ----------------------------------------------------------------------------


def references(objects: Sequence[tuple[str, Path]]) -> list[Reference]:
    """The SOP class of each delivered object, from its file's header."""
    refs = []
    for sop_uid, path in objects:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        refs.append(Reference(str(header.SOPClassUID), sop_uid))
    return refs


def action_dataset(transaction_uid: str, refs: Sequence[Reference]) -> Dataset:
    """The N-ACTION-RQ's Action Information (PS3.4 J.3.2)."""
    dataset = Dataset()
    dataset.TransactionUID = transaction_uid
    items = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_instance_uid
        items.append(item)
    dataset.ReferencedSOPSequence = DicomSequence(items)
    return dataset


def parse_report(event_type: int, information: Dataset) -> Answer:
    """The answer an N-EVENT-REPORT's Event Information gives (PS3.4 J.3.3)."""
    committed = tuple(
        str(item.ReferencedSOPInstanceUID)
        for item in information.get("ReferencedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0x0110))
        for item in information.get("FailedSOPSequence", [])
        if "ReferencedSOPInstanceUID" in item
    }
    if event_type == ALL_COMMITTED and failed:
        log.warning("a storage commitment report of type 1 lists failures: taken as failed")
    return Answer(str(information.get("TransactionUID", "")), committed, failed)


def request_commitment(
    peer: PeerInfo,
    transaction_uid: str,
    refs: Sequence[Reference],
    *,
    calling_ae: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    on_report: Callable[[evt.Event], object] | None = None,
) -> Asked:
    """Send the N-ACTION request; a report the peer sends back on this association goes to
    ``on_report`` (an ``EVT_N_EVENT_REPORT`` handler)."""
    if peer.tls and tls is None:
        return Asked(False, "the peer is reached over TLS, but the node has no TLS settings", False)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers: list[evt.EventHandlerType] = (
        [] if on_report is None else [(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)],
        evt_handlers=handlers,
        tls_args=(tls, peer.host) if peer.tls and tls is not None else None,
    )
    if not assoc.is_established:
        return Asked(False, f"no association with {peer.name} ({peer.host}:{peer.port})")
    try:
        if not assoc.accepted_contexts:
            return Asked(False, f"{peer.name} does not accept storage commitment", False)
        status, _ = assoc.send_n_action(
            action_dataset(transaction_uid, refs),
            REQUEST_STORAGE_COMMITMENT,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        return Asked(False, "no response to the storage commitment request (time-out or abort)")
    if code != 0:
        return Asked(False, f"{peer.name} answered the storage commitment request 0x{code:04X}")
    return Asked(True)
