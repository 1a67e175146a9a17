"""The Grad-CAM pointing game on a phantom folder, through the node's Predictor."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.errors import ConfigError, ModelError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.inference import Predictor
from dicomnode.models.card import GradCamSpec, load_card, write_card
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.data import pixel_digest
from dicomnode.training.fingerprint import TrainingImages, write_training_images
from dicomnode.training.masks import has_masks
from dicomnode.training.phantoms.dataset import write_phantom_folder
from dicomnode.training.pointing import (
    GALLERY_MISSES,
    IMAGE_COLUMNS,
    TOLERANCES,
    close_up,
    pointing_game,
    pointing_report,
    set_explanation,
)
from dicomnode.training.report import lesion_tile


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
    rows = game["images"]
    assert [r["id"] for r in rows] == [r["id"] for r in abnormal]
    assert sum(r["hit"] for r in rows) == expected
    assert sorted(r["miss_distance"] for r in rows if not r["hit"]) == pytest.approx(sorted(misses))
    assert all(r["miss_distance"] == 0.0 for r in rows if r["hit"])
    for tolerance, share in zip(TOLERANCES, game["within"].values(), strict=True):
        near = sum(d <= tolerance for d in misses)
        assert share == pytest.approx((expected + near) / len(abnormal))
    assert list(game["within"].values()) == sorted(game["within"].values())
    # A damaged image of the folder is named, by its place in the folder.
    first = abnormal[0]
    (data / first["label"] / f"{first['id']}.png").write_bytes(b"not a picture")
    with pytest.raises(ConfigError, match=rf"^{first['label']}/{first['id']}\.png: not a readable"):
        pointing_game(tmp_path / "m", data)


def test_pointing_report_writes_figures_rows_and_the_misses(tmp_path: Path) -> None:
    data = write_phantom_folder(tmp_path / "spine", body_part="SPINE", count=12, seed=5, size=96)
    make_tiny_model(tmp_path / "m", body_part="SPINE", num_classes=2, channels=1)
    game = pointing_report(tmp_path / "m", data, tmp_path / "report")
    figures = json.loads((tmp_path / "report" / "pointing_game.json").read_text())
    assert figures == {k: v for k, v in game.items() if k != "images"}
    assert figures == {
        k: v for k, v in pointing_game(tmp_path / "m", data).items() if k != "images"
    }
    with (tmp_path / "report" / "pointing_game.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == IMAGE_COLUMNS
        rows = list(reader)
    assert [r["id"] for r in rows] == [r["id"] for r in game["images"]]
    assert sum(r["hit"] == "True" for r in rows) == game["hits"]
    misses = game["abnormal_images"] - game["hits"]
    assert misses > 0  # an untrained model misses some
    with Image.open(tmp_path / "report" / "pointing_misses.png") as gallery:
        tiles = min(misses, GALLERY_MISSES)
        assert gallery.width == max(tiles * (256 + 10) + 10, 2 * 60 + 200)


def test_the_pointing_game_on_the_models_own_training_folder_is_said_to_be_optimistic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_phantom_folder(tmp_path / "spine", body_part="SPINE", count=4, seed=5, size=64)
    model = tmp_path / "m"
    make_tiny_model(model, body_part="SPINE", num_classes=2, channels=1)
    with caplog.at_level("WARNING", logger="dicomnode.training.lineage"):
        pointing_game(model, data)
    assert "optimistic" not in caplog.text  # a card without a recipe: nothing known
    card = load_card(model)
    write_card(model, card.model_copy(update={"recipe": {"data_dir": str(data), "folds": 5}}))
    with caplog.at_level("WARNING", logger="dicomnode.training.lineage"):
        pointing_report(model, data, tmp_path / "report")
    assert f"was trained on every image of {data}: figures on this folder are optimistic" in (
        caplog.text
    )


def test_close_up_holds_the_mask_and_the_peak_with_a_margin() -> None:
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:50, 60:70] = True
    rows, columns = close_up(mask, (90, 45))  # peak (column, row) right of the mask
    assert rows.start <= 40 and rows.stop >= 50 and columns.start <= 60 and columns.stop > 90
    assert columns.start >= 60 - 16 and columns.stop <= 90 + 16  # margin: 8 px or a quarter
    assert abs((rows.stop - rows.start) - (columns.stop - columns.start)) <= 1  # square
    rows, columns = close_up(mask, (119, 99))  # clipped at the image edge
    assert rows.stop == 100 and columns.stop == 120
    rows, columns = close_up(np.zeros_like(mask), (30, 20))  # no mask: around the peak
    assert (rows.start, rows.stop, columns.start, columns.stop) == (11, 29, 21, 39)


def test_lesion_tile_marks_the_outline_green_and_the_peak_red() -> None:
    rgb = np.full((32, 32, 3), 100, dtype=np.uint8)
    outline = np.zeros((32, 32), dtype=bool)
    outline[4, 4:10] = True
    tile = np.asarray(lesion_tile(rgb, outline, (20, 24)))
    factor = 256 // 32
    assert tile.shape == (256, 256, 3)
    assert tuple(tile[4 * factor + 1, 6 * factor + 1]) == (0, 220, 0)
    assert tuple(tile[24 * factor + 4, 20 * factor + 4]) == (255, 0, 0)
    assert tuple(tile[2, 2]) == (100, 100, 100)


def test_set_explanation_changes_the_card_not_the_weights(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path / "m", body_part="SPINE", num_classes=2, channels=1)
    recipe = {"gradcam_layer": "features", "notes": "trained", "model": {"version": "0.0.1"}}
    card = card.model_copy(update={"recipe": recipe})
    write_card(tmp_path / "m", card)
    spec = GradCamSpec(target_layer="features.0+features.1", method="layercam", shift=2)
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
    assert updated.recipe["gradcam_shift"] == 2
    assert updated.recipe["notes"] == "trained chosen on a selection set"
    assert updated.recipe["model"] == {"version": "0.0.2"}
    predictor = Predictor.load(tmp_path / "m", updated, "cpu")
    assert predictor.identity.explanation == (
        "LayerCAM at features.0+features.1, mean of 13 copies shifted up to 2 px"
    )


def test_the_pointing_game_knows_training_images_by_their_pixels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With the model's list of training images, those among the abnormal images are counted
    (a warning) or, ``unseen_only``, left out of the game."""
    data = write_phantom_folder(tmp_path / "spine", body_part="SPINE", count=8, seed=3, size=64)
    model = tmp_path / "m"
    make_tiny_model(model, body_part="SPINE", num_classes=2, channels=1)
    with (data / "phantoms.csv").open() as handle:
        abnormal = [r for r in csv.DictReader(handle) if r["mask"]]
    seen = [
        pixel_digest(read_image_file(data / r["label"] / f"{r['id']}.png").pixels)
        for r in abnormal[:2]
    ]
    listed = TrainingImages(frozenset(seen), frozenset(), str(data), "test")
    write_training_images(model, listed, load_card(model).weights.sha256)
    with caplog.at_level("WARNING", logger="dicomnode.training.fingerprint"):
        whole = pointing_game(model, data)
    assert whole["abnormal_images"] == len(abnormal)
    assert f"2 of the {len(abnormal)} images scored have the same pixels" in caplog.text
    unseen = pointing_game(model, data, unseen_only=True)
    assert unseen["abnormal_images"] == len(abnormal) - 2
    assert [r["id"] for r in unseen["images"]] == [r["id"] for r in abnormal[2:]]
    # The same through the command.
    out = tmp_path / "game.json"
    args = ["pointing", str(model), str(data), "--unseen-only", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (game,) = json.loads(out.read_text(encoding="utf-8"))
    assert game["abnormal_images"] == len(abnormal) - 2
