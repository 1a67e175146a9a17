"""The Grad-CAM pointing game on phantoms: does the heatmap peak fall inside the lesion?

For every abnormal image of a phantom folder (``phantoms.csv`` with a ``mask``
column, written by ``dicomnode phantoms``), the image goes through the node's
own :class:`~dicomnode.models.inference.Predictor` and the Grad-CAM peak of
its finding is looked up in the lesion mask. The score is the share of hits.
For the misses, how far off they were: the distance from the peak to the
nearest lesion pixel, as a fraction of the image's longer side (median and
90th percentile), so a map that points next to a lesion is told apart from one
that points elsewhere.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

from dicomnode.imaging.pixels import read_image_file
from dicomnode.models.card import load_card
from dicomnode.models.inference import Predictor

MASKS_FILE = "phantoms.csv"


def has_masks(data_dir: Path) -> bool:
    """True for a folder written by ``dicomnode phantoms``."""
    return (data_dir / MASKS_FILE).is_file()


def _image_of(data_dir: Path, row: dict[str, str]) -> Path | None:
    for suffix in (".png", ".dcm"):
        candidate = data_dir / row["label"] / f"{row['id']}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def pointing_game(model_dir: Path, data_dir: Path, *, device: str = "cpu") -> dict[str, Any]:
    """Share of abnormal images whose Grad-CAM peak lies inside their lesion mask."""
    predictor = Predictor.load(model_dir, load_card(model_dir), device)
    with (data_dir / MASKS_FILE).open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["mask"]]
    hits, scored = 0, 0
    misses: list[float] = []
    by_lesion: dict[str, tuple[int, int]] = {}
    for row in rows:
        image_path = _image_of(data_dir, row)
        if image_path is None:
            continue
        mask = np.asarray(Image.open(data_dir / row["mask"])) > 0
        (finding,) = predictor.predict([read_image_file(image_path)])[0].findings
        column, row_index = (
            min(int(v), limit - 1) for v, limit in zip(finding.peak, mask.shape[::-1], strict=True)
        )
        hit = bool(mask[row_index, column])
        if not hit:
            misses.append(miss_distance(mask, row_index, column))
        hits += hit
        scored += 1
        kind = row["lesion"].split(",")[0].split(" ")[0] or "lesion"
        total, found = by_lesion.get(kind, (0, 0))
        by_lesion[kind] = (total + 1, found + hit)
    return {
        "abnormal_images": scored,
        "hits": hits,
        "pointing_game": hits / scored if scored else float("nan"),
        "miss_distance_median": float(np.median(misses)) if misses else 0.0,
        "miss_distance_p90": float(np.percentile(misses, 90)) if misses else 0.0,
        "by_lesion": {
            k: {"images": t, "hits": h, "share": h / t} for k, (t, h) in sorted(by_lesion.items())
        },
    }


def miss_distance(mask: np.ndarray[Any, np.dtype[np.bool_]], row: int, column: int) -> float:
    """Distance from (row, column) to the nearest mask pixel / the mask's longer side."""
    if not mask.any():
        return float("nan")
    distances: np.ndarray[Any, np.dtype[np.float64]] = np.asarray(distance_transform_edt(~mask))
    nearest = float(distances[row, column])
    return nearest / int(max(mask.shape))
