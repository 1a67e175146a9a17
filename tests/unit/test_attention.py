"""Mask supervision: masks travel with their images, the map is the node's, the term trains it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dicomnode.errors import ConfigError
from dicomnode.explain.gradcam import grad_cam
from dicomnode.models.architectures import build_model
from dicomnode.models.card import InputSpec, PreprocessingSpec, load_card
from dicomnode.training.attention import CamSupervision, layer_map, outside_mass
from dicomnode.training.config import AugmentConfig
from dicomnode.training.data import (
    ImageDataset,
    PixelCache,
    augment_pixels,
    augment_with_mask,
)
from dicomnode.training.masks import LesionMasks, fit_mask
from dicomnode.training.phantoms.dataset import write_phantom_folder
from dicomnode.training.train import train_from_config

SMOKE = Path(__file__).resolve().parents[2] / "config" / "training" / "tiny-smoke.yaml"
AUGMENT = AugmentConfig(rotation_deg=10, scale=(0.9, 1.1), translate=0.05, horizontal_flip=True)


def _square_image(size: int = 64) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """A dim image with one bright square, and the square as a mask."""
    pixels = np.full((size, size), 0.2, dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    mask[20:30, 36:46] = True
    pixels[mask] = 0.9
    return pixels, mask


def test_the_mask_is_warped_with_its_image_and_the_image_as_without_a_mask() -> None:
    pixels, mask = _square_image()
    for seed in range(5):
        image = torch.from_numpy(pixels)[None]
        plain = augment_pixels(image, AUGMENT, torch.Generator().manual_seed(seed))
        lesion = torch.from_numpy(mask)[None].float()
        generator = torch.Generator().manual_seed(seed)
        warped, moved = augment_with_mask(image, lesion, AUGMENT, generator)
        assert torch.equal(plain, warped)
        inside = moved[0] >= 0.5
        assert inside.sum() > 50
        # the bright square went where the mask went
        assert warped[0][inside].mean() > warped[0][~inside].mean() + 0.4


def test_a_dataset_item_carries_its_mask_in_input_geometry(tmp_path: Path) -> None:
    pixels, mask = _square_image()
    wide = np.concatenate([pixels, np.full((64, 64), 0.2, np.float32)], axis=1)
    wide_mask = np.concatenate([mask, np.zeros((64, 64), bool)], axis=1)
    Image.fromarray(wide_mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    masks = LesionMasks({0: tmp_path / "m.png"})
    cache = PixelCache(wide[None])
    spec = InputSpec(size=(32, 32), channels=1, mean=(0.0,), std=(1.0,))
    dataset = ImageDataset(
        cache,
        np.array([1], dtype=np.int64),
        [0],
        spec,
        PreprocessingSpec(resize="letterbox"),
        masks=masks,
    )
    tensor, label, fitted = dataset.masked(0)
    assert label == 1 and fitted.shape == (32, 32) and fitted.dtype == torch.bool
    assert torch.equal(tensor, dataset[0][0])
    # letterboxed: 128 x 64 -> 32 x 16 rows 8..24; the square (rows 20-30, cols 36-46) / 4
    rows, columns = torch.nonzero(fitted, as_tuple=True)
    assert int(rows.min()) >= 8 + 4 and int(rows.max()) <= 8 + 8
    assert int(columns.min()) >= 8 and int(columns.max()) <= 12
    assert tensor[0][fitted].mean() > 0.5 > 0.3 > tensor[0][~fitted].mean()


def test_lesion_masks_match_images_and_refuse_a_folder_without_them(tmp_path: Path) -> None:
    data = write_phantom_folder(tmp_path / "p", body_part="SPINE", count=6, seed=4, size=96)
    stems = tuple(sorted(p.stem for p in data.glob("[01]/*.png")))
    masks = LesionMasks.of_folder(data, stems)
    abnormal = sorted(p.stem for p in (data / "1").glob("*.png"))
    assert sorted(stems[i] for i in masks.paths) == abnormal
    some = next(iter(masks.paths))
    assert masks.mask(some, (96, 96)).any()
    normal = next(i for i, stem in enumerate(stems) if stem not in abnormal)
    assert not masks.mask(normal, (96, 96)).any()
    with pytest.raises(ConfigError, match=r"no phantoms\.csv"):
        LesionMasks.of_folder(tmp_path, stems)


def test_fit_mask_keeps_a_small_lesion_when_shrinking() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[40:44, 60:64] = True
    small = fit_mask(mask, (50, 50))
    assert small.shape == (50, 50)
    assert small[20:22, 30:32].all() and small.sum() == 4


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_the_trained_map_is_the_nodes_map(method: Any) -> None:
    torch.manual_seed(0)
    model = build_model("small_vgg", 1, 2, {"widths": [4, 8, 8]}).eval()
    inputs = torch.randn(3, 1, 32, 32)
    layers = "features.1+features.2"
    node = grad_cam(model, layers, inputs, classes=[1, 0, 1], method=method)
    with CamSupervision(model, layers, method, sharpness=20.0) as supervision:
        logits = model(inputs)
        score = logits.gather(1, torch.tensor([[1], [0], [1]]))[:, 0].sum()
        outputs = [supervision._outputs[0], supervision._outputs[1]]
        grads = torch.autograd.grad(score, outputs)
        maps = torch.stack(
            [layer_map(g, a, method, (32, 32)) for g, a in zip(grads, outputs, strict=True)]
        ).mean(0)
    low = maps.amin((1, 2), keepdim=True)
    ours = (maps - low) / (maps.amax((1, 2), keepdim=True) - low).clamp_min(1e-7)
    assert np.abs(ours.detach().numpy() - node.cams).max() < 0.02
    assert not supervision._handles  # the hooks are gone


def test_outside_mass_is_small_inside_and_large_outside() -> None:
    inside = torch.zeros(2, 100, dtype=torch.bool)
    inside[:, 10:14] = True
    cam = torch.zeros(2, 100)
    cam[0, 12] = 1.0  # peak in the mask
    cam[1, 60] = 1.0  # peak outside
    loss = outside_mass(cam, inside, sharpness=20.0)
    assert loss[0] < 0.01 < 10.0 < loss[1]


def test_a_sharper_mask_term_asks_where_the_peak_is() -> None:
    # A blob covering the mask (0.97) with its top pixel just inside, or just outside.
    inside = torch.zeros(2, 100, dtype=torch.bool)
    inside[:, 10:20] = True
    cam = torch.zeros(2, 100)
    cam[:, 8:22] = 0.97
    cam[0, 15] = 1.0  # hit
    cam[1, 21] = 1.0  # near miss: the rim of the lesion
    soft, sharp = (outside_mass(cam, inside, sharpness=s) for s in (20.0, 50.0))
    # At 20 the near miss costs little more than the hit; at 50 it stands out (stage 3, hand-ra).
    assert sharp[1] - sharp[0] > 3 * (soft[1] - soft[0]) > 0
    # The term tends to sharpness x (highest value outside - highest inside).
    limit = outside_mass(cam, inside, sharpness=2000.0) / 2000.0
    assert abs(float(limit[1]) - 0.03) < 0.002
    assert float(limit[0]) < 0.002


def test_the_mask_term_moves_the_peak_into_the_mask() -> None:
    torch.manual_seed(1)
    model = build_model("small_vgg", 1, 2, {"widths": [4, 8]})
    inputs = torch.rand(4, 1, 32, 32)
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 4:10, 22:28] = True
    labels = torch.ones(4, dtype=torch.int64)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    with CamSupervision(model, "features.0", "layercam", sharpness=20.0) as supervision:
        first = None
        for _ in range(60):
            optimiser.zero_grad()
            term = supervision.loss(model(inputs), labels, masks)
            term.loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            first = first if first is not None else (term.loss.item(), term.hits)
    assert term.images == 4
    assert first is not None and term.loss.item() < first[0] / 2
    assert term.hits == 4 > first[1]


def _phantom_recipe(tmp_path: Path, **overrides: Any) -> Path:
    raw = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    data = write_phantom_folder(tmp_path / "data", body_part="SPINE", count=12, seed=5, size=64)
    raw.update(
        data_dir=str(data),
        group_pattern=r"^(?P<group>P\d{6})_\d+$",
        output_dir=str(tmp_path / "model"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        cache_dir=str(tmp_path / "cache"),
        folds=2,
        gradcam_layer="features.0+features.1",
        gradcam_method="layercam",
        **overrides,
    )
    raw["model"]["body_parts"] = ["SPINE"]
    raw["model"]["classes"] = raw["model"]["classes"][:2]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_training_with_mask_supervision_records_the_term_and_the_recipe(tmp_path: Path) -> None:
    recipe = _phantom_recipe(tmp_path, mask_supervision={"weight": 0.5, "sharpness": 10})
    directory = train_from_config(recipe)
    card = load_card(directory)
    assert card.recipe["mask_supervision"] == {"weight": 0.5, "sharpness": 10.0}
    history = json.loads((directory / "metrics.json").read_text())["history"]
    assert history and all("train_mask_loss" in epoch for epoch in history)
    assert all(0 <= epoch["train_peak_in_mask"] <= 1 for epoch in history)


def test_mask_supervision_needs_masks(tmp_path: Path) -> None:
    recipe = _phantom_recipe(tmp_path, mask_supervision={})
    (tmp_path / "data" / "phantoms.csv").unlink()
    with pytest.raises(ConfigError, match="lesion masks"):
        train_from_config(recipe)
