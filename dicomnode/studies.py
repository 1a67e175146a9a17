"""Which model (if any) each instance goes to, and when a study's round is reported.

New instances are routed by body part as soon as they are stored: each goes
into its model's open processing round of the study (one is opened when there
is none) with an inference job of its own, so the model runs while the rest of
the study is still arriving. A round is closed, and its report job queued,
when every association that delivered its instances is closed and
``study.settle_seconds`` passed since the last one arrived; the report job
then waits for the round's inference jobs. Instances that arrive after a round
was closed open the next round, whose SR supersedes the earlier one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from pydicom.uid import UID
from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, aliased

from dicomnode.cards import keep_card
from dicomnode.config import RoutingSettings, Settings
from dicomnode.db.schema import Association, Instance, Job, Output, Report, Result
from dicomnode.db.session import Database, db_now, lock_until_commit
from dicomnode.models.card import ModelCard
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.queue.jobs import JobKind, JobSpec, JobState, enqueue, requeue
from dicomnode.rejections import is_rejected, read_rejection_note, record_rejection
from dicomnode.values import BodyPart, Priority

log = logging.getLogger(__name__)

OPEN = "open"
"""State of a round that new instances of its study and model still join (no report job yet)."""
PENDING = "pending"
"""State of a closed round whose report job has not run yet."""

RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    }
)
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
"""Digital X-Ray Image Storage - For Processing: the detector's raw image, before the
processing that makes it readable. The models learnt from images as radiologists read them."""


@dataclass(frozen=True)
class Route:
    """Where an instance goes: a body part, or a reason to skip it."""

    body_part: BodyPart | None
    reason: str = ""


def _match_alias(text: str, aliases: dict[str, tuple[str, ...]]) -> BodyPart | None:
    upper = f" {text.upper().replace('_', ' ')} "
    for part, words in aliases.items():
        if any(f" {w} " in upper or upper.strip() == w for w in words):
            return BodyPart(part)
    return None


def not_a_radiograph(sop_class_uid: str, modality: str, rules: RoutingSettings) -> str:
    """Why an instance is not analysed whatever its body part ("" when it may be)."""
    if sop_class_uid == DX_FOR_PROCESSING:
        return (
            "a DX For Processing image (raw detector data, not for reading); "
            "the node analyses the For Presentation image"
        )
    if sop_class_uid not in RADIOGRAPH_SOP_CLASSES:
        return f"not a radiograph SOP class ({UID(sop_class_uid).name})"
    if modality not in rules.modalities:
        return f"modality {modality or '(none)'} is not a radiograph modality"
    return ""


def route(
    sop_class_uid: str, modality: str, body_part: str, descriptions: str, rules: RoutingSettings
) -> Route:
    """Decide the body part from BodyPartExamined, else from the descriptions."""
    not_analysed = not_a_radiograph(sop_class_uid, modality, rules)
    if not_analysed:
        return Route(None, not_analysed)
    if body_part:
        exact = next(
            (BodyPart(p) for p, words in rules.body_part_aliases.items() if body_part in words),
            None,
        )
        if exact is not None:
            return Route(exact)
    from_text = _match_alias(descriptions.replace("|", " "), rules.body_part_aliases)
    if from_text is not None:
        return Route(from_text)
    shown = body_part or "(empty)"
    return Route(
        None, f"unknown body part: BodyPartExamined {shown} and no keyword in the descriptions"
    )


def studies_with_new_instances(session: Session) -> list[str]:
    """Studies with instances that no pass has routed yet."""
    statement = select(Instance.study_instance_uid).where(Instance.state == "received").distinct()
    return list(session.execute(statement).scalars())


def ready_rounds(session: Session, settle_seconds: float) -> list[int]:
    """Open rounds whose instances came on closed associations and are quiet long enough.

    A study with an instance that no pass has routed yet (one stored since
    this pass routed the new ones) keeps its rounds open until the next pass.
    """
    cutoff = db_now(session) - timedelta(seconds=settle_seconds)
    unrouted = aliased(Instance)
    statement = (
        select(Report.id)
        .join(Instance, Instance.report_id == Report.id)
        .join(Association, Association.id == Instance.association_id)
        .where(
            Report.state == OPEN,
            ~exists().where(
                unrouted.study_instance_uid == Report.study_instance_uid,
                unrouted.state == "received",
            ),
        )
        .group_by(Report.id)
        .having(func.max(Instance.received_at) <= cutoff)
        .having(func.count().filter(Association.released_at.is_(None)) == 0)
    )
    return list(session.execute(statement).scalars())


def _next_sequence(session: Session, study_uid: str, model_name: str) -> int:
    current = session.execute(
        select(func.max(Report.sequence)).where(
            Report.study_instance_uid == study_uid, Report.model_name == model_name
        )
    ).scalar_one_or_none()
    return int(current or 0) + 1


def lock_study(session: Session, study_uid: str) -> None:
    """Schedule the study in turn with every other node sharing the database, until the
    transaction ends. On PostgreSQL two ``serve`` nodes routed the same new images at
    once: both found no open round and opened one each (one failed on the unique round
    number, or the images left the round that held their inference jobs, whose overlays
    were then never sent); one also set a round back to pending after another's report."""
    lock_until_commit(session, f"study {study_uid}")


def _is_own_output(session: Session, sop_uid: str) -> bool:
    return session.get(Output, sop_uid) is not None


def queue_new_instances(
    session: Session, study_uid: str, settings: Settings, registry: ModelRegistry
) -> list[int]:
    """Route the study's new instances into their models' open rounds and queue their inference.

    Returns the ids of the rounds that got instances. The study's scheduling takes turns
    with that of other nodes sharing the database (:func:`lock_study`).
    """
    lock_study(session, study_uid)
    instances = list(
        session.execute(
            select(Instance).where(
                Instance.study_instance_uid == study_uid, Instance.state == "received"
            )
        ).scalars()
    )
    if settings.routing.rejection_notes:
        instances = [i for i in instances if not _took_rejection_note(session, i, settings)]
    by_model: dict[str, list[Instance]] = defaultdict(list)
    cards: dict[str, LoadedCard] = {}
    for instance in instances:
        decision = _decide(session, instance, settings, registry)
        if isinstance(decision, str):
            instance.state, instance.reason = "skipped", decision
            log.info("skipped sop=%s study=%s: %s", instance.sop_instance_uid, study_uid, decision)
            continue
        cards[decision.card.name] = decision
        by_model[decision.card.name].append(instance)
    return [
        _queue_inference(
            session, _open_round(session, study_uid, cards[name], members), members, settings
        )
        for name, members in by_model.items()
    ]


def _took_rejection_note(session: Session, instance: Instance, settings: Settings) -> bool:
    """Whether ``instance`` is a rejection note (IHE IOCM), which is then carried out: the
    images it lists are withdrawn (:func:`dicomnode.rejections.record_rejection`), and each
    model version that reported on one of them reports again (a round closed at once, unless
    one is open: its report leaves them out too). The note is skipped, its reason saying what
    it did."""
    note = read_rejection_note(instance)
    if note is None:
        return False
    held, reported = record_rejection(session, note)
    again = [r for r in reported if _report_again(session, r, settings)]
    instance.state = "skipped"
    instance.reason = (
        f"rejection note ({note.meaning}): rejects {len(note.instances)} instance(s), "
        f"{held} of them held here; {len(again)} report(s) made again"
    )[:500]
    log.info(
        "rejection note sop=%s study=%s: %s",
        note.sop_uid,
        instance.study_instance_uid,
        instance.reason,
    )
    return True


def _report_again(session: Session, reported: Report, settings: Settings) -> bool:
    """Close a new round of ``reported``'s study and model version at once, so that its
    report leaves the rejected images out and rejects what named them; not when a round of
    it is open (its report, made later, does it). Rounds report in turn
    (:func:`dicomnode.queue.jobs.due_since`), so a report running now is followed."""
    lock_study(session, reported.study_instance_uid)
    is_open = session.execute(
        select(Report.id).where(
            Report.study_instance_uid == reported.study_instance_uid,
            Report.model_name == reported.model_name,
            Report.model_version == reported.model_version,
            Report.state == OPEN,
        )
    ).first()
    if is_open is not None:
        return False
    close_new_round(session, reported, settings)
    return True


def close_new_round(session: Session, reported: Report, settings: Settings) -> Report:
    """A new round of ``reported``'s study and model version, closed at once (its report job
    queued): one that reports again what the earlier rounds reported."""
    report = _round_after(session, reported)
    close_round(session, report.id, settings)
    return report


def _round_after(session: Session, reported: Report) -> Report:
    """The open round of ``reported``'s study and model version (a new one when none is)."""
    return _open_round_of(
        session,
        reported.study_instance_uid,
        reported.model_name,
        reported.model_version,
        reported.calling_ae,
    )


def _decide(
    session: Session, instance: Instance, settings: Settings, registry: ModelRegistry
) -> LoadedCard | str:
    if _is_own_output(session, instance.sop_instance_uid):
        return "a result object of this node"
    if is_rejected(session, instance.sop_instance_uid):
        return "rejected by a rejection note that came before it"
    decision = route(
        instance.sop_class_uid,
        instance.modality,
        instance.body_part,
        instance.descriptions,
        settings.routing,
    )
    if decision.body_part is None:
        return decision.reason
    loaded = registry.for_body_part(decision.body_part)
    if loaded is None:
        return f"no model is installed for body part {decision.body_part}"
    return loaded


def _open_round(
    session: Session, study_uid: str, loaded: LoadedCard, members: list[Instance]
) -> Report:
    """The study's open round for this model (and version), or a new one, whose opening keeps
    the card (:func:`dicomnode.cards.keep_card`): the study can be reported again by this
    version after it left ``models/``."""
    card = loaded.card
    return _open_round_of(session, study_uid, card.name, card.version, members[0].calling_ae, card)


def _open_round_of(
    session: Session,
    study_uid: str,
    model_name: str,
    model_version: str,
    calling_ae: str,
    card: ModelCard | None = None,
) -> Report:
    """The open round of the study and model version, or a new one (``card`` kept then; a
    round that reports again comes from a version whose first round kept it)."""
    report = session.execute(
        select(Report).where(
            Report.study_instance_uid == study_uid,
            Report.model_name == model_name,
            Report.model_version == model_version,
            Report.state == OPEN,
        )
    ).scalar_one_or_none()
    if report is not None:
        return report
    report = Report(
        study_instance_uid=study_uid,
        model_name=model_name,
        model_version=model_version,
        sequence=_next_sequence(session, study_uid, model_name),
        calling_ae=calling_ae,
        state=OPEN,
        created_at=db_now(session),
    )
    session.add(report)
    session.flush()
    if card is not None:
        keep_card(session, card)
    log.info(
        "round opened study=%s model=%s round=%s report=%s",
        study_uid,
        model_name,
        report.sequence,
        report.id,
    )
    return report


def retry_dead_jobs(session: Session, job_ids: Sequence[int] | None = None) -> int:
    """Re-queue dead jobs (all, or those of ``job_ids``) with fresh attempts; how many.

    A dead inference job whose round was already reported joins the study's open round
    (a new one when there is none): that round's report, made when the image has been
    analysed, supersedes the earlier SR, which left the image out.
    """
    dead = _dead_jobs(session, job_ids)
    if not dead:
        return 0
    count = requeue(session, [job.id for job in dead])
    for job in dead:
        if job.kind == JobKind.INFER:
            _rejoin_open_round(session, job)
    return count


def _dead_jobs(session: Session, job_ids: Sequence[int] | None) -> list[Job]:
    """The dead jobs, or those of ``job_ids`` that are dead."""
    statement = select(Job).where(Job.state == JobState.DEAD)
    if job_ids:
        statement = statement.where(Job.id.in_(job_ids))
    return list(session.execute(statement).scalars())


DISCARDED = "discarded"
"""State of a round whose report job was discarded (no report will be made)."""

KEPT = "kept"
"""State of a finished round whose model's route sends its results nowhere (an empty
``results.routes`` entry: shadow mode). They are kept in the data folder and purged with
their study, as delivered results are."""


def discard_dead_jobs(session: Session, job_ids: Sequence[int] | None = None) -> int:
    """Give up dead jobs (all, or those of ``job_ids``); how many (``dicomnode discard``).

    Nothing waits for them any more, so their study can be finished and, after the retention
    period, purged: a discarded analysis leaves its image skipped (the reason says so), a
    discarded report its round without a report, a discarded send its object undelivered.
    """
    dead = _dead_jobs(session, job_ids)
    now = db_now(session)
    for job in dead:
        job.state, job.finished_at, job.updated_at = JobState.DISCARDED, now, now
        if job.kind == JobKind.INFER and job.sop_instance_uid is not None:
            instance = session.get(Instance, job.sop_instance_uid)
            if instance is not None and instance.state == "queued":
                instance.state = "skipped"
                instance.reason = f"analysis discarded after failing: {job.last_error or ''}"[:500]
        elif job.kind == JobKind.REPORT and job.report_id is not None:
            report = session.get(Report, job.report_id)
            if report is not None and report.state == PENDING:
                report.state = DISCARDED
        log.info("job %s (%s) discarded", job.id, job.kind)
    return len(dead)


def _rejoin_open_round(session: Session, job: Job) -> None:
    reported = session.get(Report, job.report_id)
    instance = session.get(Instance, job.sop_instance_uid)
    if reported is None or instance is None or reported.state in (OPEN, PENDING):
        return  # its round's report has not been made yet: it waits for this job
    lock_study(session, reported.study_instance_uid)
    report = _round_after(session, reported)
    job.report_id = instance.report_id = report.id
    instance.state = "queued"
    log.info("job %s re-queued into round %s (report %s)", job.id, report.sequence, report.id)


def route_again_after_update(session: Session, registry: ModelRegistry) -> int:
    """Route again the images waiting for a version of an installed model that is no longer
    installed (the node restarted after a model update); how many.

    Only a model whose name is installed in another version counts as updated: the jobs of a
    model missing altogether (a ``models.dir`` misconfigured) are left as they are, not
    routed to "no model for this body part" and skipped for good.

    Each such inference job (queued, or failed and waiting to try again; not running, and
    not dead: a dead one was reported "Not assessed", and ``dicomnode retry`` of it counts as
    waiting at the next start) is deleted and its image received again, so the next
    scheduler pass routes it to the version that serves its body part now. A round left with
    no image and no result is deleted with its report job; one that keeps analysed images
    reports them as before, with its version's kept card (:mod:`dicomnode.cards`).

    Run by ``serve`` at start-up only: hosts sharing the database with other ``models/``
    (a rolling update) would otherwise route the same images back and forth."""
    installed = [f"{c.card.name}:{c.card.version}" for c in registry.cards]
    names = {c.card.name for c in registry.cards}
    waiting = [
        job
        for job in session.execute(
            select(Job).where(
                Job.kind == JobKind.INFER,
                Job.state.in_((JobState.QUEUED, JobState.FAILED)),
                Job.group_key.not_in(installed),
            )
        ).scalars()
        if job.group_key.partition(":")[0] in names
    ]
    rounds = {job.report_id for job in waiting if job.report_id is not None}
    for job in waiting:
        instance = session.get(Instance, job.sop_instance_uid)
        if instance is not None:
            lock_study(session, instance.study_instance_uid)
            instance.state, instance.report_id, instance.reason = "received", None, ""
        log.info(
            "job %s sop=%s: model %s is no longer installed; routed again",
            job.id,
            job.sop_instance_uid,
            job.group_key,
        )
        session.delete(job)
    session.flush()
    for report_id in rounds:
        _delete_if_empty(session, report_id)
    return len(waiting)


def _delete_if_empty(session: Session, report_id: int) -> None:
    """Delete the round ``report_id`` and its report job when no image and no result is in it."""
    held = session.execute(
        select(
            exists().where(Instance.report_id == report_id)
            | exists().where(Result.report_id == report_id)
            | exists().where(Output.report_id == report_id)
        )
    ).scalar_one()
    if held:
        return
    session.execute(delete(Job).where(Job.report_id == report_id))
    report = session.get(Report, report_id)
    if report is not None:
        log.info(
            "round %s of study=%s model=%s %s: empty, deleted",
            report.sequence,
            report.study_instance_uid,
            report.model_name,
            report.model_version,
        )
        session.delete(report)


def _queue_inference(
    session: Session, report: Report, members: list[Instance], settings: Settings
) -> int:
    group = _group(report)
    enqueue(
        session,
        [
            _round_job(report, JobKind.INFER, f"{m.sop_instance_uid}:{group}", settings, m)
            for m in members
        ],
    )
    for member in members:
        member.state, member.report_id = "queued", report.id
    log.info("inference queued report=%s images=%d", report.id, len(members))
    return report.id


def _group(report: Report) -> str:
    return f"{report.model_name}:{report.model_version}"


def _round_job(
    report: Report,
    kind: JobKind,
    key: str,
    settings: Settings,
    image: Instance | None = None,
    priority: int = Priority.MEDIUM,
) -> JobSpec:
    """A job of the round (an image's inference, of the image's priority; or its report, of
    ``priority``), grouped by model."""
    return JobSpec(
        kind,
        key,
        settings.workers.max_attempts,
        group_key=_group(report),
        report_id=report.id,
        sop_instance_uid=None if image is None else image.sop_instance_uid,
        priority=priority if image is None else image.priority,
    )


def round_priority(session: Session, report_id: int) -> int:
    """The priority of a round's report and of its results' sends: its most urgent image's
    (medium for a round without images, one that reports again after a rejection note)."""
    found = session.execute(
        select(func.max(Instance.priority)).where(Instance.report_id == report_id)
    ).scalar_one_or_none()
    return Priority.MEDIUM if found is None else int(found)


def close_round(session: Session, report_id: int, settings: Settings) -> None:
    """Queue the round's report job: no more instances join it."""
    report = session.get(Report, report_id)
    if report is None:
        return
    lock_study(session, report.study_instance_uid)
    session.refresh(report)  # as it is once the lock is ours: another node may have closed it
    if report.state != OPEN:
        return
    priority = round_priority(session, report.id)
    enqueue(
        session,
        [_round_job(report, JobKind.REPORT, f"report:{report.id}", settings, priority=priority)],
    )
    report.state = PENDING
    images = session.execute(
        select(func.count()).select_from(Instance).where(Instance.report_id == report.id)
    ).scalar_one()
    log.info(
        "queued study=%s model=%s round=%s images=%d report=%s",
        report.study_instance_uid,
        report.model_name,
        report.sequence,
        images,
        report.id,
    )


def schedule_ready(db: Database, settings: Settings, registry: ModelRegistry) -> list[int]:
    """One scheduler pass: queue inference for new instances, then close every ready round.

    Returns the ids of the rounds closed (their report jobs queued).
    """
    with db.session() as session:
        studies = studies_with_new_instances(session)
    for study_uid in studies:
        with db.session() as session:
            queue_new_instances(session, study_uid, settings, registry)
    with db.session() as session:
        ready = ready_rounds(session, settings.study.settle_seconds)
    for report_id in ready:
        with db.session() as session:
            close_round(session, report_id, settings)
    return ready
