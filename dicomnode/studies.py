"""When a study is ready, and which model (if any) each instance goes to.

A study is ready when every association that delivered its new instances is
closed and ``study.settle_seconds`` passed since the last one arrived. Its new
instances are then routed by body part: each model gets one report (a
processing round) with one inference job per instance and one report job.
Instances that arrive after a round are processed as the next round, whose SR
supersedes the earlier one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from pydicom.uid import UID
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.config import RoutingSettings, Settings
from dicomnode.db.schema import Association, Instance, Output, Report
from dicomnode.db.session import Database, utcnow
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.queue.jobs import JobKind, JobSpec, enqueue
from dicomnode.values import BodyPart

log = logging.getLogger(__name__)

RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    }
)


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


def route(
    sop_class_uid: str, modality: str, body_part: str, descriptions: str, rules: RoutingSettings
) -> Route:
    """Decide the body part from BodyPartExamined, else from the descriptions."""
    if sop_class_uid not in RADIOGRAPH_SOP_CLASSES:
        return Route(None, f"not a radiograph SOP class ({UID(sop_class_uid).name})")
    if modality not in rules.modalities:
        return Route(None, f"modality {modality or '(none)'} is not a radiograph modality")
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


def ready_studies(session: Session, settle_seconds: float) -> list[str]:
    """Studies with received instances, no open delivering association and quiet long enough."""
    cutoff = utcnow() - timedelta(seconds=settle_seconds)
    statement = (
        select(Instance.study_instance_uid)
        .join(Association, Association.id == Instance.association_id)
        .where(Instance.state == "received")
        .group_by(Instance.study_instance_uid)
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


def _is_own_output(session: Session, sop_uid: str) -> bool:
    return session.get(Output, sop_uid) is not None


def schedule_study(
    session: Session, study_uid: str, settings: Settings, registry: ModelRegistry
) -> list[int]:
    """Route the study's received instances and queue their jobs; return the new report ids."""
    instances = session.execute(
        select(Instance).where(
            Instance.study_instance_uid == study_uid, Instance.state == "received"
        )
    ).scalars()
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
        _queue_round(session, study_uid, cards[name], members, settings)
        for name, members in by_model.items()
    ]


def _decide(
    session: Session, instance: Instance, settings: Settings, registry: ModelRegistry
) -> LoadedCard | str:
    if _is_own_output(session, instance.sop_instance_uid):
        return "a result object of this node"
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


def _queue_round(
    session: Session,
    study_uid: str,
    loaded: LoadedCard,
    members: list[Instance],
    settings: Settings,
) -> int:
    card = loaded.card
    report = Report(
        study_instance_uid=study_uid,
        model_name=card.name,
        model_version=card.version,
        sequence=_next_sequence(session, study_uid, card.name),
        calling_ae=members[0].calling_ae,
        state="pending",
        created_at=utcnow(),
    )
    session.add(report)
    session.flush()
    group = f"{card.name}:{card.version}"
    specs = [
        JobSpec(
            JobKind.INFER,
            f"{m.sop_instance_uid}:{group}",
            settings.workers.max_attempts,
            group_key=group,
            report_id=report.id,
            sop_instance_uid=m.sop_instance_uid,
        )
        for m in members
    ]
    specs.append(
        JobSpec(
            JobKind.REPORT,
            f"report:{report.id}",
            settings.workers.max_attempts,
            group_key=group,
            report_id=report.id,
        )
    )
    enqueue(session, specs)
    for member in members:
        member.state, member.report_id = "queued", report.id
    log.info(
        "queued study=%s model=%s round=%s images=%d report=%s",
        study_uid,
        card.name,
        report.sequence,
        len(members),
        report.id,
    )
    return report.id


def schedule_ready(db: Database, settings: Settings, registry: ModelRegistry) -> list[int]:
    """One scheduler pass: queue every ready study; return the new report ids."""
    with db.session() as session:
        studies = ready_studies(session, settings.study.settle_seconds)
    report_ids: list[int] = []
    for study_uid in studies:
        with db.session() as session:
            report_ids.extend(schedule_study(session, study_uid, settings, registry))
    return report_ids
