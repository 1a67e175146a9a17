"""Record a recipe's cross-validation in the card of one of its fold models.

A shipped model is often the model of one fold of its recipe (trained on four
fifths of the data, validated on the fifth), while the other folds are trained
later, one by one, to measure the recipe. ``dicomnode record-cv MODEL_DIR
FOLD_DIR... --version V`` reads the figures each fold model's card holds for its
own held-out fold and writes them, with their mean and standard deviation, into
``MODEL_DIR``'s card as ``metrics.recipe_cross_validation``, under a new
version. The weights and the explanation stay as they are.

The models must be folds of one recipe, each a different fold
(:func:`~dicomnode.training.ensemble.folds_recipe`): the same data, folds,
seed and training settings. The folds of a staged recipe start each from the previous
stage's model of the same fold (``dicomnode train RECIPE --fold K --init-weights ...``);
the record lists what each started from (``init_weights_per_fold``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dicomnode.errors import TrainingError
from dicomnode.models.card import load_card, write_revision
from dicomnode.training.ensemble import folds_metrics, folds_recipe, load_members
from dicomnode.training.metrics import summarise_folds
from dicomnode.training.output import METRICS_FILE

RECORD = "recipe_cross_validation"
"""The key of the card's ``metrics`` this module writes."""


def record_cross_validation(
    model_dir: Path, fold_dirs: list[Path], version: str, note: str = ""
) -> Path:
    """Write the recipe's cross-validation into ``model_dir``'s card; returns the card's path.

    Raises
    ------
    ModelError
        If the version is the card's own.
    TrainingError
        If the models are not folds of one recipe (see the module notes).
    """
    members = load_members([model_dir, *fold_dirs])
    card = members[0].card
    recipe = folds_recipe(members)
    if recipe is None:
        raise TrainingError(
            f"{', '.join(str(m.directory) for m in members)} are not the models of different "
            "folds of one recipe (each card's recipe must agree apart from the fold, the run's "
            "folders and threads, the model's version, notes and precision, and init_weights "
            "where each fold started from a model that held out that fold)"
        )
    folds = recipe["folds_in_ensemble"]
    starts = recipe.get("init_weights_per_member")  # a staged recipe: each fold its own start
    validation = (
        f"folds {', '.join(str(f) for f in folds)} of {recipe.get('folds', '?')} of this model's "
        "patient-grouped cross-validation, each fold's model trained by the same recipe and "
        "scored on its own held-out fold"
        + (", each from the weights of its own fold (init_weights_per_fold)" if starts else "")
        + f"; this model is the model of fold {card.metrics.get('fold')}"
    )
    record = {**folds_metrics(members, validation), "folds": folds}
    if starts:
        record["init_weights_per_fold"] = starts
    metrics = {**card.metrics, RECORD: record}
    return write_revision(model_dir, card, version, note, metrics=metrics)


def resummarise(
    model_dir: Path, version: str, note: str = "", carry_from: Path | None = None
) -> Path:
    """Write ``model_dir``'s card again with its fold summaries recomputed; returns its path.

    Every ``cross_validation`` of the card's metrics (its own and its recipe's)
    is computed again from the ``per_fold`` figures beside it with
    :func:`~dicomnode.training.metrics.summarise_folds`, so a card written
    before the summary gained a figure gets it. ``carry_from`` names an earlier
    card (``model.yaml``) of the same model whose recipe cross-validation this
    card lacks (a later stage fine-tuned the weights of that recipe's fold
    model): it is carried over, its ``validation`` text saying where from. An
    earlier ensemble of the recipe's fold models gives its members' figures.

    Raises
    ------
    ModelError
        If the version is the card's own.
    TrainingError
        If the card holds no per-fold figures to summarise and nothing is carried.
    """
    card = load_card(model_dir)
    metrics = dict(card.metrics)
    if carry_from is not None:
        if RECORD in metrics:
            raise TrainingError(f"the card in {model_dir} has a {RECORD} already; nothing carried")
        metrics[RECORD] = _carried(carry_from, card.name)
    record = metrics.get(RECORD)
    if "per_fold" not in metrics and not (isinstance(record, dict) and "per_fold" in record):
        raise TrainingError(f"the card in {model_dir} holds no per-fold figures to summarise")
    if "per_fold" in metrics:
        metrics["cross_validation"] = summarise_folds(metrics["per_fold"])
    if isinstance(record, dict) and "per_fold" in record:
        metrics[RECORD] = {**record, "cross_validation": summarise_folds(record["per_fold"])}
    path = write_revision(model_dir, card, version, note, metrics=metrics)
    _resummarise_metrics_file(model_dir / METRICS_FILE)
    return path


def _resummarise_metrics_file(path: Path) -> None:
    """The training's ``metrics.json`` beside the card, its summary recomputed alike."""
    if not path.is_file():
        return
    figures = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(figures, dict) and "per_fold" in figures:
        figures["cross_validation"] = summarise_folds(figures["per_fold"])
        path.write_text(json.dumps(figures, indent=2), encoding="utf-8")


def _carried(path: Path, name: str) -> dict[str, Any]:
    """The recipe cross-validation of the earlier card at ``path`` of model ``name``."""
    try:
        earlier = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TrainingError(f"cannot read the card {path}: {exc}") from exc
    if not isinstance(earlier, dict) or earlier.get("name") != name:
        raise TrainingError(f"{path} is not a card of model {name}")
    record = _recipe_record(earlier)
    if record is None:
        raise TrainingError(
            f"{path} ({name} {earlier.get('version')}) has no {RECORD}, nor is it an ensemble "
            "of the folds of one recipe"
        )
    source = f"{name} {earlier.get('version')}"
    validation = (
        f'carried from the card of {source}, where it reads ("this model" being {source}): '
        f"{record.get('validation', '')}"
    )
    return {**record, "carried_from": source, "validation": validation}


def _recipe_record(card: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe cross-validation a card (as read from its ``model.yaml``) holds: its
    :data:`RECORD`, or, for an ensemble of the folds of one recipe, its members' figures on
    their own held-out folds (``per_fold``, with the folds it names); None when neither."""
    metrics = card.get("metrics") or {}
    record = metrics.get(RECORD)
    if isinstance(record, dict) and "per_fold" in record:
        return record
    members = (card.get("recipe") or {}).get("members_recipe")
    if not isinstance(members, dict) or not isinstance(metrics.get("per_fold"), list):
        return None
    return {
        "validation": str(metrics.get("validation", "")),
        "per_fold": metrics["per_fold"],
        "cross_validation": metrics.get("cross_validation", {}),
        "folds": members.get("folds_in_ensemble", []),
    }
