"""The Grad-CAM pointing game on a phantom folder, through the node's Predictor."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.errors import ModelError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.models.card import GradCamSpec, load_card, write_card
from dicomnode.models.inference import Predictor
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.phantoms.dataset import write_phantom_folder
from dicomnode.training.pointing import has_masks, pointing_game, set_explanation


def test_pointing_game_counts_peaks_inside_masks(tmp_path: Path) -> None:
    data = write_phantom_folder(tmp_path / "spine", body_part="SPINE", count=8, seed=3, size=128)
    make_tiny_model(tmp_path / "m", body_part="SPINE", num_classes=2, channels=1)
    assert has_masks(data)
    game = pointing_game(tmp_path / "m", data)
    with (data / "phantoms.csv").open() as handle:
        abnormal = [r for r in csv.DictReader(handle) if r["mask"]]
    assert game["abnormal_images"] == len(abnormal) > 0
    predictor = Predictor.load(tmp_path / "m", load_card(tmp_path / "m"), "cpu")
    expected, misses = 0, []
    for row in abnormal:  # recount independently
        (finding,) = predictor.predict([read_image_file(data / row["label"] / f"{row['id']}.png")])[
            0
        ].findings
        mask = np.asarray(Image.open(data / row["mask"])) > 0
        column, row_index = int(finding.peak[0]), int(finding.peak[1])
        expected += bool(mask[row_index, column])
        if not mask[row_index, column]:  # brute force: the nearest lesion pixel
            rows, columns = np.nonzero(mask)
            nearest = np.sqrt((rows - row_index) ** 2 + (columns - column) ** 2).min()
            misses.append(nearest / max(mask.shape))
    assert game["hits"] == expected
    assert game["pointing_game"] == expected / len(abnormal)
    assert sum(v["images"] for v in game["by_lesion"].values()) == len(abnormal)
    assert game["miss_distance_median"] == pytest.approx(np.median(misses) if misses else 0.0)


def test_set_explanation_changes_the_card_not_the_weights(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "m", body_part="SPINE", num_classes=2, channels=1)
    recipe = {"gradcam_layer": "features", "notes": "trained", "model": {"version": "0.0.1"}}
    card = card.model_copy(update={"recipe": recipe})
    write_card(tmp_path / "m", card)
    spec = GradCamSpec(target_layer="features.0+features.1", method="layercam")
    with pytest.raises(ModelError, match="new version"):
        set_explanation(tmp_path / "m", spec, card.version)
    with pytest.raises(ModelError, match="does not exist"):
        set_explanation(tmp_path / "m", GradCamSpec(target_layer="features.7"), "0.0.2")
    set_explanation(tmp_path / "m", spec, "0.0.2", note="chosen on a selection set")
    updated = load_card(tmp_path / "m")
    assert (updated.gradcam, updated.version) == (spec, "0.0.2")
    assert updated.weights == card.weights
    assert updated.recipe["gradcam_layer"] == "features.0+features.1"
    assert updated.recipe["gradcam_method"] == "layercam"
    assert updated.recipe["notes"] == "trained chosen on a selection set"
    assert updated.recipe["model"] == {"version": "0.0.2"}
    predictor = Predictor.load(tmp_path / "m", updated, "cpu")
    assert predictor.identity.explanation == "LayerCAM at features.0+features.1"
