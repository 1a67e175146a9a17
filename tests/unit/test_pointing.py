"""The Grad-CAM pointing game on a phantom folder, through the node's Predictor."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.imaging.pixels import read_image_file
from dicomnode.models.card import load_card
from dicomnode.models.inference import Predictor
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.phantoms.dataset import write_phantom_folder
from dicomnode.training.pointing import has_masks, pointing_game


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
