"""A staged recipe's cross-validation: each fold starts from the previous stage's model of that
fold, never from weights that trained on the fold it holds out (dicomnode.training.lineage)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.errors import TrainingError
from dicomnode.models.card import load_card, sha256_of, write_card
from dicomnode.testing.recipes import smoke_recipe
from dicomnode.training.ensemble import build_ensemble
from dicomnode.training.evaluate import evaluate_model
from dicomnode.training.fingerprint import TRAINING_IMAGES_FILE
from dicomnode.training.recipe_cv import RECORD, record_cross_validation
from dicomnode.training.tiny import write_tiny_dataset
from dicomnode.training.train import train_from_config

WEIGHTS = "model.safetensors"


def _recipe(tmp_path: Path, data: Path, stage: str, **overrides: Any) -> Path:
    """The tiny-smoke recipe on ``data``, writing under ``tmp_path/stage``: 3 folds, 1 epoch."""
    overrides = {"cache_dir": str(tmp_path / "cache"), "folds": 3, "epochs": 1, **overrides}
    return smoke_recipe(tmp_path / f"{stage}.yaml", data, tmp_path / stage, **overrides)


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the data folder, stage 1 trained on all 3 folds: ``model/fold-K``)."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=9, size=32)
    return data, train_from_config(_recipe(tmp_path, data, "one", fold="all"))


def _stage_two(tmp_path: Path, data: Path, stage_one: Path, **overrides: Any) -> Path:
    """Stage 2: fine-tune from stage 1's fold-0 model (as a shipped recipe names it)."""
    init = str(stage_one / "fold-0" / WEIGHTS)
    return _recipe(tmp_path, data, "two", mode="finetune", init_weights=init, **overrides)


def test_a_fold_starts_only_from_weights_that_held_it_out(
    tmp_path: Path, stage_one: tuple[Path, Path]
) -> None:
    data, one = stage_one
    recipe = _stage_two(tmp_path, data, one)
    # The recipe's own start (fold 0's stage 1) trained on fold 1: a fold-1 run is refused
    # before anything is written, naming both folds.
    with pytest.raises(TrainingError, match=r"fold 0 held out: fold 1 is among its training"):
        train_from_config(recipe, fold="1")
    assert not (tmp_path / "two").exists()
    # From stage 1's own fold-1 model it trains, and the card says what it started from.
    start = one / "fold-1" / WEIGHTS
    out = train_from_config(recipe, fold="1", init_weights=str(start))
    card = load_card(out)
    assert out == tmp_path / "two" / "model" / "fold-1"
    assert card.metrics["fold"] == 1 and card.recipe["init_weights"] == str(start)
    first = load_card(one / "fold-1")
    assert card.recipe["init_weights_from"] == {
        "name": first.name,
        "version": first.version,
        "sha256": sha256_of(start),
        "data_dir": str(data),
        "fold": 1,
    }
    # A run of every fold cannot start from one fold's model.
    with pytest.raises(TrainingError, match=r"fold 1 held out: fold 0 is among its training"):
        train_from_config(recipe, fold="all", init_weights=str(start), output_dir=tmp_path / "x")


def test_weights_of_another_split_or_another_folder(
    tmp_path: Path, stage_one: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data, one = stage_one
    # Another split of the same folder (seed): its fold 1 holds other images.
    recipe = _stage_two(tmp_path, data, one, seed=5)
    with pytest.raises(TrainingError, match=r"with seed 0, the recipe 5: its held-out fold 1"):
        train_from_config(recipe, fold="1", init_weights=str(one / "fold-1" / WEIGHTS))
    # A model of another folder (pretraining on other images) is not the split's business.
    other = write_tiny_dataset(tmp_path / "other", classes=3, patients=9, size=32, seed=1)
    elsewhere = train_from_config(_recipe(tmp_path, other, "elsewhere"))
    out = train_from_config(
        _stage_two(tmp_path, data, one), fold="2", init_weights=str(elsewhere / WEIGHTS)
    )
    begun = load_card(out).recipe["init_weights_from"]
    assert (begun["fold"], begun["data_dir"]) == (0, str(other))
    # Scored on that other folder, its figures are said to be optimistic too: by the pixels
    # of the 36 images its start trained on (folds 1 and 2 of 3)...
    figures = evaluate_model(out, other)
    assert figures["training_overlap"] == {
        "images": 54, "trained_on": 36, "near_copies": 0, "held_out": 18,
        "trained_on_left_out": False,
    }  # fmt: skip
    assert figures["training_images"].startswith(
        "36 of the 54 images scored have the same pixels as images tiny-smoke 0.0.1 trained on"
    )
    # ... or, without its list of training images, by the folder its start trained on.
    (out / TRAINING_IMAGES_FILE).unlink()
    assert evaluate_model(out, other)["training_images"].startswith(
        "tiny-smoke 0.0.1 started from tiny-smoke 0.0.1, which was trained on every image but "
        "fold 0 of"
    )
    # Weights without their card cannot be checked: the run goes on and says so.
    loose = tmp_path / "loose.safetensors"
    shutil.copyfile(one / "fold-0" / WEIGHTS, loose)
    with caplog.at_level("WARNING", logger="dicomnode.training.lineage"):
        out = train_from_config(
            _stage_two(tmp_path, data, one), fold="1", init_weights=str(loose), version="0.0.9"
        )
    assert "has no model card beside it" in caplog.text
    assert load_card(out).recipe["init_weights_from"] is None
    # Nor can weights that are not the ones their card describes.
    caplog.clear()
    changed = tmp_path / "changed"
    shutil.copytree(one / "fold-1", changed)
    shutil.copyfile(one / "fold-0" / WEIGHTS, changed / WEIGHTS)
    with caplog.at_level("WARNING", logger="dicomnode.training.lineage"):
        out = train_from_config(
            _stage_two(tmp_path, data, one), fold="1", init_weights=str(changed / WEIGHTS),
            version="0.0.10",
        )  # fmt: skip
    assert "has no model card beside it" in caplog.text


def test_a_staged_recipe_records_its_cross_validation(
    tmp_path: Path, stage_one: tuple[Path, Path]
) -> None:
    """Stage 2's folds, each from stage 1's model of that fold, trained through the CLI (two
    later under a version of their own), are the folds of one recipe for record-cv."""
    data, one = stage_one
    recipe = _stage_two(tmp_path, data, one)
    runner = CliRunner()
    folds = []
    # The recipe's fold 0 first (a shipped model), the others later beside it under a version
    # of their own (the recipe's is taken).
    # Fold 2 as a small CPU runs it beside another: one thread, bfloat16 (the run's settings).
    run = ["--threads", "1", "--precision", "bfloat16"]
    for fold, version in ((0, []), (1, ["--version", "0.0.2"]), (2, ["--version", "0.0.2", *run])):
        start = str(one / f"fold-{fold}" / WEIGHTS)
        args = ["train", str(recipe), "--fold", str(fold), "--init-weights", start, *version]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        folds.append(tmp_path / "two" / "model" / ("" if fold == 0 else f"fold-{fold}"))
    third = load_card(folds[2])
    assert third.version == "0.0.2"
    assert (third.recipe["num_threads"], third.recipe["precision"]) == (1, "bfloat16")
    assert load_card(folds[1]).recipe["precision"] != "bfloat16"
    record_cross_validation(folds[0], folds[1:], "9.9.9")
    record = load_card(folds[0]).metrics[RECORD]
    assert record["folds"] == [0, 1, 2]
    assert "each from the weights of its own fold (init_weights_per_fold)" in record["validation"]
    assert record["init_weights_per_fold"] == [str(one / f"fold-{k}" / WEIGHTS) for k in range(3)]
    # A fold whose card says it started from a model of another fold is not one of them.
    card = load_card(folds[2])
    wrong = {**card.recipe["init_weights_from"], "fold": 1}
    recipe_now = {**card.recipe, "init_weights_from": wrong}
    write_card(folds[2], card.model_copy(update={"recipe": recipe_now}))
    with pytest.raises(TrainingError, match="not the models of different folds"):
        record_cross_validation(folds[0], folds[1:], "9.9.10")


def test_evaluate_says_when_the_model_trained_on_the_folder(
    tmp_path: Path, stage_one: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, one = stage_one
    # By the folder's path when the model directory does not list its training images.
    listless = tmp_path / "listless"
    shutil.copytree(one / "fold-1", listless)
    (listless / TRAINING_IMAGES_FILE).unlink()
    monkeypatch.chdir(data.parent)  # the folder named another way: the same folder
    figures = evaluate_model(listless, Path(data.name))
    assert figures["training_images"].startswith(
        "tiny-smoke 0.0.1 was trained on every image but fold 1 of data: figures on this "
        "folder are optimistic"
    )
    assert "training_overlap" not in figures
    # The ensemble of the fold models has seen every image of it (its members' lists joined).
    folds = [one / f"fold-{k}" for k in range(3)]
    ensemble = build_ensemble(folds, tmp_path / "ens", method="average", name="e", version="1")
    assert evaluate_model(ensemble, data)["training_overlap"]["trained_on"] == 54
    build_ensemble(
        [folds[0], listless, folds[2]], tmp_path / "ens", method="average", name="e", version="2"
    )
    assert not (tmp_path / "ens" / TRAINING_IMAGES_FILE).exists()  # one member's unknown
    assert "was trained on every image of" in evaluate_model(ensemble, data)["training_images"]
    # Another folder is not the model's business.
    other = write_tiny_dataset(tmp_path / "other", classes=3, patients=9, size=32, seed=1)
    figures = evaluate_model(one / "fold-1", other)
    assert "training_images" not in figures
    assert figures["training_overlap"]["trained_on"] == 0
