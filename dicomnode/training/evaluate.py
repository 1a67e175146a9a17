"""Evaluate a model directory against a labelled folder, exactly as the node computes.

Every image is decoded with :func:`~dicomnode.imaging.pixels.read_image_file`
(every unusable file is named in one error, by its path in the folder), turned into
a tensor with :func:`~dicomnode.inference.prepare_input` and
classified with :meth:`~dicomnode.inference.Predictor.forward_probabilities`
(the card's temperature included), so the figures are those of the node's own
probabilities.

A labelled image is one training-style example: for a card with a knee
localiser (``preprocessing.localiser: knee``) that is a joint-centred crop, as
in its training folder, and it is classified whole; the localiser is not run
(the figures are the grader's, comparable with its cross-validation). The
localiser, which finds the joints on whole radiographs before the grader runs,
is tested on its own (``tests/unit/test_localise.py``). The galleries are drawn
by the same whole-image path, so each overlay explains the probability in its
caption.

The folder is ``data_dir/<class index>/`` as in training: a folder that is not a
class folder is an error, but a class folder that is missing or empty is warned
about and the class left out (its recall and AUC are undefined), as a test set may
lack a grade.

Outputs: a predictions CSV (``path,label,predicted,p_0,...,p_{k-1}``; ``path`` is
``data_dir`` as given joined with ``<class index>/<file>``, so relative when
``data_dir`` was given relative, unlike the out-of-fold CSV of training, whose
paths are relative to its ``data_dir``) and a report directory with
``metrics.json``, ``confusion.png``, ``roc.png``, ``reliability.png``, ``summary.md``
and one Grad-CAM gallery per class, ``gradcam_<index>_<name>.png``: the node's own
overlays (heatmap, findings) of up to :data:`GALLERY_PER_CLASS` images of that true
class, the ones the model gives the highest probability of the class first, each
captioned with its predicted class. ``summary.md`` names the model (version, weights sha256, the
synthetic-data notice where it applies), says how a localiser card's images were
read, repeats the card's own figures for comparison and its note to readers, and
lists the figures and galleries.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.config import RoutingSettings
from dicomnode.encode.render import SYNTHETIC_NOTICE
from dicomnode.errors import ConfigError, ImagingError
from dicomnode.imaging.pixels import PICTURE_SUFFIXES, read_dicom
from dicomnode.inference import Predictor, prepare_input
from dicomnode.models.card import CAM_METHOD_NAMES, ENSEMBLE, MEMBER_INPUT, ModelCard, load_card
from dicomnode.studies import not_a_radiograph
from dicomnode.training.config import DEFAULT_GROUP_PATTERN
from dicomnode.training.data import (
    Fingerprints,
    LabelledImages,
    listed,
    read_labelled,
    scan_folder,
    unusable_message,
)
from dicomnode.training.fingerprint import (
    TrainingImages,
    against_training_images,
    training_images_of,
)
from dicomnode.training.metrics import Float64Array, calibration_bins, classification_metrics
from dicomnode.training.report import (
    confusion_image,
    gallery_image,
    reliability_image,
    roc_image,
    summary_markdown,
)
from dicomnode.values import FloatArray

logger = logging.getLogger(__name__)

CHUNK = 64
CARD_FIGURES = {
    "balanced_accuracy": "balanced accuracy",
    "quadratic_weighted_kappa": "QWK",
    "auc_macro": "macro AUC",
}
"""The figures of a card's ``metrics`` that a summary repeats, for comparison."""
GALLERY_PER_CLASS = 4
UNUSABLE = "evaluated (fix or remove them)"
"""What the error naming a folder's unreadable files says they cannot be."""


def evaluate_model(
    model_dir: Path,
    data_dir: Path,
    *,
    predictions: Path | None = None,
    report: Path | None = None,
    device: str = "auto",
    unseen_only: bool = False,
) -> dict[str, Any]:
    """Classify every image of ``data_dir/<class index>/`` with the model in ``model_dir``.

    Parameters
    ----------
    model_dir:
        A directory with ``model.yaml`` and its weights.
    data_dir:
        Labelled folders ``0 .. k-1`` (k = the card's classes); a missing or empty
        one is warned about, any other folder (masks aside) is an error.
    predictions:
        Where to write the per-image CSV, or None; its ``path`` column is each file's
        path as ``data_dir`` gives it (``data_dir/<class index>/<file>``).
    report:
        A directory for ``metrics.json``, the figures and ``summary.md``, or None.
    device:
        ``cpu``, ``cuda`` or ``auto``.
    unseen_only:
        Leave out the images whose pixels the model trained on (its directory's
        ``training-images.json``, :mod:`~dicomnode.training.fingerprint`).

    Returns
    -------
    dict
        The figures of :func:`~dicomnode.training.metrics.classification_metrics`
        plus ``model``, ``version``, ``sha256`` and ``data_dir``; ``training_images``, a
        warning, when the model trained on images scored (by their pixels when its
        directory lists them, else when its recipe's folder is ``data_dir``: the figures
        are then optimistic); ``training_overlap`` (images scored, trained on, held out,
        whether those trained on were left out) when the directory lists them.
    """
    card = load_card(model_dir)
    predictor = Predictor.load(model_dir, card, device)
    images = scan_folder(data_dir, card.num_classes, DEFAULT_GROUP_PATTERN, every_class=False)
    warn_of_images_the_node_skips(images)
    listed = training_images_of(model_dir, needed=unseen_only)
    probabilities, found = predict_folder(predictor, images, listed if unseen_only else None)
    seen = against_training_images(listed, card, data_dir, lambda: found, unseen_only=unseen_only)
    images = images.subset(seen.kept) if unseen_only else images
    metrics = {
        "model": card.name,
        "version": card.version,
        "sha256": card.weights.sha256,
        "data_dir": str(data_dir),
        **({"training_images": seen.warning} if seen.warning else {}),
        **({"training_overlap": seen.overlap.to_json()} if seen.overlap else {}),
        **classification_metrics(images.labels, probabilities),
    }
    if predictions is not None:
        write_predictions(predictions, images, probabilities)
    if report is not None:
        names = [c.name for c in card.classes]
        write_report(report, images, probabilities, metrics, names)
        galleries = write_galleries(
            report, predictor.without_localiser(), images, probabilities, names
        )
        write_summary(report, card, metrics, names, [path.name for path in galleries])
    logger.info("evaluated %s on %d images", card.name, len(images))
    return metrics


def predict_folder(
    predictor: Predictor, images: LabelledImages, leave_out: TrainingImages | None = None
) -> tuple[Float64Array, Fingerprints]:
    """Each file's :class:`~dicomnode.training.data.Fingerprints` and, from the same
    decoding, its probabilities through the node's path (in chunks): (M, classes), one row
    per file that ``leave_out`` does not recognise as an image it trained on, in order.

    Raises
    ------
    ConfigError
        Naming every file that cannot be read (once one is found, the rest are
        only decoded, to be named too), as training does.
    """
    parts = [np.zeros((0, predictor.card.num_classes), dtype=np.float64)]
    digests: list[str] = []
    near: list[str] = []
    unusable: list[str] = []
    for start in range(0, len(images), CHUNK):
        decoded: list[FloatArray] = []
        for path in images.paths[start : start + CHUNK]:
            try:
                decoded.append(read_labelled(path, images.root).pixels)
            except ConfigError as exc:
                unusable.append(str(exc))
        if unusable:
            continue
        found = Fingerprints.of(decoded)
        digests.extend(found.digests)
        near.extend(found.near)
        seen = leave_out.recognised(found) if leave_out else np.zeros(len(decoded), bool)
        kept = [pixels for pixels, known in zip(decoded, seen, strict=True) if not known]
        tensors = [prepare_input(predictor.card, pixels)[0] for pixels in kept]
        if tensors:
            parts.append(predictor.forward_probabilities(torch.stack(tensors)))
    if unusable:
        raise ConfigError(unusable_message(unusable, len(images), images.root, UNUSABLE))
    return np.concatenate(parts), Fingerprints(tuple(digests), tuple(near))


def warn_of_images_the_node_skips(images: LabelledImages) -> list[str]:
    """Warn about DICOM files the node would not analyse (the default routing's SOP
    classes and modalities): their figures are the model's, not the node's. Returns
    their paths relative to the folder."""
    rules = RoutingSettings()
    skipped: list[str] = []
    for path in images.paths:
        if path.suffix.lower() in PICTURE_SUFFIXES:
            continue
        try:
            header = read_dicom(path, stop_before_pixels=True)
        except ImagingError:
            continue  # a picture, or named when it is decoded
        reason = not_a_radiograph(
            str(header.get("SOPClassUID", "")), str(header.get("Modality", "")).upper(), rules
        )
        if reason:
            skipped.append(f"{path.relative_to(images.root).as_posix()} ({reason})")
    if skipped:
        logger.warning(
            "%d of %d files are DICOM images the node does not analyse (routing.modalities "
            "and the radiograph SOP classes, CR and DX): they are evaluated, but the node "
            "would skip them: %s",
            len(skipped),
            len(images),
            listed(skipped),
        )
    return skipped


def prediction_header(num_classes: int) -> list[str]:
    """``path,label,predicted,p_0,...,p_{k-1}``."""
    return ["path", "label", "predicted", *(f"p_{c}" for c in range(num_classes))]


def write_predictions(path: Path, images: LabelledImages, probabilities: Float64Array) -> Path:
    """One CSV row per image: its path, true label, predicted class and probabilities.

    The path is the file's as listed under ``images.root`` (the ``data_dir`` given to
    :func:`evaluate_model`), not relative to it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    predicted = probabilities.argmax(axis=1)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(prediction_header(probabilities.shape[1]))
        for i, file in enumerate(images.paths):
            row = [str(file), int(images.labels[i]), int(predicted[i])]
            writer.writerow(row + [repr(float(p)) for p in probabilities[i]])
    return path


def write_report(
    directory: Path,
    images: LabelledImages,
    probabilities: Float64Array,
    metrics: dict[str, Any],
    names: list[str],
) -> Path:
    """``metrics.json`` (with the reliability bins) and three PNG figures."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = images.labels
    full = {**metrics, "calibration_bins": calibration_bins(labels, probabilities)}
    (directory / "metrics.json").write_text(json.dumps(full, indent=2), encoding="utf-8")
    confusion_image(np.asarray(metrics["confusion_matrix"]), names).save(
        directory / "confusion.png"
    )
    roc_image(labels, probabilities, names, metrics["auc_one_vs_rest"]).save(directory / "roc.png")
    reliability_image(labels, probabilities, metrics["expected_calibration_error"]).save(
        directory / "reliability.png"
    )
    return directory


def write_summary(
    directory: Path,
    card: ModelCard,
    metrics: dict[str, Any],
    names: list[str],
    galleries: list[str],
) -> Path:
    """``summary.md``: the model, how its images were read, the figures and the galleries."""
    heading = f"Evaluation of {card.name} {card.version}"
    summary = summary_markdown(heading, about_model(card), metrics, names, galleries)
    path = directory / "summary.md"
    path.write_text(summary, encoding="utf-8")
    return path


def about_model(card: ModelCard) -> list[str]:
    """The summary's lines on the model: identity, synthetic data, localiser, its card's figures."""
    lines = [f"Model: `{card.name}` {card.version}, weights sha256 `{card.weights.sha256}`."]
    if card.synthetic_training_data:
        lines += ["", f"**{SYNTHETIC_NOTICE}: not for clinical use.**"]
    if card.preprocessing.localiser != "none":
        lines += [
            "",
            "Each image is classified whole, as a training crop; the model's "
            f"{card.preprocessing.localiser} localiser is not run (it is tested on its own).",
        ]
    if card.architecture.name == ENSEMBLE:
        lines += ["", ensemble_line(card)]
    if card.test_time_flip:
        by = " (by each member, before the fusion)" if card.architecture.name == ENSEMBLE else ""
        lines += [
            "",
            f"Each image and its left-right mirror are classified and their logits averaged{by} "
            "(the card's `test_time_flip`), as the node does.",
        ]
    stated = {label: card.metrics.get(key) for key, label in CARD_FIGURES.items()}
    shown = [
        f"{label} {value:.3f}"
        for label, value in stated.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if shown:
        validation = card.metrics.get("validation", "not stated")
        lines += ["", f"The card's own figures: {', '.join(shown)} (validation: {validation})."]
    if card.reader_note:
        lines += ["", f"The card's note to readers: {card.reader_note}"]
    return lines


def ensemble_line(card: ModelCard) -> str:
    """An ensemble card's members (name, version, input size) and how they are fused."""
    recorded = card.metrics.get("ensemble", {})
    members = recorded.get("members") or []
    specs = card.architecture.params.get("members") or []
    named = [f"{m.get('name', '?')} {m.get('version', '?')}" for m in members] or [
        str(spec.get("name", "?")) for spec in specs
    ]
    sizes = [spec.get(MEMBER_INPUT, {}).get("size") for spec in specs]
    if all(sizes) and len(sizes) == len(named):
        named = [f"{n} ({s[0]}x{s[1]})" for n, s in zip(named, sizes, strict=True)]
        own = (
            "; each member resizes and normalises the image as its own card says (a smaller "
            "member sees it resized twice)"
        )
    else:
        own = ""
    method = recorded.get("method", "per-class")
    return f"An ensemble ({method}-weighted) of {len(named)} members: {', '.join(named)}{own}."


def write_galleries(
    directory: Path,
    predictor: Predictor,
    images: LabelledImages,
    probabilities: Float64Array,
    names: list[str],
) -> list[Path]:
    """One Grad-CAM gallery PNG per class (see the module doc); returns their paths."""
    from PIL import Image

    from dicomnode.encode.render import render_overlay

    written = []
    method = CAM_METHOD_NAMES.get(predictor.card.gradcam.method, predictor.card.gradcam.method)
    for index, name in enumerate(names):
        members = np.flatnonzero(images.labels == index)
        chosen = members[np.argsort(-probabilities[members, index], kind="stable")]
        tiles = []
        for i in chosen[:GALLERY_PER_CLASS]:
            image = read_labelled(images.paths[i], images.root)
            result = predictor.predict([image])[0]
            predicted = int(probabilities[i].argmax())
            share = probabilities[i, predicted]
            caption = f"{images.paths[i].stem}: {names[predicted]} ({share:.2f})"
            tiles.append((Image.fromarray(render_overlay(image, result)), caption))
        title = f"{method}, true class {index} {name}: highest p({name}) first"
        path = directory / f"gradcam_{index}_{_file_safe(name)}.png"
        gallery_image(tiles, title).save(path)
        written.append(path)
    return written


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
