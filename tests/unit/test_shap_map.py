"""The SHAP map of ``dicomnode explain``: where the attribution is, readable on the overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomnode.encode.render import HEAT_THRESHOLD
from dicomnode.explain.gradcam import peak
from dicomnode.explain.shap_map import DESCRIPTION, KNEE, SHAP, displayable, shap_attribution
from dicomnode.inference import Predictor
from dicomnode.models.card import GradCamSpec
from dicomnode.testing.models import make_tiny_model
from dicomnode.values import PreparedImage

ROWS, COLUMNS = slice(20, 36), slice(24, 40)


class RegionModel(nn.Module):
    """Class 1's logit is the sum of one square of the image; class 0's is zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, ROWS, COLUMNS].sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(region), region], dim=1)


class WholeImageModel(nn.Module):
    """Both logits read every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=(1, 2, 3))
        return torch.stack([-total, total], dim=1)


def _numpy_state() -> np.ndarray:
    """numpy's global random state (its key array), to check that nothing drew from it."""
    state = np.random.get_state()
    assert isinstance(state, tuple)
    return state[1].copy()


def _speckled_image(seed: int = 0) -> torch.Tensor:
    """Heavy-tailed noise: a few pixels carry most of any pixel attribution."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 64, 64, generator=generator).pow(6) * 4.0


def test_shap_shows_the_region_the_model_reads_not_a_dot() -> None:
    heat = shap_attribution(RegionModel(), _speckled_image(), target=1)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and KNEE < float(heat.max()) < 1.0
    inside = np.zeros((64, 64), dtype=bool)
    inside[ROWS, COLUMNS] = True
    # the overlay paints values at or above its threshold: most of the region shows
    assert (heat[inside] >= HEAT_THRESHOLD).mean() >= 0.9
    column, row = peak(heat)
    assert inside[int(row), int(column)]
    # nothing beyond the smoothing's reach (3 sigma, sigma 2 % of 64 px) of the region
    far = np.ones((64, 64), dtype=bool)
    far[ROWS.start - 5 : ROWS.stop + 5, COLUMNS.start - 5 : COLUMNS.stop + 5] = False
    assert float(heat[far].max()) == 0.0


def test_displayable_keeps_the_peak_where_the_attribution_is_largest() -> None:
    spike = np.zeros((50, 40), dtype=np.float32)
    spike[25, 20] = 7.0
    shown = displayable(spike)
    assert peak(shown) == (20.0, 25.0)  # no plateau at 1 whose first pixel would win
    assert int((shown == shown.max()).sum()) == 1
    painted = np.argwhere(shown >= HEAT_THRESHOLD)
    assert painted.min(axis=0).tolist() == [23, 18] and painted.max(axis=0).tolist() == [27, 22]
    rows, columns = np.mgrid[0:320, 0:320]
    blob = np.exp(-((columns - 100.0) ** 2 + (rows - 200.0) ** 2) / (2 * 30.0**2))
    assert peak(displayable(blob)) == (100.0, 200.0)
    assert not displayable(np.zeros((50, 40), dtype=np.float32)).any()


def test_letterbox_padding_gets_no_attribution_and_random_state_is_kept() -> None:
    """Black bands (the input's minimum, as a letterbox pads) are the blank reference."""
    generator = torch.Generator().manual_seed(1)
    tensor = torch.full((1, 64, 96), -2.1)
    tensor[:, :, 24:72] = torch.rand(1, 64, 48, generator=generator)
    torch_state, numpy_state = torch.get_rng_state(), _numpy_state()
    heat = shap_attribution(WholeImageModel(), tensor, target=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(_numpy_state(), numpy_state)
    assert float(heat[:, 24:72].max()) > KNEE
    # beyond the blurred references' reach (7 px) and the smoothing's (4 px): float rounding only
    assert float(heat[:, :12].max()) < 1e-4 and float(heat[:, 84:].max()) < 1e-4


def test_shap_explains_each_knee_of_a_bilateral_film_inside_its_box(tmp_path: Path) -> None:
    """With a localiser card, SHAP maps each joint's crop back onto its own box, as Grad-CAM."""
    card = make_tiny_model(tmp_path / "m", num_classes=5, localiser=True)
    predictor = Predictor.load(tmp_path / "m", card)
    rows, columns = 300, 500
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = np.full((rows, columns), 0.05, dtype=np.float32)
    for cx, cy in ((130, 150), (370, 150)):
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < 50**2] = 0.9
    image = PreparedImage(pixels, None, "bilateral")
    (plain,) = predictor.predict([image])
    shap = predictor.with_explainer(SHAP)
    assert shap.identity.explanation == "SHAP (expected gradients), smoothed"
    assert shap.identity.explanation_method == "shap"
    flipping = Predictor.load(tmp_path / "m", card.model_copy(update={"test_time_flip": True}))
    assert flipping.with_explainer(SHAP).identity.explanation == (
        "SHAP (expected gradients), smoothed, of the mean of the input's and its mirror's "
        "logits (test-time flip)"
    )
    assert predictor.identity.explanation_method == predictor.card.gradcam.method
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
        assert float(finding.heatmap.max()) > KNEE and not finding.heatmap[outside].any()
        x, y = finding.peak
        assert box.x0 <= x < box.x1 and box.y0 <= y < box.y1


def test_a_new_card_explanation_drops_the_explainer_and_a_localiser_change_keeps_it(
    tmp_path: Path,
) -> None:
    card = make_tiny_model(tmp_path / "m", localiser=True)
    shap = Predictor.load(tmp_path / "m", card).with_explainer(SHAP)
    layercam = shap.with_explanation(GradCamSpec(target_layer="features", method="layercam"))
    assert layercam.explainer is None and layercam.identity.explanation == "LayerCAM at features"
    assert layercam.identity.explanation_method == "layercam"
    whole = shap.without_localiser()
    assert whole.explainer is SHAP and whole.localiser is None
    assert whole.identity.explanation == DESCRIPTION
