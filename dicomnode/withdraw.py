"""Withdraw the node's results of a study from the PACS (``dicomnode withdraw``).

A model version found wrong after its results were read (a recall), or a study analysed
outside its model's intended use (a child's knee): the overlays, presentation states and SRs
the node sent must leave the viewers. As for an image the PACS rejects (:mod:`dicomnode.
rejections`), the node sends a rejection note (IHE IOCM), a Key Object Selection titled
"Rejected for Quality Reasons" (or another title) listing them, which an archive that
supports IOCM hides them by.

Each study and model version whose results were sent gets a round closed at once, marked as
a withdrawal (``reports.withdrawal_code``). Its report (:mod:`dicomnode.worker`) is the
note: every result object of the earlier rounds of that version sent (or being sent) and not
withdrawn yet, and no SR; the note goes to the round's destinations and to every peer that
was sent one of them. Later rounds of the study and version (an image that comes after)
report only what came after the withdrawal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import exists, func, select, true
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.config import Settings
from dicomnode.db.schema import Job, Output, Report
from dicomnode.errors import DicomNodeError
from dicomnode.queue.jobs import PENDING as WAITING
from dicomnode.queue.jobs import JobKind
from dicomnode.rejections import withdrawn
from dicomnode.studies import OPEN, PENDING, close_new_round
from dicomnode.values import REJECTION_TITLES

log = logging.getLogger(__name__)

TITLES = {
    "quality": "113001",
    "safety": "113037",
    "worklist": "113038",
    "retention": "113039",
}
"""``--title`` words and the DCM code of the rejection note's title each gives."""


class WithdrawError(DicomNodeError):
    """A withdrawal that cannot be made (a study being analysed, nothing to withdraw)."""


@dataclass(frozen=True)
class Target:
    """One study and model version whose sent results a withdrawal lists."""

    study_instance_uid: str
    model_name: str
    model_version: str
    sent: int
    """The result objects sent (or being sent) and not withdrawn yet."""
    busy: bool
    """A round of it is open or its report is waiting: withdraw once it is reported."""


@dataclass(frozen=True)
class Withdrawn:
    """A withdrawal round closed for one :class:`Target`, and the files of what it lists."""

    round_id: int
    target: Target
    paths: tuple[str, ...]
    """The result objects' files (their headers name the patient for the audit trail)."""
    description: str
    """What was withdrawn and why, in a line (the audit trail's outcome description)."""


def targets(
    session: Session,
    study_uids: Sequence[str],
    model_name: str | None = None,
    model_version: str | None = None,
) -> list[Target]:
    """What a withdrawal of ``study_uids`` (every study, when empty: a recall of a model
    version) would list, by study and model version (``model_name``, ``model_version``: only
    those). A version with nothing sent is left out."""
    where: list[ColumnElement[bool]] = []
    if study_uids:
        where.append(Report.study_instance_uid.in_(study_uids))
    if model_name:
        where.append(Report.model_name == model_name)
    if model_version:
        where.append(Report.model_version == model_version)
    rounds = session.execute(
        select(Report).where(*where).order_by(Report.study_instance_uid, Report.sequence)
    ).scalars()
    grouped: dict[tuple[str, str, str], list[Report]] = {}
    for report in rounds:
        key = (report.study_instance_uid, report.model_name, report.model_version)
        grouped.setdefault(key, []).append(report)
    found = []
    for (study, name, version), reports in grouped.items():
        sent = len(sent_results(session, reports[-1], include_own_round=True))
        busy = any(_busy(session, r) for r in reports)
        if sent or busy:
            found.append(Target(study, name, version, sent, busy))
    return found


def _busy(session: Session, report: Report) -> bool:
    """The round is open, or its report is still to be made (a dead report job is not)."""
    if report.state == OPEN:
        return True
    if report.state != PENDING:
        return False
    waiting = exists().where(
        Job.report_id == report.id, Job.kind == JobKind.REPORT, Job.state.in_(WAITING)
    )
    return bool(session.execute(select(waiting)).scalar())


def withdraw(
    session: Session, chosen: Sequence[Target], code: str, note: str, settings: Settings
) -> list[Withdrawn]:
    """Close a withdrawal round for each of ``chosen`` (its report makes the rejection note of
    title DCM ``code``, ``note`` its administrator's words).

    Raises
    ------
    WithdrawError
        If a target is being analysed (withdraw once its report is made), or has nothing sent
        to withdraw, or ``code`` is no rejection note's title: nothing is withdrawn then.
    """
    if code not in REJECTION_TITLES:
        raise WithdrawError(f"{code} is not the title of a rejection note")
    busy = [t.study_instance_uid for t in chosen if t.busy]
    if busy:
        raise WithdrawError(
            f"{len(busy)} study(ies) are being analysed (a round open or its report waiting), "
            f"e.g. {busy[0]}: withdraw once their reports are made; nothing was withdrawn"
        )
    if not any(t.sent for t in chosen):
        raise WithdrawError("nothing was sent that could be withdrawn")
    made = []
    for target in chosen:
        last = session.execute(
            select(Report)
            .where(
                Report.study_instance_uid == target.study_instance_uid,
                Report.model_name == target.model_name,
                Report.model_version == target.model_version,
            )
            .order_by(Report.sequence.desc())
            .limit(1)
        ).scalar_one()
        listed = sent_results(session, last, include_own_round=True)
        report = close_new_round(session, last, settings)
        report.withdrawal_code, report.withdrawal_note = code, note[:1024]
        said = f"{target.model_name} {target.model_version} results withdrawn, "
        said += REJECTION_TITLES[code] + (f": {note}" if note else "")
        made.append(Withdrawn(report.id, target, tuple(o.path for o in listed), said))
        log.info(
            "withdrawal round %s of study=%s model=%s %s: %d result object(s), %s",
            report.sequence,
            target.study_instance_uid,
            target.model_name,
            target.model_version,
            target.sent,
            REJECTION_TITLES[code],
        )
    return made


def sent_results(
    session: Session, report: Report, *, include_own_round: bool = False
) -> list[Output]:
    """The result objects (overlays, presentation states, SRs) of the rounds of ``report``'s
    study and model version before it (and its own, with ``include_own_round``) that were
    sent, or are being sent, to a peer and that no rejection note of the node lists yet;
    by round."""
    done = withdrawn(session, report.study_instance_uid)
    return [
        o
        for o in sent_earlier(
            session, report, same_version=True, include_own_round=include_own_round
        )
        if o.kind != "KO" and o.sop_instance_uid not in done
    ]


def sent_earlier(
    session: Session,
    report: Report,
    *,
    same_version: bool,
    include_own_round: bool = False,
) -> list[Output]:
    """Every object (rejection notes too) of the rounds of ``report``'s study and model
    before it (of its version only, with ``same_version``; its own round too, with
    ``include_own_round``) that was sent, or is being sent, to a peer; by round, kind and
    UID. A shadow-mode round's results were never sent."""
    bound = (
        Report.sequence <= report.sequence
        if include_own_round
        else Report.sequence < report.sequence
    )
    version = Report.model_version == report.model_version if same_version else true()
    return list(
        session.execute(
            select(Output)
            .join(Report, Report.id == Output.report_id)
            .where(
                Report.study_instance_uid == report.study_instance_uid,
                Report.model_name == report.model_name,
                version,
                bound,
                exists().where(
                    Job.kind == JobKind.SEND, Job.sop_instance_uid == Output.sop_instance_uid
                ),
            )
            .order_by(Report.sequence, Output.kind, Output.sop_instance_uid)
        ).scalars()
    )


def last_withdrawal(session: Session, report: Report) -> int:
    """The round number of the latest withdrawal of ``report``'s study and model version
    before it (0 when none): its rounds report only the images of later rounds."""
    found = session.execute(
        select(func.max(Report.sequence)).where(
            Report.study_instance_uid == report.study_instance_uid,
            Report.model_name == report.model_name,
            Report.model_version == report.model_version,
            Report.sequence < report.sequence,
            Report.withdrawal_code != "",
        )
    ).scalar_one_or_none()
    return int(found or 0)
