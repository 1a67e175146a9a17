"""SHAP attributions for one image, outside the node's hot path (``dicomnode explain``).

Uses ``shap.GradientExplainer`` (expected gradients) with a small background of
blurred and blank versions of the same input. Pixel attributions are speckled:
scaled by their single largest pixel, 99 % of a knee crop's map fell below the
overlay's display threshold (0.2) and the overlay showed a dot. The map is
therefore the absolute attribution summed over channels, smoothed with a
Gaussian of sigma 2 % of the shorter side and scaled so that its 99.5th
percentile is 1 (clipped to [0, 1]), in the input's geometry.
The ``shap`` library is an optional dependency: ``pip install 'dicomnode[explain]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from dicomnode.errors import InferenceError
from dicomnode.explain.gradcam import CamBatch
from dicomnode.values import FloatArray

SMOOTHING = 0.02
"""Sigma of the Gaussian that smooths the attribution, as a share of the shorter side."""
SCALE_PERCENTILE = 99.5
"""The percentile of the smoothed map that becomes 1 (higher values are clipped)."""
SHAP_BATCH = 4
"""Samples per backward pass. shap's default of 50 took all of them at once: on the
five-member spine ensemble at 320 px that passed 14 GB and was killed."""


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
        explainer = shap.GradientExplainer(
            model, _background(tensor, background), batch_size=SHAP_BATCH
        )
        values: Any = explainer.shap_values(tensor[None], nsamples=samples, rseed=seed)
    attribution = np.asarray(values, dtype=np.float32)
    attribution = _select_class(attribution, target, tensor.shape)
    return displayable(np.abs(attribution).sum(axis=0))


def displayable(magnitude: np.ndarray[Any, Any]) -> FloatArray:
    """An (H, W) attribution magnitude smoothed and scaled to [0, 1] for the overlay."""
    sigma = max(1.0, SMOOTHING * min(magnitude.shape))
    kernel = min(2 * round(3 * sigma) + 1, 2 * min(magnitude.shape) - 1)  # reflect padding
    source = torch.from_numpy(np.ascontiguousarray(magnitude, dtype=np.float32))
    smoothed = gaussian_blur(source[None, None], [kernel, kernel], [sigma, sigma])[0, 0].numpy()
    scale = float(np.percentile(smoothed, SCALE_PERCENTILE))
    if scale <= 0:
        scale = float(smoothed.max())
    if scale <= 0:
        return np.zeros(magnitude.shape, dtype=np.float32)
    scaled: FloatArray = np.clip(smoothed / scale, 0.0, 1.0).astype(np.float32)
    return scaled


DESCRIPTION = "SHAP (expected gradients), smoothed"
"""What outputs say a SHAP map is."""


def shap_cams(model: nn.Module, batch: torch.Tensor) -> CamBatch:
    """Logits and the SHAP map of each image's predicted class (the ``explain`` of an
    :class:`~dicomnode.inference.Explainer` with :data:`DESCRIPTION`)."""
    with torch.no_grad():
        logits = model(batch).float().cpu()
    classes = tuple(int(c) for c in logits.argmax(dim=1))
    maps = [shap_attribution(model, batch[i], c) for i, c in enumerate(classes)]
    return CamBatch(logits=logits, cams=np.stack(maps).astype(np.float32), classes=classes)


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
