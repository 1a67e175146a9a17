"""The pointing game on phantoms: does the heatmap peak fall inside the lesion?

For every abnormal image of a phantom folder (``phantoms.csv`` with a ``mask``
column, written by ``dicomnode phantoms``), the image goes through the node's
own :class:`~dicomnode.inference.Predictor` and the peak of its
finding's class activation map is looked up in the lesion mask. The score is
the share of hits (strictly inside the mask: no tolerance). For the misses,
how far off they were: the distance from the peak to the nearest lesion pixel,
as a fraction of the image's longer side (median and 90th percentile), so a map
that points next to a lesion is told apart from one that points elsewhere; and
``within``: the share of peaks inside the mask or at most 1, 2 or 5 % of the
image side from it (:data:`TOLERANCES`; the pointing game of Zhang et al. 2016
allows 15 pixels). The score itself stays strict.
Every scored image also gets a row (``images``): its id, lesion kind, whether
it was a hit, the peak and the miss distance.

:func:`pointing_report` writes the game into an evaluation report:
``pointing_game.json`` (the figures), ``pointing_game.csv`` (one row per
image) and ``pointing_misses.png``, the misses farthest from their lesion
first, each a close-up of the heatmap with the lesion mask outlined in green
and the peak marked in red, so a reader can see *how* a map missed.

:func:`compare_explanations` scores several explanations (method and layers,
or another :class:`~dicomnode.inference.Explainer` such as SHAP) of one model on
the same images: that is how a card's ``gradcam`` is chosen, on a selection set
that is not the test set.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, distance_transform_edt

from dicomnode.encode.render import heat_image
from dicomnode.explain.gradcam import Explainer
from dicomnode.inference import Predictor
from dicomnode.models.card import GradCamSpec, check_new_version, load_card, write_revision
from dicomnode.training.data import Fingerprints, read_labelled
from dicomnode.training.fingerprint import against_training_images, training_images_of
from dicomnode.training.masks import mask_rows, read_mask
from dicomnode.training.report import gallery_image, lesion_tile
from dicomnode.values import PreparedImage

IMAGE_COLUMNS = ("id", "lesion", "hit", "peak_column", "peak_row", "miss_distance")
GALLERY_MISSES = 8
TOLERANCES = (0.01, 0.02, 0.05)
"""Peak-to-lesion distances (share of the image side) of the ``within`` figures."""


@dataclass(frozen=True, eq=False)
class MaskedImage:
    """An abnormal phantom, its lesion mask, the kind of its first lesion and its id."""

    image: PreparedImage
    mask: np.ndarray[Any, np.dtype[np.bool_]]
    kind: str
    id: str = ""


def _image_of(data_dir: Path, row: dict[str, str]) -> Path | None:
    for suffix in (".png", ".dcm"):
        candidate = data_dir / row["label"] / f"{row['id']}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_masked_images(data_dir: Path, limit: int | None = None) -> list[MaskedImage]:
    """The abnormal images of a phantom folder with their masks (the first ``limit``)."""
    found: list[MaskedImage] = []
    for row in mask_rows(data_dir):
        image_path = _image_of(data_dir, row)
        if image_path is None:
            continue
        mask = read_mask(data_dir / row["mask"])
        kind = row["lesion"].split(",")[0].split(" ")[0] or "lesion"
        found.append(MaskedImage(read_labelled(image_path, data_dir), mask, kind, row["id"]))
        if limit is not None and len(found) >= limit:
            break
    return found


def pointing_game(
    model_dir: Path,
    data_dir: Path,
    *,
    device: str = "cpu",
    gradcam: GradCamSpec | None = None,
    limit: int | None = None,
    unseen_only: bool = False,
) -> dict[str, Any]:
    """Share of abnormal images whose map peak lies inside their lesion mask.

    ``gradcam`` replaces the card's explanation (method and layers) for this
    run; ``limit`` scores only the first abnormal images; ``unseen_only`` leaves out
    the images the model trained on (its ``training-images.json``).
    """
    (result,) = compare_explanations(
        model_dir, data_dir, [gradcam], device=device, limit=limit, unseen_only=unseen_only
    )
    return result


def compare_explanations(
    model_dir: Path,
    data_dir: Path,
    candidates: Sequence[GradCamSpec | Explainer | None],
    *,
    device: str = "cpu",
    limit: int | None = None,
    unseen_only: bool = False,
) -> list[dict[str, Any]]:
    """The pointing game of each candidate explanation (``None``: the card's own)."""
    images = read_masked_images(data_dir, limit)
    predictor, images = _predictor(model_dir, data_dir, images, device, unseen_only)
    return [_game(_explained(predictor, candidate), images) for candidate in candidates]


def _predictor(
    model_dir: Path,
    data_dir: Path,
    images: list[MaskedImage],
    device: str,
    unseen_only: bool = False,
) -> tuple[Predictor, list[MaskedImage]]:
    """The model and the images to score, with a warning when it trained on some of them
    (by their pixels, or by the folder when its directory does not list them): a map
    trained to point at these very masks scores high on them. ``unseen_only`` leaves
    those out."""
    card = load_card(model_dir)
    seen = against_training_images(
        training_images_of(model_dir, needed=unseen_only),
        card,
        data_dir,
        lambda: Fingerprints.of([item.image.pixels for item in images]),
        unseen_only=unseen_only,
    )
    kept = [images[i] for i in seen.kept] if unseen_only else images
    return Predictor.load(model_dir, card, device), kept


def _explained(predictor: Predictor, candidate: GradCamSpec | Explainer | None) -> Predictor:
    if candidate is None:
        return predictor
    if isinstance(candidate, Explainer):
        return predictor.with_explainer(candidate)
    return predictor.with_explanation(candidate)


def pointing_report(
    model_dir: Path,
    data_dir: Path,
    directory: Path,
    *,
    device: str = "cpu",
    unseen_only: bool = False,
) -> dict[str, Any]:
    """Play the card's pointing game and write it into the report ``directory``.

    Writes ``pointing_game.json`` (the figures without the per-image rows),
    ``pointing_game.csv`` (:data:`IMAGE_COLUMNS`, one row per image) and
    ``pointing_misses.png`` (see the module notes); returns the game.
    """
    images = read_masked_images(data_dir)
    predictor, images = _predictor(model_dir, data_dir, images, device, unseen_only)
    game = _game(predictor, images)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {k: v for k, v in game.items() if k != "images"}
    (directory / "pointing_game.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    with (directory / "pointing_game.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=IMAGE_COLUMNS)
        writer.writeheader()
        writer.writerows(game["images"])
    misses_gallery(predictor, images, game).save(directory / "pointing_misses.png")
    return game


def misses_gallery(
    predictor: Predictor, images: Sequence[MaskedImage], game: dict[str, Any]
) -> Image.Image:
    """Close-ups of the :data:`GALLERY_MISSES` misses farthest from their lesion."""
    pairs = zip(game["images"], images, strict=True)
    misses = sorted(
        ((row, item) for row, item in pairs if not row["hit"]),
        key=lambda pair: -float(pair[0]["miss_distance"]),
    )
    tiles = []
    for row, item in misses[:GALLERY_MISSES]:
        (finding,) = predictor.predict([item.image])[0].findings
        peak = (int(row["peak_column"]), int(row["peak_row"]))
        box = close_up(item.mask, peak)
        rgb = heat_image(item.image.pixels[box], finding.heatmap[box])
        origin = (peak[0] - box[1].start, peak[1] - box[0].start)
        tile = lesion_tile(rgb, _outline(item.mask[box]), origin)
        tiles.append((tile, f"{row['id']} {row['lesion']}: {float(row['miss_distance']):.3f}"))
    title = (
        f"Pointing-game misses of {game['explanation']}, farthest first "
        f"(green: lesion mask, red: heatmap peak; distance / image side)"
    )
    return gallery_image(tiles, title)


def close_up(
    mask: np.ndarray[Any, np.dtype[np.bool_]], peak: tuple[int, int], margin: float = 0.25
) -> tuple[slice, slice]:
    """(rows, columns) of a square around the mask and the (column, row) peak, with a margin.

    The margin is a share of the square's side, at least 8 pixels; the
    square is clipped to the image. An empty mask gives a square around the peak.
    """
    mask_rows, mask_columns = np.nonzero(mask)
    rows, columns = np.append(mask_rows, peak[1]), np.append(mask_columns, peak[0])
    top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
    side = int(max(bottom - top, right - left)) + 1
    half = side / 2 + max(8.0, margin * side)
    centre_row, centre_column = (top + bottom) / 2, (left + right) / 2
    height, width = mask.shape
    return (
        slice(max(0, int(centre_row - half)), min(height, int(centre_row + half) + 1)),
        slice(max(0, int(centre_column - half)), min(width, int(centre_column + half) + 1)),
    )


def _outline(
    mask: np.ndarray[Any, np.dtype[np.bool_]],
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    inner: np.ndarray[Any, np.dtype[np.bool_]] = np.asarray(binary_erosion(mask), dtype=bool)
    return mask & ~inner


def _game(predictor: Predictor, images: Sequence[MaskedImage]) -> dict[str, Any]:
    return {"explanation": predictor.identity.explanation, **score_peaks(predictor, images)}


def score_peaks(predictor: Predictor, images: Sequence[MaskedImage]) -> dict[str, Any]:
    """Hits, share, miss distances, the share per lesion kind and one row per image."""
    hits = 0
    by_lesion: dict[str, tuple[int, int]] = {}
    rows: list[dict[str, Any]] = []
    for start in range(0, len(images), predictor.batch_size):
        part = images[start : start + predictor.batch_size]
        results = predictor.predict([item.image for item in part])
        for item, result in zip(part, results, strict=True):
            (finding,) = result.findings
            column, row = (
                min(int(v), limit - 1)
                for v, limit in zip(finding.peak, item.mask.shape[::-1], strict=True)
            )
            hit = bool(item.mask[row, column])
            distance = 0.0 if hit else miss_distance(item.mask, row, column)
            hits += hit
            total, found = by_lesion.get(item.kind, (0, 0))
            by_lesion[item.kind] = (total + 1, found + hit)
            values = (item.id, item.kind, hit, column, row, distance)
            rows.append(dict(zip(IMAGE_COLUMNS, values, strict=True)))
    scored = len(images)
    misses = [r["miss_distance"] for r in rows if not r["hit"]]
    return {
        "abnormal_images": scored,
        "hits": hits,
        "pointing_game": hits / scored if scored else float("nan"),
        "miss_distance_median": float(np.median(misses)) if misses else 0.0,
        "miss_distance_p90": float(np.percentile(misses, 90)) if misses else 0.0,
        "within": {
            f"{tolerance:g}": (hits + sum(d <= tolerance for d in misses)) / scored
            if scored
            else float("nan")
            for tolerance in TOLERANCES
        },
        "by_lesion": {
            k: {"images": t, "hits": h, "share": h / t} for k, (t, h) in sorted(by_lesion.items())
        },
        "images": rows,
    }


def set_explanation(model_dir: Path, gradcam: GradCamSpec, version: str, note: str = "") -> Path:
    """Give a model directory another explanation (same weights) under a new version.

    The layers are checked against the network; the card's ``gradcam`` and
    version change, and so do its recipe's ``gradcam_layer``, ``gradcam_method``,
    ``gradcam_shift`` and model version (as if the recipe had asked for them), with ``note``
    appended to the recipe's notes. Returns the card's path.

    Raises
    ------
    ModelError
        If a layer does not exist, or the version is the card's own (outputs
        change with the explanation, so the version must too).
    """
    card = load_card(model_dir)
    check_new_version(card, version)  # before loading the network
    Predictor.load(model_dir, card, "cpu").with_explanation(gradcam)
    recipe = dict(card.recipe)
    if recipe:
        recipe["gradcam_layer"] = gradcam.target_layer
        recipe["gradcam_method"] = gradcam.method
        recipe["gradcam_shift"] = gradcam.shift
    return write_revision(model_dir, card, version, note, gradcam=gradcam, recipe=recipe)


def miss_distance(mask: np.ndarray[Any, np.dtype[np.bool_]], row: int, column: int) -> float:
    """Distance from (row, column) to the nearest mask pixel / the mask's longer side."""
    if not mask.any():
        return float("nan")
    distances: np.ndarray[Any, np.dtype[np.float64]] = np.asarray(distance_transform_edt(~mask))
    nearest = float(distances[row, column])
    return nearest / int(max(mask.shape))
