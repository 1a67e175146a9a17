"""Send a study's results again: ``dicomnode resend STUDY_UID --to PEER``.

The PACS lost them (restored from a backup older than the delivery), or a peer was added
that should hold them (a new archive). Every result object of the study's reported rounds
(each overlay SC, presentation state and SR, superseded SRs too) gets a new send job to the
peer, marked ``resend``: the first deliveries stay in the study's history, and the
turnaround, which ends at a round's first delivery, leaves these out. The usual order holds:
a round's SR after its overlays and presentation states, a later round's SR after the
earlier ones. What the node withdrew after a rejection note (IHE IOCM) is not sent again;
its own rejection notes are.

Refused for a study the node does not know, for one whose pixel data were purged (its
overlays are headers now: sending them would be sending broken images), and to a peer that
is not registered. A round kept here (shadow mode, ``results.routes``) is not sent: its
model's results are not for readers. An object whose send to the peer is still queued or
retrying is not queued twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicomnode.db.schema import Instance, Job, Output, Report
from dicomnode.db.session import db_now
from dicomnode.errors import DicomNodeError
from dicomnode.peers import get_peer
from dicomnode.queue.jobs import PENDING, JobKind, JobSpec, enqueue
from dicomnode.rejections import withdrawn
from dicomnode.store.instances import PURGED
from dicomnode.studies import KEPT


class ResendRefusedError(DicomNodeError):
    """The study's results cannot be sent again (unknown, or its pixel data purged)."""


@dataclass(frozen=True)
class Resent:
    """What :func:`resend_study` queued (or, dry, would queue)."""

    study_uid: str
    peer: str
    queued: int
    on_their_way: int
    """Objects whose send to the peer is queued or retrying already."""
    kept_rounds: int
    """Rounds kept here (shadow mode), not sent."""
    dry_run: bool
    paths: tuple[Path, ...] = ()
    """The files of the objects queued (or, dry, that would be)."""


def resend_study(
    session: Session, study_uid: str, peer_name: str, *, max_attempts: int, dry_run: bool = False
) -> Resent:
    """Queue every result object of ``study_uid`` to ``peer_name`` again (module notes)."""
    peer = get_peer(session, peer_name).name  # PeerError names the known peers
    _check_sendable(session, study_uid)
    reports = list(
        session.execute(select(Report).where(Report.study_instance_uid == study_uid)).scalars()
    )
    kept = sum(r.state == KEPT for r in reports)
    outputs = session.execute(
        select(Output)
        .where(Output.report_id.in_([r.id for r in reports if r.state != KEPT]))
        .order_by(Output.report_id, Output.kind)
    ).scalars()
    stamp = db_now(session).strftime("%Y%m%dT%H%M%S.%f")
    specs, waiting, paths = [], 0, []
    gone = withdrawn(session, study_uid)
    for output in outputs:
        if output.sop_instance_uid in gone:  # rejected by the node (its notes go again)
            continue
        if _on_its_way(session, output.sop_instance_uid, peer):
            waiting += 1
            continue
        specs.append(
            JobSpec(
                JobKind.SEND,
                f"{output.sop_instance_uid}>{peer}#resend-{stamp}",
                max_attempts,
                group_key=peer,
                report_id=output.report_id,
                sop_instance_uid=output.sop_instance_uid,
                peer=peer,
                resend=True,
            )
        )
        paths.append(Path(output.path))
    queued = len(specs) if dry_run else enqueue(session, specs)
    return Resent(study_uid, peer, queued, waiting, kept, dry_run, tuple(paths))


def _check_sendable(session: Session, study_uid: str) -> None:
    states = set(
        session.execute(
            select(Instance.state).where(Instance.study_instance_uid == study_uid).distinct()
        ).scalars()
    )
    if not states:
        raise ResendRefusedError(f"the node holds no record of study {study_uid}")
    if PURGED in states:
        raise ResendRefusedError(
            f"study {study_uid}: its pixel data were purged (storage.retention_days), so its "
            "overlays are headers only: forget it (`dicomnode forget`) and have the PACS send "
            "it again, to have it analysed anew"
        )


def _on_its_way(session: Session, sop_uid: str, peer: str) -> bool:
    return bool(
        session.execute(
            select(
                exists().where(
                    Job.kind == JobKind.SEND,
                    Job.sop_instance_uid == sop_uid,
                    Job.peer == peer,
                    Job.state.in_(PENDING),
                )
            )
        ).scalar_one()
    )
