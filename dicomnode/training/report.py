"""Evaluation figures drawn with Pillow: confusion matrix, ROC curves, reliability diagram,
Grad-CAM galleries, pointing-game close-ups.

Each function returns a :class:`PIL.Image.Image`; the caller saves it. Plain
and readable rather than pretty: white background, one colour per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dicomnode.encode.render import Font, text_font
from dicomnode.training.fingerprint import none_seen
from dicomnode.training.metrics import (
    OTHER_FOLDS_EPOCH,
    Float64Array,
    IntArray,
    calibration_bins,
    roc_curve_points,
)

PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
)
MARGIN = 60
SIDE = 420


def _font(size: int = 14) -> Font:
    return text_font(size)  # the overlay's font: it draws accented file names


def _canvas(width: int, height: int, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white figure at least ``width`` wide, and wide enough for its ``title``."""
    font = _font(16)
    left, _, right, _ = font.getbbox(title)
    image = Image.new("RGB", (max(width, int(right - left) + 2 * MARGIN), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 15), title, fill="black", font=font)
    return image, draw


def _axes(draw: ImageDraw.ImageDraw, x_label: str, y_label: str) -> None:
    """A unit square plot area with ticks at 0, 0.5, 1."""
    left, top, right, bottom = MARGIN, MARGIN, MARGIN + SIDE, MARGIN + SIDE
    draw.rectangle((left, top, right, bottom), outline="black")
    for tick in (0.0, 0.5, 1.0):
        x, y = _to_px(tick, tick)
        draw.text((x - 8, bottom + 5), f"{tick:g}", fill="black", font=_font(12))
        draw.text((left - 28, y - 7), f"{tick:g}", fill="black", font=_font(12))
    draw.text((left + SIDE // 2 - 60, bottom + 24), x_label, fill="black", font=_font())
    draw.text((5, top - 20), y_label, fill="black", font=_font())


def _to_px(x: float, y: float) -> tuple[float, float]:
    return MARGIN + x * SIDE, MARGIN + (1.0 - y) * SIDE


GALLERY_TILE = 256


def gallery_image(tiles: Sequence[tuple[Image.Image, str]], title: str) -> Image.Image:
    """A row of overlays, each scaled to fit a square tile, captioned below, under a title."""
    columns = max(1, len(tiles))
    width = columns * (GALLERY_TILE + 10) + 10
    image, draw = _canvas(max(width, 2 * MARGIN + 200), GALLERY_TILE + 90, title)
    for i, (tile, caption) in enumerate(tiles):
        fitted = tile.copy()
        fitted.thumbnail((GALLERY_TILE, GALLERY_TILE))
        x = 10 + i * (GALLERY_TILE + 10)
        image.paste(fitted, (x + (GALLERY_TILE - fitted.width) // 2, 45))
        draw.text((x, GALLERY_TILE + 55), caption, fill="black", font=_font(13))
    if not tiles:
        draw.text((MARGIN, 60), "no images of this class", fill="black", font=_font())
    return image


def lesion_tile(
    rgb: np.ndarray[Any, np.dtype[np.uint8]],
    outline: np.ndarray[Any, np.dtype[np.bool_]],
    peak: tuple[int, int],
) -> Image.Image:
    """A close-up enlarged to a gallery tile: ``outline`` pixels green, a red cross at ``peak``.

    ``rgb`` (rows, columns, 3) and ``outline`` (rows, columns) cover the same
    pixels; ``peak`` is (column, row) in them. Enlarged by whole pixels
    (nearest neighbour), so each image pixel stays a visible square.
    """
    marked = rgb.copy()
    marked[outline] = (0, 220, 0)
    factor = max(1, GALLERY_TILE // max(marked.shape[:2]))
    tile = Image.fromarray(marked).resize(
        (marked.shape[1] * factor, marked.shape[0] * factor), Image.Resampling.NEAREST
    )
    x, y = (peak[0] + 0.5) * factor, (peak[1] + 0.5) * factor
    arm = max(4.0, 1.5 * factor)
    draw = ImageDraw.Draw(tile)
    draw.line([(x - arm, y), (x + arm, y)], fill=(255, 0, 0), width=2)
    draw.line([(x, y - arm), (x, y + arm)], fill=(255, 0, 0), width=2)
    return tile


def confusion_image(matrix: IntArray, names: Sequence[str]) -> Image.Image:
    """Counts per (true, predicted) cell, shaded by the row share (recall of the true class)."""
    k = len(names)
    cell = max(48, min(90, 420 // k))
    left, top = MARGIN + 40, MARGIN + 40
    image, draw = _canvas(left + cell * k + 40, top + cell * k + 40, CONFUSION_TITLE)
    rows = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    for i in range(k):
        draw.text((10, top + i * cell + cell // 2 - 7), names[i], fill="black", font=_font(12))
        draw.text((left + i * cell + 8, top - 22), names[i], fill="black", font=_font(12))
        for j in range(k):
            _confusion_cell(
                draw, (left + j * cell, top + i * cell), cell, int(matrix[i, j]), share[i, j]
            )
    return image


CONFUSION_TITLE = "Confusion matrix (rows: true, columns: predicted)"


def _confusion_cell(
    draw: ImageDraw.ImageDraw, corner: tuple[int, int], cell: int, count: int, share: float
) -> None:
    x0, y0 = corner
    shade = int(255 * (1.0 - 0.8 * share))
    draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=(shade, shade, 255), outline="grey")
    ink = "white" if share > 0.55 else "black"
    draw.text((x0 + 6, y0 + cell // 2 - 8), str(count), fill=ink, font=_font(14))


def roc_image(
    labels: IntArray,
    probabilities: Float64Array,
    names: Sequence[str],
    aucs: Sequence[float | None],
) -> Image.Image:
    """One-vs-rest ROC curve per class with its AUC in the legend."""
    image, draw = _canvas(
        MARGIN * 2 + SIDE + 170, MARGIN * 2 + SIDE + 30, "ROC curves, one class against the rest"
    )
    _axes(draw, "false positive rate", "true positive rate")
    draw.line([_to_px(0, 0), _to_px(1, 1)], fill=(180, 180, 180), width=1)
    for c, name in enumerate(names):
        positive = labels == c
        colour = PALETTE[c % len(PALETTE)]
        if positive.any() and (~positive).any():
            fpr, tpr = roc_curve_points(positive, probabilities[:, c])
            draw.line(
                [_to_px(float(x), float(y)) for x, y in zip(fpr, tpr, strict=True)],
                fill=colour,
                width=2,
            )
        auc = aucs[c]
        text = f"{name}: AUC {auc:.3f}" if auc is not None else f"{name}: AUC n/a"
        draw.text((MARGIN + SIDE + 15, MARGIN + 10 + 22 * c), text, fill=colour, font=_font())
    return image


def reliability_image(labels: IntArray, probabilities: Float64Array, ece: float) -> Image.Image:
    """Accuracy per confidence bin against the diagonal; bar labels are the bin counts."""
    image, draw = _canvas(
        MARGIN * 2 + SIDE + 20, MARGIN * 2 + SIDE + 30, f"Reliability (ECE {ece:.3f}, 15 bins)"
    )
    _axes(draw, "confidence (top class)", "accuracy")
    draw.line([_to_px(0, 0), _to_px(1, 1)], fill=(180, 180, 180), width=1)
    for row in calibration_bins(labels, probabilities):
        if not row["count"]:
            continue
        x0, y0 = _to_px(row["lower"], row["accuracy"])
        x1, y1 = _to_px(row["upper"], 0.0)
        draw.rectangle((x0 + 1, y0, x1 - 1, y1), fill=(31, 119, 180), outline="black")
        draw.text((x0 + 2, y0 - 14), str(int(row["count"])), fill="black", font=_font(10))
    return image


def summary_markdown(
    heading: str,
    about: Sequence[str],
    metrics: dict[str, Any],
    names: Sequence[str],
    galleries: Sequence[str],
) -> str:
    """A short human summary of ``metrics`` (as from :func:`classification_metrics`).

    ``about`` holds the lines on the model and how it was run, ``galleries``
    the file names of the Grad-CAM galleries beside the summary.
    """
    per_class = metrics["per_class"]
    lines = [
        f"# {heading}",
        "",
        *about,
        "",
        f"Data: `{metrics['data_dir']}` ({metrics['n']} images).",
        *(["", f"**{metrics['training_images']}.**"] if metrics.get("training_images") else []),
        *(["", f"{clean}."] if (clean := none_seen(metrics.get("training_overlap", {}))) else []),
        "",
        "| figure | value |",
        "|---|---|",
        f"| balanced accuracy | {metrics['balanced_accuracy']:.4f} |",
        f"| quadratic-weighted kappa | {metrics['quadratic_weighted_kappa']:.4f} |",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| macro one-vs-rest AUC | {_fmt(metrics['auc_macro'])} |",
        f"| expected calibration error (15 bins) | {metrics['expected_calibration_error']:.4f} |",
        "",
        "| class | precision | recall | F1 | AUC | support |",
        "|---|---|---|---|---|---|",
    ]
    for c, name in enumerate(names):
        lines.append(
            f"| {name} | {per_class['precision'][c]:.3f} | {per_class['recall'][c]:.3f} | "
            f"{per_class['f1'][c]:.3f} | {_fmt(metrics['auc_one_vs_rest'][c])} | "
            f"{int(per_class['support'][c])} |"
        )
    lines += ["", "Confusion matrix (rows true, columns predicted):", "", "```"]
    lines += [" ".join(f"{v:6d}" for v in row) for row in metrics["confusion_matrix"]]
    lines += ["```", "", "Figures: confusion.png, roc.png, reliability.png."]
    if galleries:
        lines += [
            "",
            "Grad-CAM galleries (the node's overlays of the images of each true class that get "
            "the highest probability of it): " + ", ".join(galleries) + ".",
        ]
    return "\n".join([*lines, ""])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


SCALAR_FIGURES = {
    "balanced_accuracy": "balanced accuracy",
    "quadratic_weighted_kappa": "quadratic-weighted kappa",
    "accuracy": "accuracy",
    "auc_macro": "macro one-vs-rest AUC",
    "expected_calibration_error": "expected calibration error",
}
"""The scalar figures a training run reports, with their names for people."""

PER_CLASS_FIGURES = ("precision", "recall", "f1", "auc_one_vs_rest")
"""The per-class figures a training run reports, in column order."""


def training_rows(
    metrics: dict[str, Any],
) -> tuple[list[tuple[str, str]], list[tuple[str, ...]]]:
    """What a finished training run prints: (figure, value) rows and per-class rows.

    With ``cross_validation`` in ``metrics`` (several folds ran) the values are
    "mean ± sd" over the folds, followed by those at the other folds' median best
    epoch (:data:`~dicomnode.training.metrics.OTHER_FOLDS_EPOCH`) where the metrics
    have them; else the held-out fold's own values. Per-class rows are
    (class index, precision, recall, F1, AUC).
    """
    summary = metrics.get("cross_validation")
    if isinstance(summary, dict):
        scalars = [
            (label, _mean_sd(summary[key]["mean"], summary[key]["sd"]))
            for key, label in SCALAR_FIGURES.items()
            if key in summary
        ]
        scalars += _other_folds_epoch_rows(metrics.get(OTHER_FOLDS_EPOCH))
        columns = [
            [
                _mean_sd(mean, sd)
                for mean, sd in zip(
                    summary.get(f"{key}_per_class_mean", []),
                    summary.get(f"{key}_per_class_sd", []),
                    strict=True,
                )
            ]
            for key in PER_CLASS_FIGURES
        ]
    else:
        scalars = [
            (label, _mean_sd(metrics.get(key), None))
            for key, label in SCALAR_FIGURES.items()
            if key in metrics
        ]
        per_class = metrics.get("per_class", {})
        columns = [
            [_mean_sd(v, None) for v in per_class.get(key, [])] for key in PER_CLASS_FIGURES[:3]
        ]
        columns.append([_mean_sd(v, None) for v in metrics.get("auc_one_vs_rest", [])])
    rows = [(str(c), *values) for c, values in enumerate(zip(*columns, strict=True))]
    return scalars, rows


def _other_folds_epoch_rows(figures: Any) -> list[tuple[str, str]]:
    """(figure, mean ± sd) rows of each fold read at the other folds' median best epoch."""
    if not isinstance(figures, dict):
        return []
    return [
        (f"{label}, at the other folds' median best epoch", _mean_sd(value["mean"], value["sd"]))
        for key, label in SCALAR_FIGURES.items()
        if isinstance(value := figures.get(key), dict)
    ]


def _mean_sd(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"
