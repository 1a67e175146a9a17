"""The SHAP map of ``dicomnode explain``: where the attribution is, readable on the overlay."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dicomnode.encode.render import HEAT_THRESHOLD
from dicomnode.explain.shap_map import displayable, shap_attribution

ROWS, COLUMNS = slice(20, 36), slice(24, 40)


class RegionModel(nn.Module):
    """Class 1's logit is the sum of one square of the image; class 0's is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, ROWS, COLUMNS].sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(region), region], dim=1)


def _speckled_image(seed: int = 0) -> torch.Tensor:
    """Heavy-tailed noise: a few pixels carry most of any pixel attribution."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 64, 64, generator=generator).pow(6) * 4.0


def test_shap_shows_the_region_the_model_reads_not_a_dot() -> None:
    image = _speckled_image()
    heat = shap_attribution(RegionModel(), image, target=1)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) == 1.0
    inside = np.zeros((64, 64), dtype=bool)
    inside[ROWS, COLUMNS] = True
    # the overlay paints values at or above its threshold: most of the region shows
    assert (heat[inside] >= HEAT_THRESHOLD).mean() >= 0.9
    # nothing beyond the smoothing's reach (3 sigma, sigma 2 % of 64 px) of the region
    far = np.ones((64, 64), dtype=bool)
    far[ROWS.start - 5 : ROWS.stop + 5, COLUMNS.start - 5 : COLUMNS.stop + 5] = False
    assert float(heat[far].max()) == 0.0
    # scaled by its largest pixel, the same attribution would show under a third of the region
    raw = (image[0] * 1.0).numpy()[ROWS, COLUMNS]
    assert (raw / raw.max() >= HEAT_THRESHOLD).mean() < 0.35


def test_displayable_spreads_a_single_pixel_and_keeps_zero_at_zero() -> None:
    spike = np.zeros((50, 40), dtype=np.float32)
    spike[25, 20] = 7.0
    shown = displayable(spike)
    assert float(shown[25, 20]) == 1.0
    painted = np.argwhere(shown >= HEAT_THRESHOLD)
    assert 1 < len(painted) < 50
    assert painted.min(axis=0).tolist() == [23, 18] and painted.max(axis=0).tolist() == [27, 22]
    assert not displayable(np.zeros((50, 40), dtype=np.float32)).any()
