"""The training loss: cross-entropy whose class weights weigh whole samples.

``class_weights: balanced`` gives each class the weight ``n / (k * n_c)``, so
that the rare grades count as much as the common ones. A recipe's
``label_smoothing: eps`` replaces each one-hot target by
``(1 - eps) * onehot + eps / k``.

torch's ``nn.CrossEntropyLoss(weight=w, label_smoothing=eps)`` combines the two
per *term*: the ``eps / k`` share of every class ``c`` in the smoothed target is
multiplied by that class's own weight ``w_c``. With balanced weights on an
imbalanced set that pulls every image towards the rare classes: on the knee
training split (``w`` = 0.51 / 1.10 / 0.76 / 1.53 / 6.68 for KL 0-4, ``eps``
0.1) the loss is lowest, for an image that is clearly KL0, at a predicted KL4
probability of 0.20, and a model trained with it says "KL4: 18 %" of healthy
knees.

:class:`WeightedCrossEntropy` weighs each *sample* by the weight of its own
class, smoothing included::

    loss = sum_n w_{y_n} * CE_eps(logits_n, y_n) / sum_n w_{y_n}

Its optimum for a clear image of class ``y`` is the smoothed target itself
(``1 - eps + eps / k`` on ``y``, ``eps / k`` on every other class, whatever the
weights); over a population it is ``(1 - eps) * P_bal(c | x) + eps / k``, with
``P_bal`` the class-balanced posterior ``w_c P(c | x) / sum_j w_j P(j | x)``
that balanced weights are meant to give. Without smoothing it equals torch's
weighted cross-entropy exactly (the same weighted mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightedCrossEntropy(nn.Module):
    """Sample-weighted, optionally label-smoothed cross-entropy (see the module notes).

    Parameters
    ----------
    weight:
        One weight per class (a sample weighs its class's weight), or ``None``
        for the plain mean.
    label_smoothing:
        ``eps`` in [0, 1): the share of each target spread evenly over the classes.
    """

    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted mean loss of a batch: ``logits`` (N, k), ``labels`` (N,)."""
        per_sample = F.cross_entropy(
            logits, labels, label_smoothing=self.label_smoothing, reduction="none"
        )
        if self.weight is None:
            return per_sample.mean()
        weights = self.weight[labels].to(per_sample.dtype)
        return (per_sample * weights).sum() / weights.sum()


def make_loss(
    weight: torch.Tensor | None, label_smoothing: float, smoothing_weights: str = "per_sample"
) -> nn.Module:
    """The recipe's training loss.

    ``per_sample`` (the default since 2026-12-04): :class:`WeightedCrossEntropy`.
    ``per_term``: torch's ``nn.CrossEntropyLoss(weight, label_smoothing)``, which
    weighs each smoothed term by its class's weight (see the module notes); the
    recipes of models trained before then name it, so that they still reproduce
    their weights. The two agree without label smoothing.
    """
    if smoothing_weights == "per_term":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if smoothing_weights != "per_sample":
        raise ValueError(
            f"smoothing_weights must be per_sample or per_term, not {smoothing_weights!r}"
        )
    return WeightedCrossEntropy(weight, label_smoothing)
