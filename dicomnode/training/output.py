"""The model directory a training run writes: weights, ``metrics.json``, the card, out-of-fold CSV.

Beside the card, ``training-images.json`` lists the images the weights trained on and those
they held out, by their pixels (:mod:`~dicomnode.training.fingerprint`).

``write_model_directory`` serves ``fold: <k>``, ``all`` and ``none``;
``write_final_directory`` serves ``fold: final`` (all-data weights, the
cross-validation's pooled out-of-fold figures). The card is written last, so a
directory with a card is complete.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dicomnode.errors import TrainingError
from dicomnode.models.card import (
    ArchitectureSpec,
    GradCamSpec,
    ModelCard,
    WeightsSpec,
    sha256_of,
    write_card,
)
from dicomnode.training.config import TrainingConfig
from dicomnode.training.data import IntArray
from dicomnode.training.fingerprint import (
    TrainingImages,
    at_training,
    of_fold,
    start_images,
    write_training_images,
)
from dicomnode.training.folds import split
from dicomnode.training.metrics import (
    OTHER_FOLDS_EPOCH,
    Float64Array,
    at_other_folds_epoch,
    classification_metrics,
    fit_temperature,
    softmax,
    summarise_folds,
)
from dicomnode.training.state import FoldResult, Prepared

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
OOF_FILE = "oof_predictions.csv"


def fold_metrics(result: FoldResult) -> dict[str, Any]:
    """Validation figures of one fold: raw, then calibrated with the fitted temperature."""
    base: dict[str, Any] = {
        "fold": result.fold,
        "best_epoch": result.loop.best_epoch,
        "epochs_run": result.loop.epoch,
        "kept_epoch": result.kept_epoch,
        "history": result.loop.history,
    }
    if result.logits is None or result.labels is None:
        return {**base, "temperature": 1.0}
    temperature = fit_temperature(result.logits, result.labels)
    figures = classification_metrics(result.labels, softmax(result.logits, temperature))
    raw_ece = classification_metrics(result.labels, softmax(result.logits))[
        "expected_calibration_error"
    ]
    return {
        **base,
        **figures,
        "temperature": temperature,
        "expected_calibration_error_before_temperature": raw_ece,
    }


def _validation_text(config: TrainingConfig, held_out: int | None = None) -> str:
    """What the figures were measured on; ``held_out``: one fold's own directory."""
    fold = config.fold if held_out is None else held_out
    if fold == "none":
        return "none: trained on every image; no held-out figures"
    scheme = (
        f"StratifiedGroupKFold, {config.folds} folds grouped by patient, seed {config.seed}; "
        "figures after temperature scaling fitted on the same held-out images "
        f"(argmax figures do not change; the ECE is optimistic){_epoch_choice(config, fold)}"
    )
    if fold == "all":
        return (
            f"{config.folds}-fold cross-validation, each fold held out once; the weights and "
            "these headline figures are fold 0's (trained on the other folds), per_fold and "
            f"cross_validation (mean and sd) cover all {config.folds} ({scheme})"
        )
    if fold == "final":
        return (
            f"weights trained on every image; figures from {config.folds}-fold cross-validation "
            f"of the same recipe, pooled over the out-of-fold predictions ({scheme})"
        )
    return f"one held-out patient-grouped fold: fold {fold} of {config.folds} ({scheme})"


def _epoch_choice(config: TrainingConfig, fold: str | int) -> str:
    """What the validation text says of the kept epoch: chosen on the held-out images."""
    if config.keep != "best":
        return ""
    if fold not in ("all", "final"):
        return (
            "; the kept epoch is the one with the best balanced accuracy on these same "
            "held-out images, so the figures are slightly optimistic"
        )
    return (
        "; each fold's kept epoch is the one with the best balanced accuracy on its own "
        "held-out fold, so the figures are slightly optimistic "
        f"({OTHER_FOLDS_EPOCH} reads each fold at the median best epoch of the other folds)"
    )


def _across_folds(config: TrainingConfig, per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """``per_fold`` (without histories), ``cross_validation`` and, when the kept epoch is the
    best one, :data:`~dicomnode.training.metrics.OTHER_FOLDS_EPOCH`."""
    figures: dict[str, Any] = {
        "per_fold": [{k: v for k, v in f.items() if k != "history"} for f in per_fold],
        "cross_validation": summarise_folds(per_fold),
    }
    other = at_other_folds_epoch(per_fold) if config.keep == "best" else None
    if other is not None:
        figures[OTHER_FOLDS_EPOCH] = other
    return figures


def summarise(config: TrainingConfig, results: list[FoldResult]) -> dict[str, Any]:
    """``metrics.json``: the shipped fold's figures; per fold and mean ± sd when several ran.

    With several folds and ``keep: best``, also each fold's figures at the median best
    epoch of the other folds (:func:`~dicomnode.training.metrics.at_other_folds_epoch`).
    """
    per_fold = [fold_metrics(r) for r in results]
    headline = {k: v for k, v in per_fold[0].items() if k != "history"}
    held_out = results[0].fold if len(results) == 1 else None
    summary: dict[str, Any] = {"validation": _validation_text(config, held_out), **headline}
    summary["history"] = per_fold[0]["history"]
    if len(per_fold) > 1:
        summary.update(_across_folds(config, per_fold))
    return summary


def _card_metrics(metrics: dict[str, Any], config: TrainingConfig) -> dict[str, Any]:
    """The card's compact copy of the figures (no history; recall named per class)."""
    card = {k: v for k, v in metrics.items() if k != "history"}
    if "per_class" in card:
        names = [c.name for c in config.model.classes]
        card["recall_per_class"] = dict(zip(names, card["per_class"]["recall"], strict=True))
    return card


def write_model_directory(prepared: Prepared, results: list[FoldResult]) -> Path:
    """Write ``model.safetensors``, ``metrics.json`` and ``model.yaml`` (last) into ``output_dir``.

    With ``fold: all`` every fold also gets ``output_dir/fold-<k>/``; the
    top-level weights are fold 0's and the metrics cover all folds.
    """
    config = prepared.config
    metrics = summarise(config, results)
    if len(results) > 1:
        write_out_of_fold(prepared, results, fit_temperature(*pooled_out_of_fold(results)))
        for result in results:
            _write_one(
                prepared,
                config.output_dir / f"fold-{result.fold}",
                result,
                summarise(config, [result]),
            )
    return _write_one(prepared, config.output_dir, results[0], metrics)


def pooled_out_of_fold(results: list[FoldResult]) -> tuple[Float64Array, IntArray]:
    """Every held-out fold's logits and labels, concatenated in fold order."""
    held = [r for r in results if r.logits is not None and r.labels is not None]
    if not held:
        raise TrainingError("no fold has held-out predictions")
    logits: Float64Array = np.concatenate([r.logits for r in held if r.logits is not None])
    labels: IntArray = np.concatenate([r.labels for r in held if r.labels is not None])
    return logits, labels


def write_out_of_fold(prepared: Prepared, results: list[FoldResult], temperature: float) -> Path:
    """``<checkpoints>/oof_predictions.csv``: ``path,label,fold,predicted,p_0..`` per image.

    Probabilities are calibrated with ``temperature``; paths are relative to
    ``data_dir``. Kept beside the checkpoints, not in the model directory,
    because file names may carry patient ids.
    """
    path = prepared.config.checkpoints / OOF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = prepared.config.num_classes
    header = ["path", "label", "fold", "predicted", *(f"p_{k}" for k in range(classes))]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for result in results:
            if result.logits is None or result.fold is None:
                continue
            _, held_out = split(prepared.assignment, result.fold)
            probabilities = softmax(result.logits, temperature)
            for index, row in zip(held_out, probabilities, strict=True):
                relative = prepared.images.paths[index].relative_to(prepared.images.root)
                label = int(prepared.images.labels[index])
                writer.writerow(
                    [relative.as_posix(), label, result.fold, int(np.argmax(row)), *row.tolist()]
                )
    return path


def write_final_directory(prepared: Prepared, results: list[FoldResult], final: FoldResult) -> Path:
    """The model directory of ``fold: final``: all-data weights, cross-validation figures.

    The headline figures are computed over the pooled out-of-fold predictions
    with one temperature fitted on them (the card's temperature); ``per_fold``,
    ``cross_validation`` (mean ± sd) and its less optimistic companion
    :data:`~dicomnode.training.metrics.OTHER_FOLDS_EPOCH` are as for ``fold: all``.
    """
    config = prepared.config
    logits, labels = pooled_out_of_fold(results)
    temperature = fit_temperature(logits, labels)
    per_fold = [fold_metrics(r) for r in results]
    metrics: dict[str, Any] = {
        "validation": _validation_text(config),
        **classification_metrics(labels, softmax(logits, temperature)),
        "temperature": temperature,
        "final_epochs": final.loop.epoch,
        **_across_folds(config, per_fold),
        "history": final.loop.history,
    }
    write_out_of_fold(prepared, results, temperature)
    return _write_one(prepared, config.output_dir, final, metrics)


def _write_one(
    prepared: Prepared, directory: Path, result: FoldResult, metrics: dict[str, Any]
) -> Path:
    config = prepared.config
    directory.mkdir(parents=True, exist_ok=True)
    label = f"{config.model.name} {config.model.version}"
    weights = write_weights(directory / WEIGHTS_FILE, result.state, label)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    sha256 = sha256_of(weights)
    write_training_images(directory, training_images(prepared, result.fold), sha256)
    write_card(directory, build_card(config, metrics, sha256))
    logger.info("wrote model directory %s", directory)
    return directory


def training_images(prepared: Prepared, fold: int | None) -> TrainingImages:
    """The pixel digests of the images the run that held out ``fold`` trained on (with its
    start's, when it began from a model directory that lists them) and held out."""
    config = prepared.config
    own = of_fold(prepared.fingerprints, prepared.assignment, fold, config.data_dir, at_training())
    start = start_images(config)
    return own if start is None else own.joined(start)


def write_weights(path: Path, state: dict[str, torch.Tensor], label: str) -> Path:
    """Write ``state`` as a world-readable safetensors file labelled ``label``; return ``path``."""
    tensors = {k: v.contiguous() for k, v in state.items()}
    # One metadata key: safetensors writes several in a random order, which would change the sha256.
    save_file(tensors, str(path), metadata={"model": label})
    path.chmod(0o644)  # safetensors creates the file readable by its owner only
    return path


def build_card(config: TrainingConfig, metrics: dict[str, Any], sha256: str) -> ModelCard:
    """The card of a trained model: ``recipe`` is the config, ``metrics`` the validation figures."""
    info = config.model
    return ModelCard(
        name=info.name,
        version=info.version,
        description=info.description,
        body_parts=info.body_parts,
        architecture=ArchitectureSpec(
            name=config.architecture.name, params=config.architecture.params
        ),
        input=config.input,
        preprocessing=config.preprocessing,
        classes=info.classes,
        gradcam=GradCamSpec(
            target_layer=config.cam_target_layer,
            method=config.gradcam_method,
            shift=config.gradcam_shift,
        ),
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256),
        temperature=float(metrics.get("temperature", 1.0)),
        test_time_flip=config.test_time_flip,
        finding_class_minimum=info.finding_class_minimum,
        intended_use=info.intended_use,
        training_data=info.training_data,
        metrics=_card_metrics(metrics, config),
        recipe=config.model_dump(mode="json"),
        trained=datetime.date.today().isoformat(),
        synthetic_training_data=info.synthetic_training_data,
    )
