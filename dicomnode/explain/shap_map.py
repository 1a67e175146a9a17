"""SHAP attributions for one image, outside the node's hot path (``dicomnode explain``).

Uses ``shap.GradientExplainer`` (expected gradients) with a small background of
blurred and blank versions of the same input, and returns the absolute
attribution summed over channels, normalised to [0, 1] in the input's geometry.
The ``shap`` library is an optional dependency: ``pip install 'dicomnode[explain]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dicomnode.errors import InferenceError
from dicomnode.values import FloatArray


def _background(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Blank and increasingly blurred copies of ``tensor`` (C, H, W): the SHAP reference inputs."""
    copies = [torch.zeros_like(tensor)]
    for index in range(1, count):
        size = 2 * index + 1
        blurred = F.avg_pool2d(
            tensor[None], size, stride=1, padding=index, count_include_pad=False
        )[0]
        copies.append(blurred)
    return torch.stack(copies)


def shap_attribution(
    model: nn.Module,
    tensor: torch.Tensor,
    target: int,
    *,
    background: int = 8,
    samples: int = 32,
    seed: int = 0,
) -> FloatArray:
    """|SHAP| of class ``target`` for input ``tensor`` (C, H, W), as an (H, W) map in [0, 1]."""
    try:
        import shap
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise InferenceError(
            "SHAP needs the optional dependency: pip install 'dicomnode[explain]'"
        ) from exc
    model.eval()
    torch.manual_seed(seed)
    with torch.enable_grad():
        explainer = shap.GradientExplainer(model, _background(tensor, background))
        values: Any = explainer.shap_values(tensor[None], nsamples=samples, rseed=seed)
    attribution = np.asarray(values, dtype=np.float32)
    attribution = _select_class(attribution, target, tensor.shape)
    magnitude = np.abs(attribution).sum(axis=0)
    peak = float(magnitude.max())
    normalised: FloatArray = (magnitude / peak if peak > 0 else magnitude).astype(np.float32)
    return normalised


def _select_class(
    values: np.ndarray[Any, Any], target: int, shape: torch.Size
) -> np.ndarray[Any, Any]:
    """shap returns (N, C, H, W, classes) or a list per class; take image 0 and ``target``."""
    selected: np.ndarray[Any, Any]
    if values.ndim == 5 and values.shape[-1] > target:
        selected = values[0, ..., target]
        return selected
    if values.ndim == 5:
        selected = values[target, 0]
        return selected
    raise InferenceError(f"unexpected SHAP output shape {values.shape} for input {tuple(shape)}")
