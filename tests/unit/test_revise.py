"""Serving a trained model with the test-time flip, afterwards: ``set-test-time-flip``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.errors import ModelError, TrainingError
from dicomnode.inference import Predictor
from dicomnode.models.card import ModelCard, load_card, write_card
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.revise import set_test_time_flip, trained_on_mirrors
from dicomnode.values import PreparedImage

VALIDATION = "grouped 5-fold cross-validation, out-of-fold predictions"


def _trained(directory: Path, *, horizontal_flip: bool) -> ModelCard:
    card = make_tiny_model(directory, num_classes=3, seed=4)
    recipe: dict[str, Any] = {
        "augment": {"enabled": True, "horizontal_flip": horizontal_flip},
        "test_time_flip": False,
        "notes": "trained",
        "model": {"version": card.version},
    }
    metrics = {"validation": VALIDATION, "balanced_accuracy": 0.66}
    card = card.model_copy(update={"recipe": recipe, "metrics": metrics})
    write_card(directory, card)
    return card


def _asymmetric(seed: int) -> PreparedImage:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.random((80, 96)) * np.linspace(0.1, 1.0, 96), 0, 1).astype(np.float32)
    return PreparedImage(pixels, "R", f"asymmetric-{seed}")


def test_a_model_trained_on_mirrors_is_served_with_the_flip_under_a_new_version(
    tmp_path: Path,
) -> None:
    before = _trained(tmp_path / "m", horizontal_flip=True)
    plain = Predictor.load(tmp_path / "m", before, "cpu")
    with pytest.raises(ModelError, match="new version"):
        set_test_time_flip(tmp_path / "m", True, before.version)
    set_test_time_flip(tmp_path / "m", True, "0.0.2", note="grades independent of the side")
    card = load_card(tmp_path / "m")
    assert card.test_time_flip and card.version == "0.0.2"
    assert card.weights == before.weights and card.temperature == before.temperature
    # The recipe still says how the figures were validated; the validation text says both.
    assert card.recipe["test_time_flip"] is False
    assert card.recipe["notes"] == "trained grades independent of the side"
    assert card.recipe["model"] == {"version": "0.0.2"}
    assert card.metrics["validation"] == (
        f"{VALIDATION}. Served with the test-time flip since version 0.0.2; "
        "these figures were computed without it."
    )
    assert card.metrics["balanced_accuracy"] == 0.66
    # Served: an image and its mirror now get the same probabilities; before they did not.
    flipping = Predictor.load(tmp_path / "m", card, "cpu")
    image = _asymmetric(1)
    mirror = PreparedImage(np.ascontiguousarray(image.pixels[:, ::-1]), "R", "mirror")
    (a,), (b,) = (flipping.predict([x])[0].findings for x in (image, mirror))
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    (c,), (d,) = (plain.predict([x])[0].findings for x in (image, mirror))
    assert float(np.abs(np.subtract(c.probabilities, d.probabilities)).max()) > 1e-4
    assert flipping.identity.explanation.endswith("(test-time flip)")
    with pytest.raises(TrainingError, match="with the test-time flip already"):
        set_test_time_flip(tmp_path / "m", True, "0.0.3")
    # And off again: the figures were computed without it, as now served.
    set_test_time_flip(tmp_path / "m", False, "0.0.3")
    off = load_card(tmp_path / "m")
    assert not off.test_time_flip
    assert off.metrics["validation"].endswith(
        "Served without the test-time flip since version 0.0.3, as these figures were computed."
    )


def test_the_flip_is_refused_for_a_model_never_trained_on_mirrors(tmp_path: Path) -> None:
    card = _trained(tmp_path / "m", horizontal_flip=False)
    with pytest.raises(TrainingError, match=r"not trained on mirrored images"):
        set_test_time_flip(tmp_path / "m", True, "0.0.2")
    assert load_card(tmp_path / "m") == card  # nothing written
    assert not trained_on_mirrors({})
    assert not trained_on_mirrors({"augment": {"enabled": False, "horizontal_flip": True}})
    assert trained_on_mirrors({"augment": {"horizontal_flip": True}})
    # An ensemble: its members' recipe, when they are folds of one (else nothing is recorded).
    members = {"augment": {"enabled": True, "horizontal_flip": True}}
    assert trained_on_mirrors({"ensemble": {}, "members_recipe": members})
    assert not trained_on_mirrors({"ensemble": {}, **members})


def test_the_shipped_knee_model_was_trained_on_mirrors() -> None:
    """Its recipe flipped left and right in training (the grade does not depend on the side)."""
    shipped = load_card(Path(__file__).resolve().parents[2] / "models" / "knee-kl")
    assert trained_on_mirrors(shipped.recipe)
