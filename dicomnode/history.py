"""What ``dicomnode study STUDY_UID`` shows: one study's path through the node.

Who sent which images and when, what became of each (analysed, skipped and why, waiting,
dead), each analysis round and its report, the findings, and each result object with
where it went: delivered when, retrying and why, or dead. The question a radiology IT
engineer is asked ("did the AI get study X, and where are its results?") answered from
the database alone, with UIDs, AE titles and times: no patient data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.schema import Association, Instance, Job, Output, Report, Result
from dicomnode.errors import DicomNodeError
from dicomnode.models.card import CARD_FILE, load_card
from dicomnode.queue.jobs import JobKind, JobState
from dicomnode.rejections import rejected_codes
from dicomnode.studies import KEPT
from dicomnode.values import REJECTION_TITLES, Priority


@dataclass(frozen=True)
class JobLine:
    """Where a job stands, in words: ``done``, ``retrying (attempt 2 of 5) at ...``."""

    state: str
    detail: str

    @property
    def text(self) -> str:
        return self.state + (f": {self.detail}" if self.detail else "")

    @staticmethod
    def of(job: Job | None) -> JobLine:
        if job is None:
            return JobLine("-", "")
        if job.state == JobState.FAILED:
            when = f"{job.run_after:%Y-%m-%d %H:%M:%S}"
            attempts = f"attempt {job.attempts + 1} of {job.max_attempts}"
            return JobLine("retrying", f"{attempts} at {when}: {job.last_error}")
        if job.state in (JobState.DEAD, JobState.DISCARDED):
            return JobLine(job.state, job.last_error)
        finished = job.finished_at if job.state == JobState.DONE else None
        return JobLine(job.state, _when(finished) if finished else "")


@dataclass(frozen=True)
class Delivery:
    """An association that delivered images of the study."""

    association_id: str
    calling_ae: str
    receiver: str
    started_at: datetime
    released_at: datetime | None
    images: int


@dataclass(frozen=True)
class Image:
    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part: str
    received_at: datetime
    association_id: str
    state: str
    reason: str
    analysis: JobLine
    priority: str = Priority.MEDIUM.name.lower()
    """Of its analysis, report and sends: high (urgent), medium or low (background)."""


KEPT_HERE = JobLine("not sent", "kept here: results.routes sends this model's results nowhere")
"""A result of a shadow-mode round (:data:`dicomnode.studies.KEPT`)."""


@dataclass(frozen=True)
class Round:
    """One analysis round of one model: its report (the SR) and the report job."""

    report_id: int
    model: str
    sequence: int
    state: str
    created_at: datetime
    finished_at: datetime | None
    report_job: JobLine
    withdrawal: str = ""
    """The title of its rejection note when the round withdrew the results sent before it
    (``dicomnode withdraw``)."""


@dataclass(frozen=True)
class Conclusion:
    """A model's result on one image: each finding's class index, probability and side."""

    sop_instance_uid: str
    report_id: int
    outcome: str
    findings: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Send:
    """A result object (SC, PR or SR) and its sending to one peer."""

    output_uid: str
    kind: str
    report_id: int
    source_uid: str
    peer: str
    sending: JobLine
    resend: bool = False
    """Sent again by ``dicomnode resend`` (the first sending is listed too)."""


@dataclass(frozen=True)
class StudyHistory:
    study_instance_uid: str
    deliveries: tuple[Delivery, ...]
    images: tuple[Image, ...]
    rounds: tuple[Round, ...]
    conclusions: tuple[Conclusion, ...]
    sends: tuple[Send, ...]


ClassNames = Mapping[str, tuple[str, ...]]
"""The class names of each model, by ``"name version"`` (as :attr:`Round.model` says)."""


def class_names(models_dir: Path) -> dict[str, tuple[str, ...]]:
    """The class names of the model cards in ``models_dir`` (cards that cannot be read are
    left out: their findings show class indices)."""
    names: dict[str, tuple[str, ...]] = {}
    for card_file in sorted(models_dir.glob(f"*/{CARD_FILE}")):
        try:
            card = load_card(card_file.parent, verify=False)
        except DicomNodeError:
            continue
        names[f"{card.name} {card.version}"] = tuple(c.name for c in card.classes)
    return names


def study_history(
    session: Session, study_uid: str, names: ClassNames | None = None
) -> StudyHistory | None:
    """The study's history, or ``None`` when the node holds no record of it; findings name
    their class where ``names`` knows the model. A handful of queries, whatever the size
    of the study: its jobs are read at once, by its rounds (an indexed column)."""
    reports = (
        session.execute(
            select(Report)
            .where(Report.study_instance_uid == study_uid)
            .order_by(Report.created_at, Report.id)
        )
        .scalars()
        .all()
    )
    jobs = _StudyJobs.read(session, [r.id for r in reports])
    instances = session.execute(
        select(Instance)
        .where(Instance.study_instance_uid == study_uid)
        .order_by(Instance.received_at, Instance.sop_instance_uid)
    ).scalars()
    rejected = rejected_codes(session, study_uid)
    images = tuple(_image(instance, jobs, rejected) for instance in instances)
    rounds = tuple(_round(report, jobs) for report in reports)
    if not images and not rounds:
        return None
    return StudyHistory(
        study_uid,
        _deliveries(session, study_uid),
        images,
        rounds,
        _conclusions(session, rounds, names or {}),
        _sends(session, rounds, jobs),
    )


@dataclass(frozen=True)
class _StudyJobs:
    """The jobs of a study's rounds: each image's analysis (the latest), each round's
    report, and each result object's sends."""

    infer: dict[str, Job]
    report: dict[int, Job]
    send: dict[str, list[Job]]

    @staticmethod
    def read(session: Session, report_ids: list[int]) -> _StudyJobs:
        jobs = _StudyJobs({}, {}, {})
        rows = session.execute(
            select(Job).where(Job.report_id.in_(report_ids)).order_by(Job.id)
        ).scalars()
        for job in rows:
            if job.kind == JobKind.INFER and job.sop_instance_uid:
                jobs.infer[job.sop_instance_uid] = job
            elif job.kind == JobKind.REPORT and job.report_id is not None:
                jobs.report[job.report_id] = job
            elif job.kind == JobKind.SEND and job.sop_instance_uid:
                jobs.send.setdefault(job.sop_instance_uid, []).append(job)
        return jobs


def _image(instance: Instance, jobs: _StudyJobs, rejected: dict[str, str]) -> Image:
    """One image; one that a rejection note withdrew says so (its state, then the title)."""
    code = rejected.get(instance.sop_instance_uid)
    state = instance.state if code is None else f"{instance.state}, rejected"
    reason = instance.reason or ("" if code is None else REJECTION_TITLES[code])
    return Image(
        instance.sop_instance_uid,
        instance.series_instance_uid,
        instance.modality,
        instance.body_part,
        instance.received_at,
        instance.association_id,
        state,
        reason,
        JobLine.of(jobs.infer.get(instance.sop_instance_uid)),
        Priority(instance.priority).name.lower(),
    )


def _round(report: Report, jobs: _StudyJobs) -> Round:
    return Round(
        report.id,
        f"{report.model_name} {report.model_version}",
        report.sequence,
        report.state,
        report.created_at,
        report.finished_at,
        JobLine.of(jobs.report.get(report.id)),
        REJECTION_TITLES.get(report.withdrawal_code, ""),
    )


def _deliveries(session: Session, study_uid: str) -> tuple[Delivery, ...]:
    rows = session.execute(
        select(Association, func.count(Instance.sop_instance_uid))
        .join(Instance, Instance.association_id == Association.id)
        .where(Instance.study_instance_uid == study_uid)
        .group_by(Association.id)
        .order_by(Association.started_at, Association.id)
    ).all()
    return tuple(
        Delivery(a.id, a.calling_ae, a.receiver or "-", a.started_at, a.released_at, int(n))
        for a, n in rows
    )


def _conclusions(
    session: Session, rounds: tuple[Round, ...], names: ClassNames
) -> tuple[Conclusion, ...]:
    models = {r.report_id: r.model for r in rounds}
    results = session.execute(
        select(Result).where(Result.report_id.in_(list(models))).order_by(Result.id)
    ).scalars()
    return tuple(
        Conclusion(
            r.sop_instance_uid,
            r.report_id,
            r.outcome,
            tuple(_finding(f, names.get(models[r.report_id], ())) for f in r.findings),
            r.reason,
        )
        for r in results
    )


def _finding(finding: dict[str, Any], classes: tuple[str, ...]) -> str:
    """``KL2 (71 %), R``: the predicted class (its index where the card is not at hand),
    its probability, the side."""
    predicted = int(finding.get("predicted", -1))
    probabilities = list(finding.get("probabilities") or [])
    said = classes[predicted] if 0 <= predicted < len(classes) else f"class {predicted}"
    if 0 <= predicted < len(probabilities):
        said += f" ({100 * probabilities[predicted]:.0f} %)"
    if finding.get("laterality"):
        said += f", {finding['laterality']}"
    if finding.get("localisation_uncertain"):
        said += ", localisation uncertain"
    return said


def _sends(session: Session, rounds: tuple[Round, ...], jobs: _StudyJobs) -> tuple[Send, ...]:
    kept = {r.report_id for r in rounds if r.state == KEPT}
    outputs = session.execute(
        select(Output)
        .where(Output.report_id.in_([r.report_id for r in rounds]))
        .order_by(Output.report_id, Output.kind, Output.created_at, Output.sop_instance_uid)
    ).scalars()
    sends: list[Send] = []
    for output in outputs:
        common = (output.sop_instance_uid, output.kind, output.report_id)
        source = output.source_sop_instance_uid or "-"
        sending = sorted(
            jobs.send.get(output.sop_instance_uid, []), key=lambda j: (j.peer or "", j.id)
        )
        lines = [
            Send(*common, source, job.peer or "-", _sending(job), bool(job.resend))
            for job in sending
        ]
        unsent = KEPT_HERE if output.report_id in kept else JobLine("not sent", "no destination")
        sends += lines or [Send(*common, source, "-", unsent)]
    return tuple(sends)


def _sending(job: Job) -> JobLine:
    """A send's line, with when its peer committed to keeping the object (storage
    commitment)."""
    line = JobLine.of(job)
    if job.committed_at is None:
        return line
    return JobLine(line.state, f"{line.detail}, committed {_when(job.committed_at)}".lstrip(", "))


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment else "-"


def render_history(history: StudyHistory) -> list[Table]:
    """The history as tables, in the order an image goes through the node (times in UTC).
    Text that came from headers or errors is printed as it is, never read as markup."""
    return [
        _table(
            "Received (times in UTC)", _RECEIVED, [_delivery_row(d) for d in history.deliveries]
        ),
        _table("Images", _IMAGES, [_image_row(i) for i in history.images]),
        _table("Rounds", _ROUNDS, [_round_row(r) for r in history.rounds]),
        _table("Findings", _FINDINGS, [_conclusion_row(c) for c in history.conclusions]),
        _table("Results sent", _SENDS, [_send_row(s) for s in history.sends]),
    ]


_RECEIVED = ("association", "calling AE", "receiver", "started", "released", "images")
_IMAGES = ("instance", "modality", "body part", "received", "state", "analysis")
_ROUNDS = ("report", "model", "round", "state", "created", "report job")
_FINDINGS = ("instance", "report", "outcome", "findings")
_SENDS = ("result", "kind", "report", "to", "sending")


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*map(Text, row))
    return table


def _delivery_row(d: Delivery) -> tuple[str, ...]:
    started, released = _when(d.started_at), _when(d.released_at)
    return (d.association_id, d.calling_ae, d.receiver, started, released, str(d.images))


def _image_row(i: Image) -> tuple[str, ...]:
    state = i.state + (f": {i.reason}" if i.reason else "")
    received = _when(i.received_at)
    analysis = i.analysis.text + ("" if i.priority == "medium" else f" ({i.priority} priority)")
    return (i.sop_instance_uid, i.modality, i.body_part, received, state, analysis)


def _round_row(r: Round) -> tuple[str, ...]:
    created = _when(r.created_at)
    state = r.state + (f", withdrawal: {r.withdrawal}" if r.withdrawal else "")
    return (str(r.report_id), r.model, str(r.sequence), state, created, r.report_job.text)


def _conclusion_row(c: Conclusion) -> tuple[str, ...]:
    said = "; ".join(c.findings) or c.reason or "-"
    return (c.sop_instance_uid, str(c.report_id), c.outcome, said)


def _send_row(s: Send) -> tuple[str, ...]:
    peer = f"{s.peer} (resent)" if s.resend else s.peer
    return (s.output_uid, s.kind, str(s.report_id), peer, s.sending.text)
