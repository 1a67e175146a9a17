"""The SHAP map of ``dicomnode explain``: where the attribution is, readable on the overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomnode.encode.render import HEAT_THRESHOLD
from dicomnode.explain.shap_map import DESCRIPTION, displayable, shap_attribution, shap_cams
from dicomnode.inference import Explainer, Predictor
from dicomnode.testing.models import make_tiny_model
from dicomnode.values import PreparedImage

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
    raw = image[0].numpy()[ROWS, COLUMNS]
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


def test_shap_explains_each_knee_of_a_bilateral_film_inside_its_box(tmp_path: Path) -> None:
    """With a localiser card, SHAP maps each joint's crop back onto its own box, as Grad-CAM."""
    card = make_tiny_model(tmp_path / "m", num_classes=5, localiser=True)
    predictor = Predictor.load(tmp_path / "m", card)
    rows, columns = 300, 500
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = np.full((rows, columns), 0.05, dtype=np.float32)
    for x, y in ((130, 150), (370, 150)):
        pixels[(yy - y) ** 2 + (xx - x) ** 2 < 50**2] = 0.9
    image = PreparedImage(pixels, None, "bilateral")
    (plain,) = predictor.predict([image])
    shap = predictor.with_explainer(Explainer(DESCRIPTION, shap_cams))
    assert shap.identity.explanation == "SHAP (expected gradients), smoothed"
    assert predictor.identity.explanation.startswith("Grad-CAM")  # the original is untouched
    (explained,) = shap.predict([image])
    assert explained.model.explanation == DESCRIPTION
    assert [f.region for f in explained.findings] == [f.region for f in plain.findings]
    assert len(explained.findings) == 2
    for finding, reference in zip(explained.findings, plain.findings, strict=True):
        assert finding.probabilities == pytest.approx(reference.probabilities, abs=1e-5)
        box = finding.region
        outside = np.ones((rows, columns), dtype=bool)
        outside[box.y0 : box.y1, box.x0 : box.x1] = False
        assert float(finding.heatmap.max()) == 1.0 and not finding.heatmap[outside].any()
        x, y = finding.peak
        assert box.x0 <= x < box.x1 and box.y0 <= y < box.y1
