"""Which images a model has trained on: the held-out fold its card records, checked before use.

A model validated on fold ``k`` of a data folder is honest about fold ``k`` only if no
weights it was made of have seen fold ``k``: not the members of an ensemble scored on
it, not the weights a later stage of a recipe starts from (``init_weights``). A model
directory's card says which fold of which split it held out (``metrics.fold`` and the
recipe's data folder, folds, seed and grouping); :func:`saw_fold` reads it.

A staged recipe (the shipped ``hand-ra``: stage 1, then stage 2 from stage 1's weights,
then stage 3 from stage 2's) is cross-validated by running each stage's fold ``k`` from
the previous stage's fold ``k`` (``dicomnode train RECIPE --fold K --init-weights
DIR/fold-K/model.safetensors``). :func:`check_initial_weights` refuses a start from weights
that trained on the fold the run holds out, and returns what the card records of them
(:class:`~dicomnode.training.config.InitialWeights`). ``dicomnode evaluate`` says when the
folder it scores is one the model trained on (:func:`trained_on_folder`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dicomnode.errors import ModelError, TrainingError
from dicomnode.models.card import CARD_FILE, ModelCard, load_card, sha256_of
from dicomnode.training.config import SPLIT_KEYS, InitialWeights, TrainingConfig, recorded_recipe
from dicomnode.training.pretrained import IMAGENET, IMAGENET_LITE0

logger = logging.getLogger(__name__)


def trained_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe that trained a card's weights: an ensemble card's ``members_recipe``
    (recorded when the members are folds of one recipe; else nothing is known), else the
    card's own."""
    if "ensemble" in recipe:
        members = recipe.get("members_recipe")
        return members if isinstance(members, dict) else {}
    return recipe


def trained_on_folder(card: ModelCard, data_dir: Path) -> str:
    """What the weights of ``card`` have seen of ``data_dir``: "" when neither their recipe nor
    the model they started from (``init_weights_from``) names it, else a sentence for figures
    measured on it."""
    recipe = trained_recipe(card.recipe)
    start = recipe.get("init_weights_from")
    if _trained_on(recipe, data_dir):
        fold = card.metrics.get("fold")
        whose = f"{card.name} {card.version} was trained on"
    elif isinstance(start, dict) and _trained_on(start, data_dir):
        fold = start.get("fold")
        whose = (
            f"{card.name} {card.version} started from {start.get('name')} "
            f"{start.get('version')}, which was trained on"
        )
    else:
        return ""
    seen = f"every image but fold {fold}" if isinstance(fold, int) else "every image"
    return (
        f"{whose} {seen} of {data_dir}: figures on this folder are optimistic; score it on "
        "images it has not seen (its held-out figures are in its card)"
    )


def warn_if_trained_on(card: ModelCard, data_dir: Path) -> str:
    """:func:`trained_on_folder`, logged as a warning when it says anything."""
    seen = trained_on_folder(card, data_dir)
    if seen:
        logger.warning("%s", seen)
    return seen


def _trained_on(recipe: dict[str, Any], data_dir: Path) -> bool:
    """Whether a recorded recipe's data folder is ``data_dir`` (relative paths: from here)."""
    trained = recipe.get("data_dir")
    return bool(trained) and Path(str(trained)).resolve() == data_dir.resolve()


def is_weights_file(init_weights: str) -> bool:
    """Whether a recipe's ``init_weights`` names a file (not ``none`` or ImageNet)."""
    return init_weights not in ("none", IMAGENET, IMAGENET_LITE0)


def saw_fold(card: ModelCard, config: TrainingConfig, fold: int) -> str | None:
    """Why the model of ``card`` has trained on fold ``fold`` of ``config``'s split, or None.

    None when it was trained on another data folder (nothing to compare), or when it held
    out that very fold of the same split (folds, seed, grouping).
    """
    recipe = card.recipe
    if not _trained_on(recipe, config.data_dir):
        return None
    held_out = card.metrics.get("fold")
    if held_out != fold:
        kept = f"fold {held_out}" if isinstance(held_out, int) else "no fold"
        return (
            f"was trained on {config.data_dir} with {kept} held out: fold {fold} is among its "
            "training images"
        )
    recorded = recorded_recipe(recipe, card.trained)
    for key in SPLIT_KEYS:
        if key in recorded and recorded[key] != getattr(config, key):
            return (
                f"split {config.data_dir} with {key} {recorded[key]!r}, the recipe "
                f"{getattr(config, key)!r}: its held-out fold {held_out} is not the recipe's"
            )
    return None


def validated_folds(config: TrainingConfig) -> list[int]:
    """The folds a run of ``config`` scores on held-out images."""
    if isinstance(config.fold, int):
        return [config.fold]
    if config.fold in ("all", "final"):
        return list(range(config.folds))
    return []


def checked_start(config: TrainingConfig) -> TrainingConfig:
    """``config`` with ``init_weights_from`` filled in by :func:`check_initial_weights`."""
    return config.model_copy(update={"init_weights_from": check_initial_weights(config)})


def check_initial_weights(config: TrainingConfig) -> InitialWeights | None:
    """Refuse ``init_weights`` that trained on a fold this run holds out; what its card says.

    Only a weights file in a model directory whose card describes it (same sha256) can be
    checked; another file is trusted, with a warning when the run scores a fold.

    Raises
    ------
    TrainingError
        Naming the weights, the fold they held out and the fold this run holds out.
    """
    if not is_weights_file(config.init_weights):
        return None
    path = Path(config.init_weights)
    card = _card_of(path)
    folds = validated_folds(config)
    if card is None:
        if folds and path.is_file():
            logger.warning(
                "init_weights %s has no model card beside it: whether it trained on fold %s "
                "of %s cannot be checked (if it did, that fold's figures are optimistic)",
                path, ", ".join(map(str, folds)), config.data_dir,
            )  # fmt: skip
        return None
    for fold in folds:
        why = saw_fold(card, config, fold)
        if why is not None:
            raise TrainingError(
                f"init_weights {path} ({card.name} {card.version}) {why}; start fold {fold} "
                "from the previous stage's model of the same fold (dicomnode train RECIPE "
                "--fold K --init-weights DIR/fold-K/model.safetensors)"
            )
    held_out = card.metrics.get("fold")
    data = trained_recipe(card.recipe).get("data_dir")
    return InitialWeights(
        name=card.name,
        version=card.version,
        sha256=card.weights.sha256,
        data_dir=str(data) if data else None,
        fold=held_out if isinstance(held_out, int) else None,
    )


def _card_of(path: Path) -> ModelCard | None:
    """The card beside weights file ``path`` when it describes that very file, else None."""
    if not (path.parent / CARD_FILE).is_file() or not path.is_file():
        return None
    try:
        card = load_card(path.parent, verify=False)
    except ModelError:
        return None
    if card.weights.file != path.name or card.weights.sha256 != sha256_of(path):
        return None
    return card
