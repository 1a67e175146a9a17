"""The figures every model card reports, and temperature scaling.

All functions take integer labels (N,) and class probabilities (N, K) as
numpy arrays and agree with scikit-learn where it has an equivalent (tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

IntArray = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]
ECE_BINS = 15


def confusion(labels: IntArray, predicted: IntArray, num_classes: int) -> IntArray:
    """Rows = true class, columns = predicted class."""
    matrix: IntArray = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def _safe_ratio(numerator: Float64Array, denominator: Float64Array) -> Float64Array:
    out: Float64Array = np.divide(
        numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0
    )
    return out


def per_class(matrix: IntArray) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class (0 where undefined, as zero_division=0)."""
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    precision = _safe_ratio(tp, m.sum(axis=0))
    recall = _safe_ratio(tp, m.sum(axis=1))
    f1 = _safe_ratio(2 * precision * recall, precision + recall)
    support = m.sum(axis=1)
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
    }


def balanced_accuracy(matrix: IntArray) -> float:
    """Mean recall over the classes that occur in the labels."""
    m = matrix.astype(np.float64)
    present = m.sum(axis=1) > 0
    return float(np.mean(np.diag(m)[present] / m.sum(axis=1)[present]))


def quadratic_kappa(matrix: IntArray) -> float:
    """Cohen's kappa with quadratic weights (ordinal grades)."""
    m = matrix.astype(np.float64)
    k = m.shape[0]
    grid = np.arange(k)
    weights = (grid[:, None] - grid[None, :]) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(m.sum(axis=1), m.sum(axis=0)) / m.sum()
    denominator = float((weights * expected).sum())
    return 1.0 - float((weights * m).sum()) / denominator if denominator > 0 else 0.0


def binary_auc(positive: npt.NDArray[np.bool_], scores: Float64Array) -> float:
    """ROC AUC by the rank (Mann-Whitney) statistic, ties counted half; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def one_vs_rest_auc(labels: IntArray, probabilities: Float64Array) -> list[float]:
    """One ROC AUC per class (class c against the rest)."""
    return [binary_auc(labels == c, probabilities[:, c]) for c in range(probabilities.shape[1])]


def roc_curve_points(
    positive: npt.NDArray[np.bool_], scores: Float64Array
) -> tuple[Float64Array, Float64Array]:
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-scores, kind="mergesort")
    hits = positive[order].astype(np.float64)
    distinct = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
    tps = np.r_[0.0, np.cumsum(hits)[distinct]]
    fps = np.r_[0.0, (distinct + 1) - tps[1:]]
    return fps / max(fps[-1], 1.0), tps / max(tps[-1], 1.0)


def calibration_bins(
    labels: IntArray, probabilities: Float64Array, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin ((lo, hi], equal width): count, mean confidence, accuracy."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": float(count),
                "confidence": float(confidence[inside].mean()) if count else 0.0,
                "accuracy": float(correct[inside].mean()) if count else 0.0,
            }
        )
    return rows


def expected_calibration_error(
    labels: IntArray, probabilities: Float64Array, bins: int = ECE_BINS
) -> float:
    """Sum over bins of (bin share) x |accuracy - confidence|."""
    total = len(labels)
    return float(
        sum(
            r["count"] / total * abs(r["accuracy"] - r["confidence"])
            for r in calibration_bins(labels, probabilities, bins)
        )
    )


def classification_metrics(labels: IntArray, probabilities: Float64Array) -> dict[str, Any]:
    """Every reported figure for one set of predictions, as JSON-ready values."""
    num_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1).astype(np.int64)
    matrix = confusion(labels, predicted, num_classes)
    auc = one_vs_rest_auc(labels, probabilities)
    finite = [a for a in auc if not np.isnan(a)]
    return {
        "n": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": balanced_accuracy(matrix),
        "quadratic_weighted_kappa": quadratic_kappa(matrix),
        "auc_one_vs_rest": [None if np.isnan(a) else a for a in auc],
        "auc_macro": float(np.mean(finite)) if finite else None,
        "expected_calibration_error": expected_calibration_error(labels, probabilities),
        "per_class": per_class(matrix),
        "confusion_matrix": matrix.tolist(),
    }


def softmax(logits: Float64Array, temperature: float = 1.0) -> Float64Array:
    shifted = logits / temperature
    shifted = shifted - shifted.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: Float64Array = exp / exp.sum(axis=1, keepdims=True)
    return out


def fit_temperature(logits: Float64Array, labels: IntArray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    logit_t = torch.as_tensor(logits, dtype=torch.float64)
    label_t = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logit_t / log_t.exp(), label_t)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def summarise_folds(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of the figures across folds.

    Scalars (accuracy, balanced accuracy, QWK, macro AUC, ECE) get ``{mean, sd}``;
    per-class precision, recall, F1 and one-vs-rest AUC get ``<key>_per_class_mean``
    and ``<key>_per_class_sd`` (lists, one value per class), each over the folds
    that hold the class (see :func:`_add_per_class` for classes too few folds hold).
    """
    keys = (
        "accuracy",
        "balanced_accuracy",
        "quadratic_weighted_kappa",
        "auc_macro",
        "expected_calibration_error",
    )
    summary: dict[str, Any] = {}
    for key in keys:
        values = [float(f[key]) for f in per_fold if f.get(key) is not None]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "sd": _sd(values)}
    held = _held(per_fold)
    for key in ("precision", "recall", "f1"):
        table = np.asarray([f["per_class"][key] for f in per_fold], dtype=np.float64)
        _add_per_class(summary, key, table, held)
    auc = [[np.nan if a is None else a for a in f["auc_one_vs_rest"]] for f in per_fold]
    table = np.asarray(auc, dtype=np.float64)
    _add_per_class(summary, "auc_one_vs_rest", table, held & np.isfinite(table))
    return summary


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _held(per_fold: list[dict[str, Any]]) -> npt.NDArray[np.bool_]:
    """(folds, classes): whether each fold's held-out images hold each class."""
    support = np.asarray([f["per_class"]["support"] for f in per_fold], dtype=np.float64)
    held: npt.NDArray[np.bool_] = support > 0
    return held


def _add_per_class(
    summary: dict[str, Any], key: str, table: Float64Array, held: npt.NDArray[np.bool_]
) -> None:
    """Per-class mean and sd over the folds that hold each class (a fold without a
    class has no recall, F1 or AUC for it; AUC also skips a fold where it is undefined).

    With no such fold the mean is 0 for precision, recall and F1 (as scikit-learn's
    ``zero_division=0``) and ``None`` for AUC; with fewer than two the sd is ``None``.
    """
    columns = [table[held[:, c], c].tolist() for c in range(table.shape[1])]
    empty = None if key == "auc_one_vs_rest" else 0.0
    summary[f"{key}_per_class_mean"] = [float(np.mean(v)) if v else empty for v in columns]
    summary[f"{key}_per_class_sd"] = [_sd(v) if len(v) > 1 else None for v in columns]


OTHER_FOLDS_EPOCH = "cross_validation_other_folds_epoch"
"""The metrics key of :func:`at_other_folds_epoch`: a less optimistic cross-validation."""

OTHER_FOLDS_FIGURES = ("balanced_accuracy", "quadratic_weighted_kappa")
"""The validation figures each epoch's history records that :func:`at_other_folds_epoch` reads."""


def median_epoch(epochs: list[int]) -> int:
    """The median of ``epochs``, a half rounded up (the mean of the two middle ones)."""
    ordered = sorted(epochs)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle] + 1) // 2


def at_other_folds_epoch(per_fold: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each fold's validation figures at an epoch its own validation did not choose.

    A fold's kept epoch is the one with the best balanced accuracy on its own
    held-out images, which flatters its figures a little. Here fold ``k`` is
    read, from its per-epoch ``history``, at ``e_k``: the median ``best_epoch`` of
    the other folds (:func:`median_epoch`), clipped to the epochs fold ``k`` ran.
    Returns ``per_fold`` rows (fold, epoch, figures) and ``{mean, sd}`` of each
    of :data:`OTHER_FOLDS_FIGURES`; ``None`` when fewer than two folds have figures.
    """
    rows = [row for k in range(len(per_fold)) if (row := _other_folds_row(per_fold, k))]
    if len(rows) < 2:
        return None
    summary: dict[str, Any] = {"per_fold": rows}
    for key in OTHER_FOLDS_FIGURES:
        values = [float(row[key]) for row in rows]
        summary[key] = {"mean": float(np.mean(values)), "sd": _sd(values)}
    return summary


def _other_folds_row(per_fold: list[dict[str, Any]], k: int) -> dict[str, Any] | None:
    """Fold ``k``'s figures at the other folds' median best epoch, or None when not recorded."""
    others = [int(f["best_epoch"]) for j, f in enumerate(per_fold) if j != k]
    others = [epoch for epoch in others if epoch >= 1]
    fold = per_fold[k]
    if not others or int(fold.get("epochs_run", 0)) < 1:
        return None
    epoch = min(median_epoch(others), int(fold["epochs_run"]))
    record = next((r for r in fold.get("history", []) if r.get("epoch") == epoch), None)
    if record is None or any(record.get(key) is None for key in OTHER_FOLDS_FIGURES):
        return None
    return {
        "fold": fold.get("fold"),
        "epoch": epoch,
        **{key: float(record[key]) for key in OTHER_FOLDS_FIGURES},
    }
