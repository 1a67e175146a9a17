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
seed and training settings.
"""

from __future__ import annotations

from pathlib import Path

from dicomnode.errors import TrainingError
from dicomnode.models.card import write_revision
from dicomnode.training.ensemble import folds_metrics, folds_recipe, load_members

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
            "folds of one recipe (each card's recipe must agree apart from fold, output_dir, "
            "notes and precision)"
        )
    folds = recipe["folds_in_ensemble"]
    validation = (
        f"folds {', '.join(str(f) for f in folds)} of {recipe.get('folds', '?')} of this model's "
        "patient-grouped cross-validation, each fold's model trained by the same recipe and "
        "scored on its own held-out fold; this model is the model of fold "
        f"{card.metrics.get('fold')}"
    )
    record = {**folds_metrics(members, validation), "folds": folds}
    metrics = {**card.metrics, RECORD: record}
    return write_revision(model_dir, card, version, note, metrics=metrics)
