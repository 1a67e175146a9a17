"""The cards of the model versions that reported here, kept in the database.

A rejection note may arrive weeks after a study was reported, when the model version that
reported it has been replaced in ``models/``. The study is reported again by that version
(:mod:`dicomnode.rejections`): its new SR and its rejection notes must name the algorithm as
the earlier SR did, and its classes are coded as they were. So every round the scheduler opens
keeps its card (:func:`keep_card`, table ``model_cards``), and a report reads the card of its
round's version from the models installed, else from here (:func:`card_for_report`).

``dicomnode models`` lists both: the versions installed and those that reported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db.schema import ModelCardRecord, Report
from dicomnode.db.session import db_now, insert_new
from dicomnode.errors import ModelError
from dicomnode.models.card import ModelCard
from dicomnode.models.registry import ModelRegistry

log = logging.getLogger(__name__)


def keep_card(session: Session, card: ModelCard) -> None:
    """Keep ``card`` unless its name and version are kept already (the first one stays:
    see :func:`changed_weights`)."""
    row = {
        "name": card.name,
        "version": card.version,
        "sha256": card.weights.sha256,
        "card": card.model_dump_json(),
        "first_used_at": db_now(session),
    }
    session.execute(insert_new(session, ModelCardRecord, [row], ["name", "version"]))


def card_for_report(
    session: Session, registry: ModelRegistry, name: str, version: str
) -> ModelCard:
    """The card of model ``name`` ``version``: the one installed, else the one kept when it
    reported here.

    Raises
    ------
    ModelError
        If it is neither installed nor kept (a round opened before revision 0010 by a version
        since removed), or its kept card no longer validates.
    """
    for loaded in registry.cards:
        if loaded.card.name == name and loaded.card.version == version:
            return loaded.card
    record = session.get(ModelCardRecord, (name, version))
    if record is None:
        raise ModelError(
            f"model {name} version {version} is no longer installed, and its card was not kept "
            "(it reported before dicomnode kept cards): install it again beside the current "
            "version to report with it"
        )
    try:
        return ModelCard.model_validate_json(record.card)
    except ValidationError as exc:
        raise ModelError(
            f"the kept card of model {name} version {version} is invalid: {exc}"
        ) from exc


def changed_weights(session: Session, registry: ModelRegistry) -> list[str]:
    """The installed versions whose weights differ from those they reported with: a result's
    version then names two networks. One line each, for the start-up log."""
    lines = []
    for loaded in registry.cards:
        card = loaded.card
        record = session.get(ModelCardRecord, (card.name, card.version))
        if record is not None and record.sha256 != card.weights.sha256:
            lines.append(
                f"model {card.name} version {card.version} in {loaded.directory} has weights "
                f"{card.weights.sha256[:12]}…, but reported here with {record.sha256[:12]}…: "
                "give changed weights a new version"
            )
    return lines


@dataclass(frozen=True)
class ModelVersion:
    """One model version as ``dicomnode models`` lists it."""

    name: str
    version: str
    sha256: str
    body_parts: tuple[str, ...]
    synthetic_training_data: bool
    installed: str
    """The directory it is installed in; empty when it is only kept."""
    rounds: int
    """The rounds it opened here (studies reported, each report again counted)."""
    last_round: datetime | None


def model_versions(session: Session, registry: ModelRegistry) -> list[ModelVersion]:
    """Every model version installed or kept, by name and version."""
    rounds = {
        (name, version): (count, last)
        for name, version, count, last in session.execute(
            select(
                Report.model_name,
                Report.model_version,
                func.count(),
                func.max(Report.created_at),
            ).group_by(Report.model_name, Report.model_version)
        ).all()
    }
    installed = {(c.card.name, c.card.version): c for c in registry.cards}
    kept = {(r.name, r.version): r for r in session.execute(select(ModelCardRecord)).scalars()}
    listed = []
    for key in sorted(installed.keys() | kept.keys()):
        count, last = rounds.get(key, (0, None))
        card = installed[key].card if key in installed else _kept(kept[key])
        listed.append(
            ModelVersion(
                name=key[0],
                version=key[1],
                sha256=card.weights.sha256 if card else kept[key].sha256,
                body_parts=tuple(str(p) for p in card.body_parts) if card else (),
                synthetic_training_data=bool(card and card.synthetic_training_data),
                installed=str(installed[key].directory) if key in installed else "",
                rounds=count,
                last_round=last,
            )
        )
    return listed


def _kept(record: ModelCardRecord) -> ModelCard | None:
    try:
        return ModelCard.model_validate_json(record.card)
    except ValidationError:
        log.warning("the kept card of model %s version %s is invalid", record.name, record.version)
        return None


def kept_class_names(session: Session) -> dict[str, tuple[str, ...]]:
    """``"name version"`` -> class names, of every kept card (``dicomnode study`` names the
    findings of a version no longer installed with them)."""
    names = {}
    for record in session.execute(select(ModelCardRecord)).scalars():
        card = _kept(record)
        if card is not None:
            names[f"{card.name} {card.version}"] = tuple(c.name for c in card.classes)
    return names
