"""Withdraw the node's results of a study from the PACS (``dicomnode withdraw``).

A model version found wrong after its results were read (a recall), or a study analysed
outside its model's intended use (a child's knee): the overlays, presentation states and SRs
the node sent must leave the viewers. As for an image the PACS rejects (:mod:`dicomnode.
rejections`), the node sends a rejection note (IHE IOCM), a Key Object Selection titled
"Rejected for Quality Reasons" (or another title) listing them, which an archive that
supports IOCM hides them by.

Each study and model version whose results were sent gets a round closed at once, marked as
a withdrawal (``reports.withdrawal_code``). Its report (:mod:`dicomnode.worker`) is the
note: every result object of the rounds of that version since its last withdrawal sent (or
being sent) and not withdrawn yet, and no SR; the note goes to the round's destinations and
to every peer that was sent one of them. Later rounds of the study and version (an image
that comes after) report only what came after the withdrawal.

A recall lists its studies in a few queries (:func:`targets`) and withdraws them
:data:`BATCH` a transaction (:func:`withdraw_in_batches`), so that the write lock is never
held long; ordered again after a failure, it goes on where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect

from dicomnode.config import Settings
from dicomnode.db.schema import Job, Output, Report
from dicomnode.db.session import Database
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
    paths: tuple[str, ...]
    """The files of the result objects sent (or being sent) and not withdrawn yet: those of
    the rounds after the version's last withdrawal that no rejection note of the node lists."""
    busy: bool
    """A round of it is open or its report is waiting: withdraw once it is reported."""
    last_round: int
    """The id of its latest round."""

    @property
    def sent(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Withdrawn:
    """A withdrawal round closed for one :class:`Target`."""

    round_id: int
    target: Target
    description: str
    """What was withdrawn and why, in a line (the audit trail's outcome description)."""


BATCH = 200
"""Targets withdrawn per transaction by :func:`withdraw_in_batches`: a recall of thousands of
studies never holds SQLite's write lock for more than a few seconds (about 10 ms a target
here), so images go on being received while it runs."""


def targets(
    session: Session,
    study_uids: Sequence[str],
    model_name: str | None = None,
    model_version: str | None = None,
) -> list[Target]:
    """What a withdrawal of ``study_uids`` (every study, when empty: a recall of a model
    version) would list, by study and model version (``model_name``, ``model_version``: only
    those). A version with nothing to withdraw is left out unless it is busy. Five queries,
    however many studies: a recall lists 50,000 of them in seconds."""
    where = _rounds_of(study_uids, model_name, model_version)
    grouped: dict[tuple[str, str, str], list[Report]] = {}
    rounds = session.execute(
        select(Report).where(*where).order_by(Report.study_instance_uid, Report.sequence)
    ).scalars()
    for report in rounds:
        key = (report.study_instance_uid, report.model_name, report.model_version)
        grouped.setdefault(key, []).append(report)
    if not grouped:
        return []
    sent = _sent_by_round(session, where)
    done = withdrawn(session, select(Report.study_instance_uid).where(*where))
    busy = _busy_rounds(session, where)
    found = []
    for (study, name, version), reports in grouped.items():
        after = max((r.sequence for r in reports if r.withdrawal_code), default=0)
        paths = tuple(
            o.path
            for r in reports
            if r.sequence > after
            for o in sent.get(r.id, ())
            if o.sop_instance_uid not in done
        )
        is_busy = any(r.id in busy for r in reports)
        if paths or is_busy:
            found.append(Target(study, name, version, paths, is_busy, reports[-1].id))
    return found


def _rounds_of(
    study_uids: Sequence[str], model_name: str | None, model_version: str | None
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if study_uids:
        where.append(Report.study_instance_uid.in_(study_uids))
    if model_name:
        where.append(Report.model_name == model_name)
    if model_version:
        where.append(Report.model_version == model_version)
    return where


def _sent_by_round(session: Session, where: list[ColumnElement[bool]]) -> dict[int, list[Output]]:
    """The result objects (no rejection notes) of the rounds ``where`` selects that were sent,
    or are being sent, to a peer; by round id, then kind and UID."""
    by_round: dict[int, list[Output]] = {}
    outputs = session.execute(
        select(Output)
        .join(Report, Report.id == Output.report_id)
        .where(*where, Output.kind != "KO", _was_sent())
        .order_by(Output.kind, Output.sop_instance_uid)
    ).scalars()
    for output in outputs:
        by_round.setdefault(output.report_id, []).append(output)
    return by_round


def _was_sent() -> ColumnElement[bool]:
    """The :class:`Output` has a send job: sent, or being sent (a shadow-mode round's results
    never were)."""
    return exists().where(Job.kind == JobKind.SEND, Job.sop_instance_uid == Output.sop_instance_uid)


def _busy_rounds(session: Session, where: list[ColumnElement[bool]]) -> set[int]:
    """The rounds ``where`` selects that are open or whose report is still to be made (a dead
    report job is not), but for withdrawals: one waiting for its note is no analysis, and a
    recall ordered again goes on past it."""
    waiting = exists().where(
        Job.report_id == Report.id, Job.kind == JobKind.REPORT, Job.state.in_(WAITING)
    )
    busy = or_(Report.state == OPEN, and_(Report.state == PENDING, waiting))
    return set(
        session.execute(
            select(Report.id).where(*where, Report.withdrawal_code == "", busy)
        ).scalars()
    )


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
    _refuse_busy(chosen)
    if not any(t.sent for t in chosen):
        raise WithdrawError("nothing was sent that could be withdrawn")
    made = []
    for target in chosen:
        report = close_new_round(session, session.get_one(Report, target.last_round), settings)
        report.withdrawal_code, report.withdrawal_note = code, note[:1024]
        said = f"{target.model_name} {target.model_version} results withdrawn, "
        said += REJECTION_TITLES[code] + (f": {note}" if note else "")
        made.append(Withdrawn(report.id, target, said))
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


def _refuse_busy(chosen: Sequence[Target]) -> None:
    busy = [t.study_instance_uid for t in chosen if t.busy]
    if busy:
        raise WithdrawError(
            f"{len(busy)} study(ies) are being analysed (a round open or its report waiting), "
            f"e.g. {busy[0]}: withdraw once their reports are made; nothing was withdrawn"
        )


@dataclass(frozen=True)
class Batches:
    """What :func:`withdraw_in_batches` did."""

    made: tuple[Withdrawn, ...]
    late: tuple[str, ...]
    """Studies left out because an analysis of them began after the list was read."""


def withdraw_in_batches(
    db: Database,
    listed: Sequence[Target],
    code: str,
    note: str,
    settings: Settings,
    committed: Callable[[list[Withdrawn]], None] = lambda made: None,
) -> Batches:
    """Withdraw ``listed`` (read by :func:`targets`, none busy) :data:`BATCH` studies a
    transaction, each batch read again in its own (what holds now is withdrawn);
    ``committed`` is called with each batch once it is committed (the audit trail). A study
    whose analysis began since is left out (:attr:`Batches.late`): withdraw it once reported.
    Ordered again after a failure, a recall goes on where it stopped: what a withdrawal round
    listed is not listed again.

    Raises
    ------
    WithdrawError
        If ``listed`` has a busy target or nothing sent, or ``code`` is no title (nothing is
        withdrawn then).
    """
    if code not in REJECTION_TITLES:
        raise WithdrawError(f"{code} is not the title of a rejection note")
    _refuse_busy(listed)
    if not any(t.sent for t in listed):
        raise WithdrawError("nothing was sent that could be withdrawn")
    keys = {(t.study_instance_uid, t.model_name, t.model_version) for t in listed}
    studies = sorted({t.study_instance_uid for t in listed})
    made: list[Withdrawn] = []
    late: dict[str, None] = {}
    for start in range(0, len(studies), BATCH):
        with db.session() as session:
            now = [
                t
                for t in targets(session, studies[start : start + BATCH])
                if (t.study_instance_uid, t.model_name, t.model_version) in keys
            ]
            late.update((t.study_instance_uid, None) for t in now if t.busy)
            chosen = [t for t in now if t.sent and not t.busy]
            batch = withdraw(session, chosen, code, note, settings) if chosen else []
        made += batch
        committed(batch)
    return Batches(tuple(made), tuple(late))


def sent_results(session: Session, report: Report) -> list[Output]:
    """The result objects (overlays, presentation states, SRs) of the rounds of ``report``'s
    study and model version before it and after the version's last withdrawal that were sent,
    or are being sent, to a peer and that no rejection note of the node lists yet; by round."""
    done = withdrawn(session, report.study_instance_uid)
    return [
        o
        for o in sent_earlier(session, report, same_version=True, since_withdrawal=True)
        if o.kind != "KO" and o.sop_instance_uid not in done
    ]


def sent_earlier(
    session: Session,
    report: Report,
    *,
    same_version: bool,
    since_withdrawal: bool = False,
) -> list[Output]:
    """Every object (rejection notes too) of the rounds of ``report``'s study and model
    before it (of its version only, with ``same_version``; only those after the version's
    last withdrawal, with ``since_withdrawal``) that was sent, or is being sent, to a peer;
    by round, kind and UID. A shadow-mode round's results were never sent."""
    version = Report.model_version == report.model_version if same_version else true()
    return list(
        session.execute(
            select(Output)
            .join(Report, Report.id == Output.report_id)
            .where(
                Report.study_instance_uid == report.study_instance_uid,
                Report.model_name == report.model_name,
                version,
                Report.sequence < report.sequence,
                after_last_withdrawal(report) if since_withdrawal else true(),
                _was_sent(),
            )
            .order_by(Report.sequence, Output.kind, Output.sop_instance_uid)
        ).scalars()
    )


def after_last_withdrawal(report: Report) -> ColumnElement[bool]:
    """The :class:`Report` rows after the latest withdrawal round of ``report``'s study and
    model version before it (all, when none): its rounds report only their images. A
    subquery of the caller's query, not a query of its own."""
    return Report.sequence > _last_withdrawal(report)


def _last_withdrawal(report: Report) -> ScalarSelect[int]:
    earlier = aliased(Report)
    return (
        select(func.coalesce(func.max(earlier.sequence), 0))
        .where(
            earlier.study_instance_uid == report.study_instance_uid,
            earlier.model_name == report.model_name,
            earlier.model_version == report.model_version,
            earlier.sequence < report.sequence,
            earlier.withdrawal_code != "",
        )
        .scalar_subquery()
    )


def last_withdrawal(session: Session, report: Report) -> int:
    """The round number of the latest withdrawal of ``report``'s study and model version
    before it (0 when none)."""
    return int(session.execute(select(_last_withdrawal(report))).scalar_one())
