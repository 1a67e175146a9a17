"""Prepared pixels -> model input tensor, and heatmaps back to pixel geometry.

This is the one code path from a prepared image to a tensor: the node,
training and evaluation all call :func:`to_input`, so a model sees the same
numbers in production as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.values import FloatArray


@dataclass(frozen=True)
class Placement:
    """Where the source pixels sit inside the model input (for letterboxing)."""

    source_rows: int
    source_columns: int
    top: int
    left: int
    rows: int
    columns: int

    @property
    def scale(self) -> float:
        """Source pixels per model-input pixel (the mean of both axes)."""
        return (self.source_columns / self.columns + self.source_rows / self.rows) / 2

    def source_point(self, x: float, y: float) -> tuple[float, float]:
        """A model-input point (continuous pixel units: pixel k spans [k, k + 1)) on the source."""
        return (
            (x - self.left) * self.source_columns / self.columns,
            (y - self.top) * self.source_rows / self.rows,
        )

    def input_point(self, x: float, y: float) -> tuple[float, float]:
        """A source point in the model input: the inverse of :meth:`source_point`."""
        return (
            self.left + x * self.columns / self.source_columns,
            self.top + y * self.rows / self.source_rows,
        )


def _tensor(array: FloatArray) -> torch.Tensor:
    """A (1, 1, H, W) float32 tensor of a 2-D array, sharing memory only when it is writable.

    Prepared pixels and heatmaps may be read-only; ``torch.from_numpy`` warns on those.
    """
    contiguous = np.ascontiguousarray(array, dtype=np.float32)
    if not contiguous.flags.writeable:
        contiguous = contiguous.copy()
    return torch.from_numpy(contiguous)[None, None]


def resize_images(array: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Resize an (N, C, H, W) float tensor with antialiasing when shrinking (bilinear)."""
    shrinking = rows < array.shape[-2] or columns < array.shape[-1]
    return F.interpolate(
        array, size=(rows, columns), mode="bilinear", align_corners=False, antialias=shrinking
    )


def to_input(
    pixels: FloatArray,
    size: tuple[int, int],
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: str = "stretch",
) -> tuple[torch.Tensor, Placement]:
    """Turn a (rows, columns) image in [0, 1] into a normalised (C, H, W) tensor.

    ``size`` is (height, width). ``resize`` is ``stretch`` or ``letterbox``.
    """
    height, width = size
    source = _tensor(pixels)
    rows, columns = int(source.shape[-2]), int(source.shape[-1])
    if resize == "letterbox":
        scale = min(height / rows, width / columns)
        inner_rows, inner_cols = max(1, round(rows * scale)), max(1, round(columns * scale))
        top, left = (height - inner_rows) // 2, (width - inner_cols) // 2
        canvas = torch.zeros((1, 1, height, width), dtype=torch.float32)
        canvas[..., top : top + inner_rows, left : left + inner_cols] = resize_images(
            source, inner_rows, inner_cols
        )
        placement = Placement(rows, columns, top, left, inner_rows, inner_cols)
        fitted = canvas
    else:
        fitted = (
            resize_images(source, height, width) if (rows, columns) != (height, width) else source
        )
        placement = Placement(rows, columns, 0, 0, height, width)
    image = fitted[0].expand(channels, height, width)
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((image - mean_t) / std_t).contiguous(), placement


def to_source_geometry(
    cam: FloatArray, placement: Placement, size: tuple[int, int] | None = None
) -> FloatArray:
    """Map a heatmap in model-input geometry back onto the source pixels.

    ``size``: the (rows, columns) of the result when the source is wanted at
    another scale (a smaller overlay, say); ``None`` gives the source's own.
    """
    tensor = _tensor(cam)
    inner = tensor[
        ...,
        placement.top : placement.top + placement.rows,
        placement.left : placement.left + placement.columns,
    ]
    back = F.interpolate(
        inner,
        size=size or (placement.source_rows, placement.source_columns),
        mode="bilinear",
        align_corners=False,
    )
    result: FloatArray = back[0, 0].clamp_(0.0, 1.0).numpy()
    return result
