"""Ensembles: weights as documented, fused probabilities, Grad-CAM, served by the node."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dicomnode.errors import ModelError, TrainingError
from dicomnode.explain.gradcam import CamBatch, ensemble_grad_cam, grad_cam
from dicomnode.inference import Predictor, explain_batch, prepare_input
from dicomnode.models.architectures import (
    EnsembleNet,
    MirrorMean,
    build_model,
    fuse_probabilities,
    scorer,
)
from dicomnode.models.card import GradCamSpec, InputSpec, ModelCard, load_card, write_card
from dicomnode.models.registry import ModelRegistry
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.ensemble import build_ensemble, ensemble_weights, score_out_of_fold
from dicomnode.training.evaluate import about_model
from dicomnode.values import PreparedImage

F1 = ([0.8, 0.2], [0.2, 0.6], [0.0, 0.2])
RECALL = ([0.5, 0.5], [0.25, 0.75], [0.25, 0.0])


def _member(directory: Path, seed: int, f1: list[float], recall: list[float], **kw: Any) -> Path:
    card = make_tiny_model(directory, name=f"member-{seed}", seed=seed, **kw)
    metrics = {"balanced_accuracy": 0.5, "per_class": {"f1": f1, "recall": recall}}
    write_card(directory, card.model_copy(update={"metrics": metrics}))
    return directory


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("members")
    temperatures = (1.0, 2.0, 0.5)
    return [
        _member(root / f"m{i}", i, F1[i], RECALL[i], temperature=temperatures[i]) for i in range(3)
    ]


@pytest.fixture(scope="module")
def ensemble_dir(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-ensemble"
    return build_ensemble(members, out, method="f1", name="tiny-ensemble", version="0.0.1")


def _cards(members: list[Path]) -> list[ModelCard]:
    return [load_card(m) for m in members]


def test_weights_are_per_class_figures_normalised_over_members(members: list[Path]) -> None:
    f1 = ensemble_weights(_cards(members), "f1")
    np.testing.assert_allclose(f1, np.asarray(F1) / np.asarray(F1).sum(axis=0))
    accuracy = ensemble_weights(_cards(members), "accuracy")
    np.testing.assert_allclose(accuracy, np.asarray(RECALL) / np.asarray(RECALL).sum(axis=0))
    np.testing.assert_allclose(ensemble_weights(_cards(members), "average"), np.full((3, 2), 1 / 3))


def test_cross_validated_means_win_and_an_all_zero_class_is_uniform(tmp_path: Path) -> None:
    cards = []
    for i, cv in enumerate(([0.0, 0.9], [0.0, 0.3])):
        card = make_tiny_model(tmp_path / f"m{i}", name=f"m{i}", seed=i)
        metrics = {
            "per_class": {"f1": [1.0, 1.0]},
            "cross_validation": {"f1_per_class_mean": cv},
        }
        cards.append(card.model_copy(update={"metrics": metrics}))
    np.testing.assert_allclose(ensemble_weights(cards, "f1"), [[0.5, 0.75], [0.5, 0.25]])


def test_weighting_by_figures_a_card_lacks_is_refused(tmp_path: Path) -> None:
    bare = [make_tiny_model(tmp_path / f"m{i}", name=f"m{i}", seed=i) for i in range(2)]
    with pytest.raises(TrainingError, match="per-class f1"):
        ensemble_weights(bare, "f1")
    np.testing.assert_allclose(ensemble_weights(bare, "average"), np.full((2, 2), 0.5))


def test_members_that_do_not_share_classes_or_preprocessing_are_refused(tmp_path: Path) -> None:
    a = _member(tmp_path / "a", 0, [1, 1], [1, 1])
    b = _member(tmp_path / "b", 1, [1, 1], [1, 1], resize="letterbox")
    with pytest.raises(TrainingError, match=r"differs .* in preprocessing"):
        build_ensemble([a, b], tmp_path / "out", method="f1", name="e", version="1")
    three = _member(tmp_path / "three", 3, [1, 1], [1, 1], num_classes=3)
    with pytest.raises(TrainingError, match=r"differs .* in classes"):
        build_ensemble([a, three], tmp_path / "out", method="f1", name="e", version="1")
    with pytest.raises(TrainingError, match="two or more"):
        build_ensemble([a], tmp_path / "out", method="f1", name="e", version="1")
    c = _member(tmp_path / "c", 2, [1, 1], [1, 1])
    card = load_card(c)
    write_card(
        c,
        card.model_copy(
            update={"gradcam": GradCamSpec(target_layer="features", method="layercam")}
        ),
    )
    with pytest.raises(TrainingError, match="one class activation map method"):
        build_ensemble([a, c], tmp_path / "out", method="f1", name="e", version="1")


def test_an_ensemble_keeps_its_members_method(tmp_path: Path) -> None:
    directories = []
    for seed in range(2):
        directory = _member(tmp_path / f"m{seed}", seed, [1, 1], [1, 1])
        card = load_card(directory)
        spec = GradCamSpec(target_layer="features.0+features.1", method="layercam")
        write_card(directory, card.model_copy(update={"gradcam": spec}))
        directories.append(directory)
    out = build_ensemble(directories, tmp_path / "e", method="average", name="e", version="1")
    ensemble = Predictor.load(out, load_card(out))
    assert ensemble.card.gradcam.method == "layercam"
    assert ensemble.identity.explanation == (
        "LayerCAM at features.0+features.1, weighted mean of 2 members' maps"
    )
    (result,) = ensemble.predict([_image(0)])
    assert result.findings[0].heatmap.shape == (90, 70) and result.findings[0].heatmap.max() > 0


def _image(seed: int) -> PreparedImage:
    rng = np.random.default_rng(seed)
    pixels = rng.random((90, 70), dtype=np.float32)
    pixels[30:50, 20:40] += 1.5
    return PreparedImage(np.clip(pixels, 0, 1).astype(np.float32), "L", f"synthetic-{seed}")


def test_fused_probabilities_follow_the_documented_formula(
    members: list[Path], ensemble_dir: Path
) -> None:
    ensemble = Predictor.load(ensemble_dir, load_card(ensemble_dir))
    predictors = [Predictor.load(m, load_card(m)) for m in members]
    images = [_image(s) for s in range(4)]
    batch = torch.stack([prepare_input(ensemble.card, i.pixels)[0] for i in images])
    member_probs = np.stack([p.forward_probabilities(batch) for p in predictors])
    weights = np.asarray(F1) / np.asarray(F1).sum(axis=0)
    mixed = (weights[:, None, :] * member_probs).sum(axis=0)
    expected = mixed / mixed.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ensemble.forward_probabilities(batch), expected, atol=1e-5)
    results = ensemble.predict(images)
    for result, row in zip(results, expected, strict=True):
        (finding,) = result.findings
        np.testing.assert_allclose(finding.probabilities, row, atol=1e-5)
        assert finding.predicted.index == int(row.argmax())


def _share_weighted_maps(
    model: EnsembleNet, layers: Sequence[str], batch: torch.Tensor, classes: Sequence[int]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The documented ensemble map, member by member: each member's map for the class, of
    what it sees, brought to the batch's size, weighted by its share of ``q_c``, then
    scaled to a peak of 1."""
    with torch.no_grad():
        member_probs = model.member_probabilities(batch).numpy()
    weights = model.weights_cpu().numpy()
    size = (int(batch.shape[-2]), int(batch.shape[-1]))
    expected = np.zeros((batch.shape[0], *size), dtype=np.float32)
    for n, c in enumerate(classes):
        shares = weights[:, c] * member_probs[:, n, c]
        for m, member in enumerate(model.members):
            with torch.no_grad():
                seen = model.member_input(m, batch[n : n + 1])
            own = grad_cam(member, layers[m], seen, [c]).cams
            assert own.shape[1:] == seen.shape[-2:]  # in the member's own input
            in_place = torch.nn.functional.interpolate(
                torch.from_numpy(own)[:, None], size=size, mode="bilinear"
            )[0, 0].numpy()
            expected[n] += shares[m] / shares.sum() * in_place
        if expected[n].max() > 0:
            expected[n] /= expected[n].max()
    return expected


def _maps_as_documented(
    directory: Path, images: list[PreparedImage]
) -> tuple[EnsembleNet, torch.Tensor, CamBatch, list[str]]:
    """The ensemble's maps of ``images`` are :func:`_share_weighted_maps`, and its findings'
    heatmaps lie on the images; returns the network, the batch, the maps and the layers."""
    ensemble = Predictor.load(directory, load_card(directory))
    model = ensemble.model
    assert isinstance(model, EnsembleNet)
    batch = torch.stack([prepare_input(ensemble.card, i.pixels)[0] for i in images])
    cams = explain_batch(model, ensemble.card.gradcam, batch)
    layers = ensemble.card.gradcam.target_layer.split(",")
    expected = _share_weighted_maps(model, layers, batch, cams.classes)
    np.testing.assert_allclose(cams.cams, expected, atol=1e-5)
    for image, result in zip(images, ensemble.predict(images), strict=True):
        (finding,) = result.findings
        assert finding.heatmap.shape == image.pixels.shape
    return model, batch, cams, layers


def test_ensemble_map_is_the_share_weighted_mean_of_member_maps(
    members: list[Path], ensemble_dir: Path
) -> None:
    images = [_image(s) for s in range(3)]
    model, batch, cams, layers = _maps_as_documented(ensemble_dir, images)
    chosen = list(cams.classes)
    # Shift averaging: every shifted copy explains the class the unshifted pass chose.
    shifted_spec = load_card(ensemble_dir).gradcam.model_copy(update={"shift": 2})
    shifted = explain_batch(model, shifted_spec, batch)
    assert shifted.classes == cams.classes and torch.equal(shifted.logits, cams.logits)
    assert not np.allclose(shifted.cams, cams.cams, atol=1e-3)
    other = [1 - c for c in chosen]
    flipped = ensemble_grad_cam(model, layers, batch, "gradcam", other)
    assert flipped.classes == tuple(other) and not np.allclose(flipped.cams, cams.cams, atol=1e-3)


def test_the_node_serves_an_ensemble_and_the_card_records_its_members(
    ensemble_dir: Path, members: list[Path]
) -> None:
    registry = ModelRegistry.load(ensemble_dir.parent)
    loaded = registry.for_body_part("KNEE")
    assert loaded is not None and loaded.card.name == "tiny-ensemble"
    card = loaded.card
    assert card.architecture.name == "ensemble"
    assert card.synthetic_training_data is True
    recorded = card.metrics["ensemble"]
    assert recorded["method"] == "f1"
    assert [m["directory"] for m in recorded["members"]] == [m.name for m in members]
    np.testing.assert_allclose(
        [m["class_weights"] for m in recorded["members"]],
        np.asarray(F1) / np.asarray(F1).sum(axis=0),
    )
    assert [m["temperature"] for m in recorded["members"]] == [1.0, 2.0, 0.5]


def _oof_table(path: Path, rows: list[tuple[str, int, int, list[float]]]) -> Path:
    lines = ["path,label,fold,predicted,p_0,p_1"]
    for name, label, fold, probabilities in rows:
        predicted = int(np.argmax(probabilities))
        lines.append(f"{name},{label},{fold},{predicted},{probabilities[0]},{probabilities[1]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_out_of_fold_scoring_fuses_as_the_node_does(members: list[Path], tmp_path: Path) -> None:
    images = [("a.png", 0, 0), ("b.png", 1, 0), ("c.png", 0, 1), ("d.png", 1, 1)]
    first = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]
    second = [[0.4, 0.6], [0.1, 0.9], [0.8, 0.2], [0.45, 0.55]]
    # Rows in another order in the second table: they are matched by path.
    tables = [
        _oof_table(tmp_path / "1.csv", [(*i, p) for i, p in zip(images, first, strict=True)]),
        _oof_table(
            tmp_path / "2.csv",
            [(*i, p) for i, p in reversed(list(zip(images, second, strict=True)))],
        ),
    ]
    figures = score_out_of_fold(members[:2], "f1", tables)
    weights = ensemble_weights(_cards(members[:2]), "f1")
    fused = weights[0] * np.asarray(first) + weights[1] * np.asarray(second)
    fused /= fused.sum(axis=1, keepdims=True)
    expected = (fused.argmax(axis=1) == np.array([0, 1, 0, 1])).mean()
    assert figures["accuracy"] == pytest.approx(expected)
    np.testing.assert_allclose(figures["class_weights"], weights)
    assert set(figures["cross_validation"]["balanced_accuracy"]) == {"mean", "sd"}


def test_out_of_fold_scoring_of_several_input_sizes_says_the_node_approximates_it(
    mixed_members: list[Path], members: list[Path], tmp_path: Path
) -> None:
    rows = [("a.png", 0, 0, [0.9, 0.1]), ("b.png", 1, 1, [0.2, 0.8])]
    tables = [_oof_table(tmp_path / f"{i}.csv", rows) for i in range(2)]
    mixed = score_out_of_fold(mixed_members, "average", tables)
    assert "only approximates these figures" in mixed["validation"]
    same = score_out_of_fold(members[:2], "average", tables)
    assert "approximates" not in same["validation"]


def test_out_of_fold_tables_must_cover_the_same_images(members: list[Path], tmp_path: Path) -> None:
    one = _oof_table(tmp_path / "1.csv", [("a.png", 0, 0, [0.9, 0.1]), ("b.png", 1, 1, [0.2, 0.8])])
    other = _oof_table(
        tmp_path / "2.csv", [("a.png", 0, 0, [0.9, 0.1]), ("b.png", 1, 0, [0.2, 0.8])]
    )
    with pytest.raises(TrainingError, match="same images and folds"):
        score_out_of_fold(members[:2], "average", [one, other])
    with pytest.raises(TrainingError, match="no out-of-fold predictions"):
        score_out_of_fold(members[:2], "average", [one, tmp_path / "missing.csv"])


def test_half_precision_members_halve_the_file_and_keep_the_probabilities(
    members: list[Path], ensemble_dir: Path, tmp_path: Path
) -> None:
    half_dir = build_ensemble(
        members, tmp_path / "half", method="f1", name="tiny-ensemble", version="0.0.1", half=True
    )
    stored = load_file(str(half_dir / "model.safetensors"))
    members_stored = {k: v for k, v in stored.items() if k.startswith("members.")}
    assert {v.dtype for v in members_stored.values() if v.is_floating_point()} == {torch.float16}
    assert stored["class_weights"].dtype == torch.float32
    full_size = (ensemble_dir / "model.safetensors").stat().st_size
    assert (half_dir / "model.safetensors").stat().st_size < 0.7 * full_size
    assert load_card(half_dir).metrics["ensemble"]["member_weights_stored_as"] == "float16"
    full = Predictor.load(ensemble_dir, load_card(ensemble_dir))
    half = Predictor.load(half_dir, load_card(half_dir))
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    batch = torch.stack([prepare_input(full.card, _image(s).pixels)[0] for s in range(4)])
    np.testing.assert_allclose(
        half.forward_probabilities(batch), full.forward_probabilities(batch), atol=5e-3
    )


def test_an_ensemble_says_what_its_members_say_to_readers(tmp_path: Path) -> None:
    notes = ("Grade 4 runs high.", "", "Grade 4 runs high.", "Not for children.")
    directories = []
    for seed, note in enumerate(notes):
        directory = _member(tmp_path / f"m{seed}", seed, [1, 1], [1, 1])
        write_card(directory, load_card(directory).model_copy(update={"reader_note": note}))
        directories.append(directory)
    out = build_ensemble(directories, tmp_path / "e", method="average", name="e", version="1")
    assert load_card(out).reader_note == "Grade 4 runs high. Not for children."
    long_note = "x" * 600
    for directory, note in zip(directories[:2], (long_note, long_note + "y"), strict=True):
        write_card(directory, load_card(directory).model_copy(update={"reader_note": note}))
    with pytest.raises(TrainingError, match="1239 characters, more than a card's 1024"):
        build_ensemble(directories, tmp_path / "f", method="average", name="f", version="1")
    assert not (tmp_path / "f").exists()  # refused before anything is written


# ------------------------------------------------------------------ members of several inputs


def _smooth_image(seed: int) -> PreparedImage:
    """A film-like image: smooth shapes, no pixel noise (resizing it twice changes little)."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:120, 0:100].astype(np.float32)
    pixels = np.full((120, 100), 0.2, dtype=np.float32)
    for _ in range(3):
        y, x, r = rng.uniform(20, 100), rng.uniform(20, 80), rng.uniform(8, 20)
        pixels += 0.5 * np.exp(-((rows - y) ** 2 + (columns - x) ** 2) / (2 * r * r))
    return PreparedImage(np.clip(pixels, 0, 1), "L", f"smooth-{seed}")


@pytest.fixture(scope="module")
def mixed_members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 64 px three-channel member and a 40 px one-channel member of its own normalisation."""
    root = tmp_path_factory.mktemp("mixed")
    large = _member(root / "large", 10, [0.9, 0.3], [0.8, 0.4])
    small = _member(root / "small", 11, [0.3, 0.9], [0.4, 0.8], input_size=(40, 40), channels=1)
    card = load_card(small)
    own = card.input.model_copy(update={"mean": (0.3,), "std": (0.2,)})
    write_card(small, card.model_copy(update={"input": own}))
    return [large, small]


@pytest.fixture(scope="module")
def mixed_dir(mixed_members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed-models") / "mixed-ensemble"
    return build_ensemble(mixed_members, out, method="f1", name="mixed-ensemble", version="1")


def test_members_of_several_inputs_each_see_their_own(
    mixed_members: list[Path], mixed_dir: Path
) -> None:
    card = load_card(mixed_dir)
    assert card.input.size == (64, 64) and card.input.channels == 1
    assert (card.input.mean, card.input.std) == ((0.0,), (1.0,))
    own = [m["input"] for m in card.architecture.params["members"]]
    assert [o["size"] for o in own] == [[64, 64], [40, 40]]
    assert own[1]["mean"] == [0.3] and own[1]["std"] == [0.2]
    ensemble = Predictor.load(mixed_dir, card)
    model = ensemble.model
    assert isinstance(model, EnsembleNet)
    alone = [Predictor.load(m, load_card(m)) for m in mixed_members]
    images = [_smooth_image(s) for s in range(4)]
    batch = torch.stack([prepare_input(card, i.pixels)[0] for i in images])
    own_inputs = [torch.stack([prepare_input(p.card, i.pixels)[0] for i in images]) for p in alone]
    with torch.no_grad():
        seen = [model.member_input(m, batch) for m in range(2)]
    # The member of the ensemble's size sees what it sees served alone (its
    # normalisation and three channels included) ...
    torch.testing.assert_close(seen[0], own_inputs[0], atol=1e-6, rtol=0)
    # ... the smaller one its own size, channels and normalisation, the image resized
    # twice (120x100 -> 64 -> 40 instead of 120x100 -> 40): close, not equal.
    assert seen[1].shape == own_inputs[1].shape == (4, 1, 40, 40)
    difference = (seen[1] - own_inputs[1]).abs() * 0.2  # back in pixel units
    assert 0 < float(difference.max()) < 0.03
    # Each member's probabilities are its own on what it sees; the ensemble fuses them.
    member_probs = np.stack(
        [alone[m].forward_probabilities(seen[m].contiguous()) for m in range(2)]
    )
    weights = ensemble_weights(_cards(mixed_members), "f1")
    mixed = (weights[:, None, :] * member_probs).sum(axis=0)
    expected = mixed / mixed.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ensemble.forward_probabilities(batch), expected, atol=1e-5)
    served_alone = np.stack(
        [p.forward_probabilities(x) for p, x in zip(alone, own_inputs, strict=True)]
    )
    np.testing.assert_allclose(member_probs, served_alone, atol=0.02)


def test_an_ensemble_of_several_inputs_maps_each_member_in_place(mixed_dir: Path) -> None:
    _, _, cams, _ = _maps_as_documented(mixed_dir, [_smooth_image(s) for s in range(3)])
    assert cams.cams.shape == (3, 64, 64)


def test_an_evaluation_summary_names_the_members_and_their_inputs(
    mixed_dir: Path, ensemble_dir: Path
) -> None:
    about = " ".join(" ".join(about_model(load_card(mixed_dir))).split())
    assert (
        "An ensemble (f1-weighted) of 2 members: member-10 0.0.1 (64x64), member-11 0.0.1 "
        "(40x40); each member resizes and normalises the image as its own card says"
    ) in about
    shared = " ".join(about_model(load_card(ensemble_dir)))
    assert "of 3 members: member-0 0.0.1, member-1 0.0.1, member-2 0.0.1." in shared
    assert "resizes" not in shared


def test_the_node_serves_an_ensemble_of_several_inputs(mixed_dir: Path) -> None:
    registry = ModelRegistry.load(mixed_dir.parent)
    loaded = registry.for_body_part("KNEE")
    assert loaded is not None and loaded.card.name == "mixed-ensemble"
    (result,) = Predictor.load(loaded.directory, loaded.card).predict([_smooth_image(7)])
    (finding,) = result.findings
    assert sum(finding.probabilities) == pytest.approx(1.0)
    assert finding.heatmap.shape == (120, 100) and finding.heatmap.max() == pytest.approx(1.0)


def test_letterboxed_members_of_several_inputs_must_share_the_aspect_ratio(tmp_path: Path) -> None:
    a = _member(tmp_path / "a", 0, [1, 1], [1, 1], resize="letterbox")
    square = _member(tmp_path / "b", 1, [1, 1], [1, 1], resize="letterbox", input_size=(48, 48))
    wide = _member(tmp_path / "c", 2, [1, 1], [1, 1], resize="letterbox", input_size=(48, 64))
    out = build_ensemble([a, square], tmp_path / "ok", method="average", name="e", version="1")
    assert load_card(out).input.size == (64, 64)
    with pytest.raises(TrainingError, match=r"48x64 input, .* 64x64: letterboxed members"):
        build_ensemble([a, wide], tmp_path / "no", method="average", name="e", version="1")


def test_an_ensemble_card_gives_every_member_its_input_or_none(
    mixed_dir: Path, tmp_path: Path
) -> None:
    card = load_card(mixed_dir)
    members = [dict(m) for m in card.architecture.params["members"]]
    del members[1]["input"]
    with pytest.raises(ModelError, match="every member or none"):
        build_model("ensemble", 1, 2, {"members": members})
    members = [dict(m) for m in card.architecture.params["members"]]
    members[1]["input"] = {**members[1]["input"], "std": [0.0]}
    with pytest.raises(ModelError, match=r"a member's input: .*std values must be positive"):
        build_model("ensemble", 1, 2, {"members": members})
    # The members normalise the ensemble's input themselves: a card normalising it too is
    # refused (the members would see numbers they were not trained on).
    text = (mixed_dir / "model.yaml").read_text(encoding="utf-8")
    normalised = text.replace(
        "  mean:\n  - 0.0\n  std:\n  - 1.0", "  mean:\n  - 0.5\n  std:\n  - 0.5"
    )
    assert normalised != text
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.yaml").write_text(normalised, encoding="utf-8")
    with pytest.raises(ModelError, match=r"takes the grey image as it is: input.mean \[0.0\]"):
        load_card(tmp_path / "m", verify=False)


def test_a_flip_ensemble_fuses_what_each_member_gives_served_alone(tmp_path: Path) -> None:
    """Each member averages its own logits over the input and its mirror, as it does served
    alone and as ``ensemble-cv`` scores it; then the members are fused."""
    directories = []
    for seed in range(2):
        directory = _member(tmp_path / f"m{seed}", seed, [0.7, 0.3], [0.6, 0.5], temperature=1.5)
        card = load_card(directory)
        update = {"test_time_flip": True}
        write_card(directory, card.model_copy(update=update))
        directories.append(directory)
    out = build_ensemble(directories, tmp_path / "e", method="average", name="e", version="1")
    ensemble = Predictor.load(out, load_card(out))
    assert ensemble.card.test_time_flip
    assert "averaged (by each member, before the fusion)" in " ".join(about_model(ensemble.card))
    alone = [Predictor.load(d, load_card(d)) for d in directories]
    images = [_image(s) for s in range(6)]
    batch = torch.stack([prepare_input(ensemble.card, i.pixels)[0] for i in images])
    expected = np.mean([p.forward_probabilities(batch) for p in alone], axis=0)
    np.testing.assert_allclose(ensemble.forward_probabilities(batch), expected, atol=1e-5)
    results = ensemble.predict(images)
    for result, row in zip(results, expected, strict=True):
        np.testing.assert_allclose(result.findings[0].probabilities, row, atol=1e-5)
    # The map: each member's mirror-averaged map for the ensemble's class, share-weighted.
    model = ensemble.model
    assert isinstance(model, EnsembleNet)
    cams = explain_batch(model, ensemble.card.gradcam, batch, mirror=True)
    assert cams.classes == tuple(int(c) for c in expected.argmax(axis=1))
    with torch.no_grad():
        member_probs = model.member_probabilities(batch, mirror=True).numpy()
    np.testing.assert_allclose(member_probs.mean(axis=0), expected, atol=1e-5)
    layers = ensemble.card.gradcam.target_layer.split(",")
    for n, c in enumerate(cams.classes):
        shares = member_probs[:, n, c] / member_probs[:, n, c].sum()
        total = np.zeros_like(cams.cams[n])
        for m, member in enumerate(model.members):
            one = batch[n : n + 1]
            plain = grad_cam(member, layers[m], one, [c]).cams[0]
            mirrored = grad_cam(member, layers[m], torch.flip(one, dims=[-1]), [c]).cams[0]
            both = plain + mirrored[:, ::-1]
            total += shares[m] * both / max(float(both.max()), 1e-30)
        assert total.max() > 0
        np.testing.assert_allclose(cams.cams[n], total / total.max(), atol=1e-5)


def test_a_flip_ensemble_mirrors_each_member_before_the_fusion() -> None:
    """Members that see position (a linear layer on the pixels): the mean of each member's
    logits over the image and its mirror, fused, is not the mirror mean of the fused ``log q``."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 3) for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(20)
    members = [torch.nn.Sequential(torch.nn.Flatten(), layer) for layer in layers]
    ensemble = EnsembleNet(list(members), 3)
    weights = torch.tensor([[0.7, 0.2, 0.5], [0.3, 0.8, 0.5]])
    temperatures = (1.0, 2.0)
    ensemble.get_buffer("class_weights").copy_(weights)
    ensemble.get_buffer("temperatures").copy_(torch.tensor(temperatures))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        alone = torch.stack(
            [
                torch.softmax(MirrorMean(m)(x) / t, dim=1)
                for m, t in zip(members, temperatures, strict=True)
            ]
        )
        expected = fuse_probabilities(weights, alone)
        served = torch.softmax(scorer(ensemble, test_time_flip=True)(x), dim=1)
        fused_then_mirrored = torch.softmax(MirrorMean(ensemble)(x), dim=1)
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=0)
    assert float((fused_then_mirrored - expected).abs().max()) > 0.01


@pytest.mark.slow
def test_the_reference_studys_ensemble_of_three_inputs_is_served(tmp_path: Path) -> None:
    """Xception and InceptionResNetV2 (299 px) with ResNet50 (224 px, ImageNet normalisation),
    each carded with its knee-compare recipe's input (random weights: no ImageNet files here)."""
    recipes = Path(__file__).resolve().parents[2] / "config" / "training" / "knee-compare"
    directories = []
    for recipe in ("xception", "resnet50", "inception-resnet-v2"):
        raw = yaml.safe_load((recipes / f"{recipe}-finetune.yaml").read_text(encoding="utf-8"))
        spec = InputSpec.model_validate(raw["input"])
        name = raw["architecture"]["name"]
        directory = tmp_path / recipe
        card = make_tiny_model(
            directory, name=recipe, architecture=name, input_size=spec.size, channels=3, seed=5
        )
        gradcam = GradCamSpec(target_layer=raw["gradcam_layer"])
        write_card(directory, card.model_copy(update={"input": spec, "gradcam": gradcam}))
        directories.append(directory)
    out = build_ensemble(directories, tmp_path / "study", method="average", name="s", version="1")
    card = load_card(out)
    assert card.input.size == (299, 299)
    own = [m["input"]["size"] for m in card.architecture.params["members"]]
    assert own == [[299, 299], [224, 224], [299, 299]]
    ensemble = Predictor.load(out, card)
    (result,) = ensemble.predict([_smooth_image(1)])
    (finding,) = result.findings
    assert sum(finding.probabilities) == pytest.approx(1.0)
    assert finding.heatmap.shape == (120, 100)
    assert finding.heatmap[int(finding.peak[1]), int(finding.peak[0])] == finding.heatmap.max()
