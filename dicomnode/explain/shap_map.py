"""SHAP attributions for one image, outside the node's hot path (``dicomnode explain``
and ``dicomnode pointing --method shap``; :data:`SHAP` is their explainer).

Uses ``shap.GradientExplainer`` (expected gradients) of the explained class alone,
with a small background of a black and increasingly blurred versions of the same
input (black: the input's per-channel minimum, so a letterbox's padding, which is
black, gets no attribution). Pixel attributions are speckled: scaled by their
single largest pixel, 99 % of a knee crop's map fell below the overlay's display
threshold (0.2) and the overlay showed a dot. The map is therefore the absolute
attribution summed over channels, smoothed with a Gaussian of sigma 2 % of the
shorter side and scaled so that its 99.5th percentile is 0.95; the values v above
are compressed into (0.95, 1) as 1 - 0.05 * 0.95 / v, keeping their order (clipped
at 1, they made a flat top whose first pixel in row order became the peak, up to 12
pixels from the maximum), so the map's peak is the smoothed attribution's maximum.
The random draws use their own generators: the process's random state is left as
it was.
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
from dicomnode.explain.gradcam import CamBatch, Explainer
from dicomnode.values import FloatArray

SMOOTHING = 0.02
"""Sigma of the Gaussian that smooths the attribution, as a share of the shorter side."""
SCALE_PERCENTILE = 99.5
"""The percentile of the smoothed map that becomes :data:`KNEE` (higher values are compressed)."""
KNEE = 0.95
"""Where the scale bends: values above it approach 1 without reaching a plateau."""
SHAP_BATCH = 4
"""Samples per backward pass. shap's default of 50 took all of them at once: on the
five-member spine ensemble at 320 px that passed 14 GB and was killed."""
DESCRIPTION = "SHAP (expected gradients), smoothed"
"""What outputs say a SHAP map is."""


class _OneClass(nn.Module):
    """The logit of one class only: shap then differentiates that output alone."""

    def __init__(self, model: nn.Module, target: int) -> None:
        super().__init__()
        self.model = model
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(x)
        return logits[:, self.target : self.target + 1]


def _background(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """A black copy and increasingly blurred copies of ``tensor`` (C, H, W): SHAP's references."""
    black = tensor.amin(dim=(1, 2), keepdim=True).expand_as(tensor)
    copies = [black.clone()]
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
    """|SHAP| of class ``target`` for input ``tensor`` (C, H, W), as an (H, W) map in [0, 1].

    Raises
    ------
    InferenceError
        If ``shap`` is not installed or the attribution is not finite.
    """
    try:
        import shap
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise InferenceError(
            "SHAP needs the optional dependency: pip install 'dicomnode[explain]'"
        ) from exc
    model.eval()
    numpy_state = np.random.get_state()  # shap seeds numpy's global generator
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            explainer = shap.GradientExplainer(
                _OneClass(model, target), _background(tensor, background), batch_size=SHAP_BATCH
            )
            values: Any = explainer.shap_values(tensor[None], nsamples=samples, rseed=seed)
    finally:
        np.random.set_state(numpy_state)
    attribution = _first_output(np.asarray(values, dtype=np.float32), tensor.shape)
    magnitude = np.abs(attribution).sum(axis=0)
    if not np.isfinite(magnitude).all():
        raise InferenceError("SHAP gave non-finite attributions")
    return displayable(magnitude)


def displayable(magnitude: np.ndarray[Any, Any]) -> FloatArray:
    """An (H, W) attribution magnitude smoothed and scaled to [0, 1] for the overlay.

    Order-preserving: the largest smoothed value stays the single largest.
    """
    sigma = max(1.0, SMOOTHING * min(magnitude.shape))
    kernel = min(2 * round(3 * sigma) + 1, 2 * min(magnitude.shape) - 1)  # reflect padding
    source = torch.from_numpy(np.ascontiguousarray(magnitude, dtype=np.float32))
    smoothed = gaussian_blur(source[None, None], [kernel, kernel], [sigma, sigma])[0, 0].numpy()
    smoothed = smoothed.astype(np.float64)
    scale = float(np.percentile(smoothed, SCALE_PERCENTILE)) or float(smoothed.max())
    if scale <= 0:
        return np.zeros(magnitude.shape, dtype=np.float32)
    scaled = KNEE * smoothed / scale
    over = scaled > KNEE
    scaled[over] = 1.0 - (1.0 - KNEE) * KNEE / scaled[over]  # hyperbolic: distinct in float32
    shown: FloatArray = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    return shown


def shap_cams(model: nn.Module, batch: torch.Tensor) -> CamBatch:
    """Logits and the SHAP map of each image's predicted class."""
    with torch.no_grad():
        logits = model(batch).float().cpu()
    classes = tuple(int(c) for c in logits.argmax(dim=1))
    maps = [shap_attribution(model, batch[i], c) for i, c in enumerate(classes)]
    return CamBatch(logits=logits, cams=np.stack(maps).astype(np.float32), classes=classes)


SHAP = Explainer(DESCRIPTION, shap_cams, method="shap")
"""The SHAP explainer of ``dicomnode explain`` and ``dicomnode pointing``."""


def _first_output(values: np.ndarray[Any, Any], shape: torch.Size) -> np.ndarray[Any, Any]:
    """shap returns (N, C, H, W, outputs) or a list per output; take image 0, output 0."""
    selected: np.ndarray[Any, Any]
    if values.ndim == 5 and values.shape[1:4] == tuple(shape):
        selected = values[0, ..., 0]
        return selected
    if values.ndim == 5 and values.shape[2:] == tuple(shape):
        selected = values[0, 0]
        return selected
    raise InferenceError(f"unexpected SHAP output shape {values.shape} for input {tuple(shape)}")
