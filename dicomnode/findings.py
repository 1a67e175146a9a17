"""What the models found over the last day, per model version: findings by class, the knee
localiser's uncertain joints, images not assessed.

A model's output mix moves when its input does: a new detector or protocol, lateral films
routed to a model of PA films, a broken window or photometric interpretation. The share of
uncertain localisations and of images not assessed rises, or one class takes every image.
These figures (``dicomnode status``, the metrics ``dicomnode_findings_last_day`` and its
neighbours, the alert ``DicomnodeLocalisationOftenUncertain``) show it within a day, before a
radiologist has to notice. They count the rounds reported in the last 24 hours (indexed by
the round's end) and read only each result's findings, never an image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.cards import kept_class_names
from dicomnode.db.schema import Report, Result

DAY = timedelta(days=1)


@dataclass(frozen=True)
class ModelFindings:
    """One model version's output over the last day.

    ``classes``: (class name, findings) for every class of its card, zeros too; a finding is
    one image, or one knee joint of a film. ``uncertain``: findings whose localisation the SR
    flags as uncertain. ``not_assessed``: images routed to it that it could not assess.
    """

    model: str
    version: str
    classes: tuple[tuple[str, int], ...]
    uncertain: int
    not_assessed: int

    @property
    def findings(self) -> int:
        return sum(count for _, count in self.classes)


def last_day(session: Session, now: datetime) -> tuple[ModelFindings, ...]:
    """Each model version's findings in the rounds reported since ``now`` minus a day."""
    rows = session.execute(
        select(Result.model_name, Result.model_version, Result.outcome, Result.findings)
        .join(Report, Report.id == Result.report_id)
        .where(Report.finished_at >= now - DAY)
    ).all()
    predicted: dict[tuple[str, str], Counter[int]] = {}
    uncertain: Counter[tuple[str, str]] = Counter()
    not_assessed: Counter[tuple[str, str]] = Counter()
    for model, version, outcome, findings in rows:
        key = (model, version)
        counts = predicted.setdefault(key, Counter())
        if outcome != "ok":
            not_assessed[key] += 1
        for finding in findings or []:
            index = finding.get("predicted")
            if not isinstance(index, int):
                continue  # not a finding as the worker writes them (pipeline.findings_to_json)
            counts[index] += 1
            uncertain[key] += bool(finding.get("localisation_uncertain"))
    names = kept_class_names(session)
    return tuple(
        ModelFindings(
            model,
            version,
            _named(counts, names.get(f"{model} {version}", ())),
            uncertain[(model, version)],
            not_assessed[(model, version)],
        )
        for (model, version), counts in sorted(predicted.items())
    )


def _named(counts: Counter[int], names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Every class of the card by name (zeros too); an index the card lacks by its number."""
    indices = sorted(set(range(len(names))) | set(counts))
    return tuple((names[i] if i < len(names) else str(i), counts.get(i, 0)) for i in indices)
