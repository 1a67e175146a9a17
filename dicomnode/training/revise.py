"""Revise how a trained model is served, keeping its weights: ``dicomnode set-test-time-flip``.

A card's ``test_time_flip`` makes the node classify each input and its
left-right mirror and average the two (logits and maps). A model trained on
mirrored images (its recipe's ``augment.horizontal_flip``) can be given the
flip afterwards, under a new version, without training again: its grades then
no longer depend on which way round a radiograph is shown. The card's figures
were computed as the model was validated; the revision says so in the card's
``metrics.validation`` instead of pretending they were measured with the flip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.errors import TrainingError
from dicomnode.models.card import ModelCard, check_new_version, load_card, write_revision
from dicomnode.training.lineage import trained_recipe


def set_test_time_flip(model_dir: Path, on: bool, version: str, note: str = "") -> Path:
    """Switch ``model_dir``'s test-time flip ``on`` (or off) under a new version.

    Returns the card's path. The recipe the card records keeps the flip it was
    validated with; ``note`` is appended to its notes.

    Raises
    ------
    ModelError
        If the version is the card's own.
    TrainingError
        If the card already serves that way, or the flip is asked for a model
        whose recipe did not train it on mirrored images.
    """
    card = load_card(model_dir)
    check_new_version(card, version)
    if card.test_time_flip == on:
        state = "with" if on else "without"
        raise TrainingError(f"model {card.name} is served {state} the test-time flip already")
    if on and not trained_on_mirrors(card.recipe):
        raise TrainingError(
            f"model {card.name} was not trained on mirrored images (its recipe's "
            "augment.horizontal_flip is off or not recorded): a mirror is not an image it has "
            "learnt, so averaging with it would change its outputs in ways never validated"
        )
    metrics = {**card.metrics, "validation": _validation(card, on, version)}
    return write_revision(model_dir, card, version, note, test_time_flip=on, metrics=metrics)


def trained_on_mirrors(recipe: dict[str, Any]) -> bool:
    """Whether a card's recorded recipe (an ensemble's: its members') trained with left-right
    flips."""
    augment = trained_recipe(recipe).get("augment")
    if not isinstance(augment, dict):
        return False
    return bool(augment.get("enabled", True)) and bool(augment.get("horizontal_flip", False))


def _validation(card: ModelCard, on: bool, version: str) -> str:
    """The card's validation text with a sentence on how its figures relate to the flip."""
    validated = bool(trained_recipe(card.recipe).get("test_time_flip", False))
    state = "with" if on else "without"
    sentence = f"Served {state} the test-time flip since version {version}"
    if validated == on:
        sentence += ", as these figures were computed."
    else:
        sentence += f"; these figures were computed {'with' if validated else 'without'} it."
    earlier = str(card.metrics.get("validation", "")).rstrip()
    if earlier and not earlier.endswith("."):
        earlier += "."
    return f"{earlier} {sentence}".strip()
