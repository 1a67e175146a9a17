"""The images a model trained on, known by their pixels (dicomnode.training.fingerprint): copies
under other names are recognised, --unseen-only leaves them out, and `dicomnode fingerprint`
lists them for a model trained before training did."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from pydicom.uid import RLELossless, generate_uid
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.errors import TrainingError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.inference import Predictor
from dicomnode.models.card import load_card
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.recipes import smoke_recipe
from dicomnode.training.config import DEFAULT_GROUP_PATTERN
from dicomnode.training.data import (
    Fingerprints,
    LabelledImages,
    cache_key,
    image_fingerprints,
    pixel_digest,
    read_labelled,
    scan_folder,
)
from dicomnode.training.ensemble import build_ensemble
from dicomnode.training.evaluate import evaluate_model
from dicomnode.training.fingerprint import (
    TRAINING_IMAGES_FILE,
    Overlap,
    TrainingImages,
    fingerprint_model,
    of_fold,
    read_training_images,
)
from dicomnode.training.folds import assign_folds
from dicomnode.training.tiny import write_tiny_dataset
from dicomnode.training.train import train_from_config
from dicomnode.values import PreparedImage

FOLDS, SEED = 3, 0


def _recipe(tmp_path: Path, data: Path, **overrides: Any) -> Path:
    """The smoke recipe on ``data`` writing under ``tmp_path``: 3 folds, 1 epoch."""
    overrides = {"folds": FOLDS, "seed": SEED, "epochs": 1, **overrides}
    return smoke_recipe(tmp_path / "recipe.yaml", data, tmp_path, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the data folder, its 3 fold models ``model/fold-K`` trained by one run)."""
    tmp_path = tmp_path_factory.mktemp("fingerprint")
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=9, size=32)
    return data, train_from_config(_recipe(tmp_path, data, fold="all"))


def _folds_of(data: Path) -> tuple[list[Path], list[str], np.ndarray[Any, Any]]:
    """Every file of ``data``, its digest computed here, and its fold in the recipe's split."""
    images = scan_folder(data, 3, DEFAULT_GROUP_PATTERN)
    digests = [pixel_digest(read_labelled(path).pixels) for path in images.paths]
    return list(images.paths), digests, assign_folds(images.labels, images.groups, FOLDS, SEED)


def test_the_digest_is_the_images_not_the_files(tmp_path: Path) -> None:
    data = write_tiny_dataset(tmp_path / "data", classes=2, patients=2, size=16)
    first = sorted((data / "0").iterdir())[0]
    pixels = np.asarray(Image.open(first))
    # The same picture under another name, and re-encoded as a 16-bit PNG: the same image.
    copy = tmp_path / "copy" / "0" / "renamed.png"
    copy.parent.mkdir(parents=True)
    shutil.copyfile(first, copy)
    wide = tmp_path / "copy" / "0" / "wide.png"
    Image.fromarray(pixels.astype(np.uint16) * 257).save(wide)
    assert Image.open(wide).mode.startswith("I")  # really 16-bit
    # One grey level changed in one pixel: another image.
    changed = pixels.copy()
    changed[0, 0] ^= 1
    Image.fromarray(changed).save(tmp_path / "copy" / "0" / "changed.png")
    digest = {p.name: pixel_digest(read_labelled(p).pixels) for p in (first, copy, wide)}
    assert len(set(digest.values())) == 1 and len(digest[first.name]) == 16
    folder = scan_folder(tmp_path / "copy", 2, DEFAULT_GROUP_PATTERN, every_class=False)
    listed = image_fingerprints(folder).digests
    assert sorted(listed).count(digest[first.name]) == 2 and len(set(listed)) == 2


def test_training_lists_what_each_fold_trained_on_and_held_out(
    trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data, model = trained
    _, digests, fold_of = _folds_of(data)
    for fold in range(FOLDS):
        listed = read_training_images(model / f"fold-{fold}")
        assert listed is not None and listed.made.startswith("at training, ")
        assert listed.trained_on == {d for d, k in zip(digests, fold_of, strict=True) if k != fold}
        assert listed.held_out == {d for d, k in zip(digests, fold_of, strict=True) if k == fold}
        assert listed.data_dir == str(data)
    # The top directory is fold 0's weights, so it lists fold 0's images.
    assert read_training_images(model) == read_training_images(model / "fold-0")
    # The digests were kept with the pixel cache: hashing the folder again decodes nothing.
    with caplog.at_level("INFO", logger="dicomnode.training.data"):
        images = scan_folder(data, 3, DEFAULT_GROUP_PATTERN)
        assert list(image_fingerprints(images, model.parent / "cache").digests) == digests
    assert "hashing the pixels" not in caplog.text
    # A cache kept before the near hashes were is hashed again, and kept with them.
    kept = model.parent / "cache" / f"digests-{cache_key(images)}.json"
    fresh = image_fingerprints(images)
    kept.write_text(json.dumps({"digest": "…", "digests": digests}), encoding="utf-8")
    with caplog.at_level("INFO", logger="dicomnode.training.data"):
        assert image_fingerprints(images, kept.parent) == fresh
    assert "hashing the pixels" in caplog.text
    assert json.loads(kept.read_text(encoding="utf-8"))["near"] == list(fresh.near)


def test_an_image_filed_twice_across_folds_counts_as_trained_on(tmp_path: Path) -> None:
    assignment = np.asarray([0, 0, 1, 1, 2], dtype=np.int64)
    near = {"a": "0" * 64, "b": "0" * 62 + "ff", "c": "0f" * 32, "e": "f0" * 32}
    found = Fingerprints(("a", "b", "c", "a", "e"), tuple(near[k] for k in "abcae"))
    listed = of_fold(found, assignment, 0, tmp_path, "now")
    assert listed.to_json()["held_out"] == ["b"]  # "a" is among the images trained on
    assert listed.trained_on == {"a", "c", "e"}
    assert listed.near == {near[k] for k in "ace"}
    # "a" (trained on) and "b" (held out) differ in 8 bits, and "c" and "e" lie 128 from
    # their nearest: under a third of the median (68), "a" and "b" are near copies of each
    # other, so they do not set the threshold (half of 128), and "b" counts as a near copy.
    assert listed.near_threshold == 64
    asked = Fingerprints(("x", "y", "z"), (near["b"], "0" * 63 + "7", "0f" * 16 + "f0" * 16))
    assert listed.recognised(asked).tolist() == [True, True, False]  # "z": 128 from each
    # Joined with another list, the threshold is also that of pairs across the two (40 bits
    # from "c"), but a near copy across them (1 bit from "a") does not shrink it to 0 (it
    # is 127 bits from "c").
    across = f"{int(near['c'], 16) ^ ((1 << 40) - 1):064x}"
    other = replace(listed, near=frozenset({across}), near_threshold=100)
    assert listed.joined(other).near_threshold == 20
    copy = replace(listed, near=frozenset({"0" * 63 + "1"}), near_threshold=100)
    assert listed.joined(copy).near_threshold == 63
    assert (
        replace(listed, near_threshold=9).joined(replace(listed, near_threshold=5)).near_threshold
        == 5
    )
    # A list written before the near hashes were kept: none, and no near copy found.
    older = {k: v for k, v in listed.to_json().items() if not k.startswith("near")}
    assert TrainingImages.from_json(older).near == frozenset()
    assert TrainingImages.from_json(older).near_threshold == 0


def _mixed_folder(tmp_path: Path, data: Path) -> tuple[Path, dict[str, int]]:
    """A test folder of fold 1's training images renamed, its held-out images and new ones."""
    paths, _, fold_of = _folds_of(data)
    mixed = tmp_path / "mixed"
    new = write_tiny_dataset(tmp_path / "new", classes=3, patients=1, size=32, seed=7)
    counts = {"trained": 0, "held": 0, "new": 0}
    for index, (path, fold) in enumerate(zip(paths, fold_of, strict=True)):
        if index % 3:  # every third image
            continue
        kind = "held" if fold == 1 else "trained"
        target = mixed / path.parent.name / f"{9100000 + index}{'LR'[index % 2]}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        counts[kind] += 1
    for path in sorted(new.rglob("*.png")):
        shutil.copyfile(path, mixed / path.parent.name / f"new-{path.name}")
        counts["new"] += 1
    return mixed, counts


def test_evaluate_recognises_training_images_under_other_names(
    tmp_path: Path, trained: tuple[Path, Path]
) -> None:
    data, model = trained
    mixed, counts = _mixed_folder(tmp_path, data)
    total = sum(counts.values())
    figures = evaluate_model(model / "fold-1", mixed)
    assert figures["training_overlap"] == {
        "images": total,
        "trained_on": counts["trained"],
        "near_copies": 0,
        "held_out": counts["held"],
        "trained_on_left_out": False,
    }
    assert figures["training_images"].startswith(
        f"{counts['trained']} of the {total} images scored have the same pixels as images "
        "tiny-smoke 0.0.1 trained on"
    )
    # --unseen-only scores the others, and says what it left out.
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(model / "fold-1"), str(mixed), "--unseen-only", "--predictions", str(out)],
    )
    assert result.exit_code == 0, result.output
    with out.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == counts["held"] + counts["new"]
    _, digests, fold_of = _folds_of(data)
    trained_on = {d for d, k in zip(digests, fold_of, strict=True) if k != 1}
    kept = [pixel_digest(read_labelled(Path(row["path"])).pixels) for row in rows]
    assert not trained_on & set(kept)
    assert sum(not Path(row["path"]).name.startswith("new-") for row in rows) == counts["held"]
    assert "were left out (--unseen-only)" in " ".join(result.output.split())
    assert "None of the" not in result.output
    # Images it never saw: the report says so.
    clean = evaluate_model(model / "fold-1", tmp_path / "new", report=tmp_path / "report")
    assert "training_images" not in clean and clean["training_overlap"]["trained_on"] == 0
    summary = (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")
    assert f"None of the {counts['new']} images scored is one the model trained on" in summary


def test_evaluate_recognises_lossy_copies_of_training_images(
    tmp_path: Path, trained: tuple[Path, Path]
) -> None:
    """A JPEG re-encoding of a training image has other pixels: its near hash finds it, and
    finds no copy of an image the model held out."""
    data, model = trained
    paths, _, fold_of = _folds_of(data)
    listed = read_training_images(model / "fold-1")
    assert listed is not None and listed.near_threshold > 0
    lossy = tmp_path / "lossy"
    counts = {"trained": 0, "held": 0}
    for index, (path, fold) in enumerate(zip(paths, fold_of, strict=True)):
        if index % 2:
            continue
        target = lossy / path.parent.name / f"{path.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(target, "JPEG", quality=95)
        counts["held" if fold == 1 else "trained"] += 1
    figures = evaluate_model(model / "fold-1", lossy)
    assert figures["training_overlap"] == {
        "images": counts["trained"] + counts["held"],
        "trained_on": 0,
        "near_copies": counts["trained"],
        "held_out": 0,
        "trained_on_left_out": False,
    }
    assert figures["training_images"].startswith(
        f"{counts['trained']} of the {counts['trained'] + counts['held']} images scored are "
        "near copies of images tiny-smoke 0.0.1 trained on (a lossy re-encoding"
    )
    out = tmp_path / "unseen.csv"
    evaluate_model(model / "fold-1", lossy, unseen_only=True, predictions=out)
    with out.open(encoding="utf-8") as handle:
        kept = {Path(row["path"]).stem for row in csv.DictReader(handle)}
    held = {p.stem for p, fold in zip(paths, fold_of, strict=True) if fold == 1}
    assert len(kept) == counts["held"] and kept <= held


def test_the_warning_counts_copies_and_near_copies(trained: tuple[Path, Path]) -> None:
    card = load_card(trained[1] / "fold-1")
    lossy = "2 near copies: a lossy re-encoding, a resize or another window, by a perceptual hash"
    assert Overlap(10, 3, 1, near_copies=2).sentence(card) == (
        f"5 of the 10 images scored are images tiny-smoke 0.0.1 trained on (3 with the same "
        f"pixels, {lossy}): figures on them are optimistic (--unseen-only scores the other 5)"
    )
    assert Overlap(10, 3, 1, left_out=True, near_copies=2).sentence(card) == (
        f"5 of the 10 images are images tiny-smoke 0.0.1 trained on (3 with the same pixels, "
        f"{lossy}) and were left out (--unseen-only): the figures are on the other 5"
    )
    assert Overlap(10, 0, 4).sentence(card) == ""


def test_unseen_only_needs_the_list_and_something_left(
    tmp_path: Path, trained: tuple[Path, Path]
) -> None:
    data, model = trained
    ensemble = build_ensemble(
        [model / f"fold-{k}" for k in range(FOLDS)], tmp_path / "ens", method="average",
        name="e", version="1",
    )  # fmt: skip
    with pytest.raises(TrainingError, match="trained on every one of the 54 images"):
        evaluate_model(ensemble, data, unseen_only=True)
    warning = evaluate_model(ensemble, data)["training_images"]
    assert warning.startswith("54 of the 54 images scored") and "(every one of them)" in warning
    (ensemble / TRAINING_IMAGES_FILE).unlink()
    with pytest.raises(TrainingError, match=r"has no training-images.json.*dicomnode fingerprint"):
        evaluate_model(ensemble, data, unseen_only=True)


def test_a_list_of_other_weights_is_not_used(
    tmp_path: Path, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """New weights in a directory whose list was left behind: the list is not theirs."""
    _, model = trained
    replaced = tmp_path / "replaced"
    shutil.copytree(model / "fold-1", replaced)
    for name in ("model.safetensors", "model.yaml"):
        shutil.copyfile(model / "fold-2" / name, replaced / name)
    with caplog.at_level("WARNING", logger="dicomnode.training.fingerprint"):
        assert read_training_images(replaced) is None
    assert "lists the training images of other weights" in caplog.text
    shutil.copyfile(model / "fold-2" / TRAINING_IMAGES_FILE, replaced / TRAINING_IMAGES_FILE)
    assert read_training_images(replaced) == read_training_images(model / "fold-2")


def test_fingerprint_lists_an_older_models_images_from_its_recipe(
    tmp_path: Path, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model = trained
    older = tmp_path / "older"
    shutil.copytree(model / "fold-2", older)
    at_training = read_training_images(older)
    (older / TRAINING_IMAGES_FILE).unlink()
    runner = CliRunner()
    result = runner.invoke(app, ["fingerprint", str(older)])
    assert result.exit_code == 0, result.output
    assert "36 images trained on, 18 held out" in " ".join(result.output.split())
    listed = read_training_images(older)
    assert listed is not None and at_training is not None
    assert (listed.trained_on, listed.held_out) == (at_training.trained_on, at_training.held_out)
    assert listed.made.startswith("afterwards, ")
    # An ensemble of the folds: every image trained on by some member.
    ensemble = build_ensemble(
        [model / f"fold-{k}" for k in range(FOLDS)], tmp_path / "ens", method="average",
        name="e", version="1",
    )  # fmt: skip
    (ensemble / TRAINING_IMAGES_FILE).unlink()
    result = runner.invoke(app, ["fingerprint", str(ensemble)])
    assert result.exit_code == 0, result.output
    assert "54 images trained on, 0 held out" in " ".join(result.output.split())
    # A copy of the folder elsewhere is named with --data-dir; a folder that is not the one
    # the card was trained on (an image gone) is refused, naming the fold that differs.
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    result = runner.invoke(app, ["fingerprint", str(older), "--data-dir", str(copy)])
    assert result.exit_code == 0, result.output
    paths, _, fold_of = _folds_of(data)
    gone = next(p for p, k in zip(paths, fold_of, strict=True) if k == 2)
    (copy / gone.relative_to(data)).unlink()
    hashed: list[int] = []

    def counted(images: LabelledImages) -> Fingerprints:
        hashed.append(len(images))
        return image_fingerprints(images)

    monkeypatch.setattr("dicomnode.training.fingerprint.image_fingerprints", counted)
    with pytest.raises(TrainingError, match="is not the folder the card was trained on"):
        fingerprint_model(older, copy)
    assert hashed == []  # refused before any image of it was decoded
    written = json.loads((older / TRAINING_IMAGES_FILE).read_text(encoding="utf-8"))
    assert len(written["trained_on"]) == 36  # the refused run left the list as it was


def test_fingerprint_lists_a_model_trained_on_every_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``fold: none`` card holds no figures to check the folder against: every image of it
    is listed as trained on, with a warning that says so."""
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=2, size=32)
    model = train_from_config(_recipe(tmp_path, data, fold="none"))
    at_training = read_training_images(model)
    assert at_training is not None and len(at_training.trained_on) == 12
    (model / TRAINING_IMAGES_FILE).unlink()
    with caplog.at_level("WARNING"):
        listed = fingerprint_model(model)
    assert "trained on every image of its folder (fold: none)" in caplog.text
    assert (listed.trained_on, listed.held_out) == (at_training.trained_on, frozenset())
    assert listed.near == at_training.near and listed.near_threshold > 0


def test_weights_that_trained_on_a_copy_of_a_held_out_fold_are_refused(
    tmp_path: Path, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The folder check cannot see a copy of the folder, or a lossy export of it; the pixels
    and the near hashes can: a start, or an ensemble member, that trained on the images of the
    fold a run holds out is refused."""
    data, model = trained
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    recipe = _recipe(tmp_path / "two", copy, mode="finetune")
    fold_zero = str(model / "fold-0" / "model.safetensors")  # trained on folds 1 and 2
    with pytest.raises(TrainingError, match=r"trained on 18 of the 18 images of fold 1 \(the same"):
        train_from_config(recipe, fold="1", init_weights=fold_zero)
    assert not (tmp_path / "two" / "model").exists()
    # A JPEG export of the folder: other pixels, the same pictures (near copies).
    lossy = tmp_path / "lossy"
    for path in sorted(data.rglob("*.png")):
        target = lossy / path.relative_to(data).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(target, "JPEG", quality=95)
    exported = _recipe(tmp_path / "lossy-run", lossy, mode="finetune")
    with pytest.raises(TrainingError, match=r"trained on 18 of the 18 images of fold 1 \(the same"):
        train_from_config(exported, fold="1", init_weights=fold_zero)
    out = train_from_config(recipe, fold="0", init_weights=fold_zero)  # fold 0 it held out
    # Its list holds its start's images too: the copy's and the original's are the same.
    listed = read_training_images(out)
    start = read_training_images(model / "fold-0")
    assert listed is not None and start is not None and listed.trained_on == start.trained_on
    # A start without a list (a model trained before lists were written) is named.
    shutil.copytree(model / "fold-0", tmp_path / "unlisted")
    (tmp_path / "unlisted" / TRAINING_IMAGES_FILE).unlink()
    with caplog.at_level("WARNING"):
        unlisted = train_from_config(
            _recipe(tmp_path / "five", copy, mode="finetune"),
            fold="0",
            init_weights=str(tmp_path / "unlisted" / "model.safetensors"),
        )
    named = f"unlisted lists no images it trained on ({TRAINING_IMAGES_FILE})"
    assert sum(named in m for m in caplog.messages) == 1  # once a run, at its start check
    own = read_training_images(unlisted)  # its own fold's: here the same images as its start's
    assert own is not None and own.trained_on == listed.trained_on
    # An ensemble scored on a fold of the copy that one member trained on.
    other = write_tiny_dataset(tmp_path / "other", classes=3, patients=9, size=32, seed=1)
    elsewhere = train_from_config(_recipe(tmp_path / "three", other))
    members = [model / "fold-1", elsewhere]
    with pytest.raises(TrainingError, match=r"member .*fold-1 trained on 18 of the 18 images"):
        build_ensemble(
            members, tmp_path / "ens", method="average", name="e", version="1",
            validate_on=_recipe(tmp_path / "four", copy), validate_fold=0,
        )  # fmt: skip
    assert not (tmp_path / "ens").exists()
    ensemble = build_ensemble(
        members, tmp_path / "ens", method="average", name="e", version="1",
        validate_on=_recipe(tmp_path / "four", copy), validate_fold=1,
    )  # fmt: skip
    assert load_card(ensemble).metrics["held_out"]["n"] == 18


def test_a_radiograph_sent_again_is_the_same_image(tmp_path: Path) -> None:
    """The same DICOM image re-sent by a PACS (new UIDs, another patient id on a merge,
    RLE-compressed) decodes to the same pixels, so it has the same digest."""
    first = write_dataset(make_radiograph(seed=3, rows=64, columns=48), tmp_path / "a.dcm")
    again = make_radiograph(
        seed=3, rows=64, columns=48, study_uid=generate_uid(), sop_uid=generate_uid(),
        patient_id="MERGED01",
    )  # fmt: skip
    again.compress(RLELossless)
    second = write_dataset(again, tmp_path / "b.dcm")
    other = write_dataset(make_radiograph(seed=4, rows=64, columns=48), tmp_path / "c.dcm")
    a, b, c = (pixel_digest(read_labelled(path).pixels) for path in (first, second, other))
    assert a == b != c
    assert first.read_bytes() != second.read_bytes()


@pytest.mark.parametrize("unseen_only", [False, True])
def test_evaluate_decodes_each_image_once(
    trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, unseen_only: bool
) -> None:
    """Each image is hashed in the decoding that scores it, with --unseen-only too (the
    images trained on are decoded and hashed, not scored)."""
    data, model = trained
    decoded: list[Path] = []
    scored: list[int] = []
    forward = Predictor.forward_probabilities

    def counted(path: Path) -> PreparedImage:
        decoded.append(path)
        return read_image_file(path)

    def counted_forward(self: Predictor, batch: torch.Tensor) -> npt.NDArray[np.float64]:
        scored.append(len(batch))
        return forward(self, batch)

    monkeypatch.setattr("dicomnode.imaging.pixels.read_image_file", counted)
    monkeypatch.setattr(Predictor, "forward_probabilities", counted_forward)
    figures = evaluate_model(model / "fold-1", data, unseen_only=unseen_only)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 54
    assert figures["training_overlap"] == {
        "images": 54, "trained_on": 36, "near_copies": 0, "held_out": 18,
        "trained_on_left_out": unseen_only,
    }  # fmt: skip
    assert sum(scored) == (18 if unseen_only else 54)


def test_training_warns_of_an_image_filed_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same picture, or a near copy of it, under another label or for another patient
    is named before training (the labels disagree; the folds may split the two)."""
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=4, size=32)
    shutil.copyfile(data / "0" / "9000000L.png", data / "1" / "9001009L.png")  # another label
    # Two files of class 2 replaced by copies of another patient's images.
    shutil.copyfile(data / "2" / "9002001R.png", data / "2" / "9002003L.png")
    shutil.copyfile(data / "2" / "9002001L.png", data / "2" / "9002000L.png")
    # Near copies (JPEG at quality 90): under another label, and as another patient's file.
    Image.open(data / "0" / "9000001R.png").save(data / "1" / "9001010L.jpg", quality=90)
    Image.open(data / "0" / "9000002R.png").save(data / "0" / "9000003L.jpg", quality=90)
    (data / "0" / "9000003L.png").unlink()
    images = scan_folder(data, 3, DEFAULT_GROUP_PATTERN)
    fold_of = dict(
        zip(
            (p.relative_to(data).as_posix() for p in images.paths),
            assign_folds(images.labels, images.groups, 2, SEED).tolist(),
            strict=True,
        )
    )
    pairs = [("2/9002003L.png", "2/9002001R.png"), ("2/9002000L.png", "2/9002001L.png")]
    split = sum(fold_of[a] != fold_of[b] for a, b in pairs)
    near_split = int(fold_of["0/9000003L.jpg"] != fold_of["0/9000002R.png"])
    with caplog.at_level("WARNING"):
        model = train_from_config(_recipe(tmp_path, data, folds=2))
    assert "1 files hold the same image as another file of another class" in caplog.text
    assert "1/9001009L.png = 0/9000000L.png" in caplog.text
    elsewhere = "2 files hold the same image as another patient's file (the folds may split"
    assert elsewhere in caplog.text
    assert f"; {split} of them in another fold than their copy" in caplog.text
    near = "1 files hold a near copy of the image of another file of another class (a lossy"
    assert near in caplog.text and "1/9001010L.jpg = 0/9000001R.png" in caplog.text
    near_elsewhere = "1 files hold a near copy of the image of another patient's file (a lossy"
    assert near_elsewhere in caplog.text and "0/9000003L.jpg = 0/9000002R.png" in caplog.text
    assert f"; {near_split} of them in another fold than their copy" in caplog.text
    # Said once in the run, and once by `dicomnode fingerprint`, which lists the same images.
    assert caplog.text.count("another patient's file") == 2
    at_training = read_training_images(model)
    assert at_training is not None
    caplog.clear()
    with caplog.at_level("WARNING"):
        fingerprint_model(model)
    assert caplog.text.count(elsewhere) == 1 and caplog.text.count(near_elsewhere) == 1
    afterwards = read_training_images(model)
    assert afterwards is not None and afterwards.made != at_training.made
    assert replace(afterwards, made="") == replace(at_training, made="")


def test_group_copies_keeps_the_files_of_one_image_in_one_fold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``group_copies``, files that hold one image (the same pixels, or a JPEG copy)
    for two patients are one patient to the split; `dicomnode fingerprint` splits the same."""
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=8, size=32)
    pairs = []
    for label in "012":
        for source, target in (("1L", "4R"), ("2R", "5L"), ("3L", "6R")):
            original = data / label / f"900{label}00{source}.png"
            copy = data / label / f"900{label}00{target}.png"
            if source == "2R":  # a near copy: JPEG at quality 90
                copy.unlink()
                copy = copy.with_suffix(".jpg")
                Image.open(original).save(copy, quality=90)
            else:
                shutil.copyfile(original, copy)
            pairs.append((copy.relative_to(data).as_posix(), original.relative_to(data).as_posix()))
    images = scan_folder(data, 3, DEFAULT_GROUP_PATTERN)
    names = [p.relative_to(data).as_posix() for p in images.paths]
    by_patient = dict(zip(names, assign_folds(images.labels, images.groups, 2, SEED), strict=True))
    assert any(by_patient[a] != by_patient[b] for a, b in pairs)  # the plain split parts some
    digest = {name: pixel_digest(read_labelled(data / name).pixels) for name in names}
    with caplog.at_level("WARNING"):
        model = train_from_config(_recipe(tmp_path, data, folds=2, group_copies=True))
    assert "6 files hold the same image as another patient's file" in caplog.text
    assert "3 files hold a near copy of the image of another patient's file" in caplog.text
    assert caplog.text.count("; 0 of them in another fold than their copy") == 2
    assert "group_copies: true keeps" not in caplog.text
    listed = read_training_images(model)
    assert listed is not None and listed.held_out and listed.trained_on
    for one, other in pairs:
        assert (digest[one] in listed.held_out) == (digest[other] in listed.held_out)
    assert load_card(model).recipe["group_copies"] is True
    (model / TRAINING_IMAGES_FILE).unlink()
    assert replace(fingerprint_model(model), made="") == replace(listed, made="")
