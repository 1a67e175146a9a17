"""The values a training run passes between its stages: prepared data, a fold's trainer and loop,
its result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dicomnode.training.attention import CamSupervision
from dicomnode.training.config import TrainingConfig
from dicomnode.training.data import Fingerprints, IntArray, LabelledImages, PixelCache
from dicomnode.training.masks import LesionMasks
from dicomnode.training.metrics import Float64Array


@dataclass(frozen=True, eq=False)
class Prepared:
    """Everything a run shares across folds."""

    config: TrainingConfig
    images: LabelledImages
    cache: PixelCache
    assignment: IntArray
    fingerprints: Fingerprints
    """Each image's pixel digest and near hash."""
    device: torch.device
    masks: LesionMasks | None = None


@dataclass(eq=False)
class Trainer:
    """The model, optimiser, schedule and loss of one fold."""

    model: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss: nn.Module
    steps_per_epoch: int
    supervision: CamSupervision | None = None


@dataclass(eq=False)
class LoopState:
    """The mutable state of one fold's loop (saved in ``last.pt``)."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class FoldResult:
    """The kept weights of one fold (of epoch ``kept_epoch``) and their validation logits.

    ``logits`` and ``labels`` are None without validation.
    """

    fold: int | None
    state: dict[str, torch.Tensor]
    logits: Float64Array | None
    labels: IntArray | None
    loop: LoopState
    kept_epoch: int
