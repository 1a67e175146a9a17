"""Lesion masks beside a labelled folder: which pixels hold the finding.

A folder written by ``dicomnode phantoms`` has a :data:`MASKS_FILE` with one
row per image: ``id`` (the image's file stem) and ``mask`` (a PNG path relative
to the folder, non-zero on the lesion; empty for a normal image). A hospital
folder whose lesions were outlined can carry the same two columns. The masks
score the pointing game (:mod:`dicomnode.training.pointing`) and, when a
recipe asks for it, supervise the explanation in training
(:mod:`dicomnode.training.attention`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dicomnode.errors import ConfigError

MASKS_FILE = "phantoms.csv"

BoolArray = np.ndarray[Any, np.dtype[np.bool_]]


def has_masks(data_dir: Path) -> bool:
    """True for a folder with a :data:`MASKS_FILE` (written by ``dicomnode phantoms``)."""
    return (data_dir / MASKS_FILE).is_file()


def mask_rows(data_dir: Path) -> list[dict[str, str]]:
    """The rows of the folder's :data:`MASKS_FILE` that name a mask, in file order."""
    with (data_dir / MASKS_FILE).open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row.get("mask")]


def read_mask(path: Path) -> BoolArray:
    """A mask PNG as a boolean array: True where the lesion is."""
    with Image.open(path) as image:
        return np.asarray(image) > 0


def fit_mask(mask: BoolArray, shape: tuple[int, int]) -> BoolArray:
    """``mask`` at ``shape`` (rows, columns), stretched as the pixel cache stretches images."""
    if mask.shape == shape:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.asarray(resized) >= 64


@dataclass(frozen=True, eq=False)
class LesionMasks:
    """The mask file of each image of a labelled folder that has one, by image index."""

    paths: dict[int, Path]

    @classmethod
    def of_folder(cls, data_dir: Path, stems: tuple[str, ...]) -> LesionMasks:
        """Match the folder's mask rows to the images (``stems`` in image order).

        Raises
        ------
        ConfigError
            The folder has no :data:`MASKS_FILE`, a named mask file is missing,
            or no image has a mask.
        """
        if not has_masks(data_dir):
            raise ConfigError(f"{data_dir} has no {MASKS_FILE} with lesion masks")
        index_of = {stem: i for i, stem in enumerate(stems)}
        paths: dict[int, Path] = {}
        for row in mask_rows(data_dir):
            path = data_dir / row["mask"]
            if not path.is_file():
                raise ConfigError(f"lesion mask {path} named in {MASKS_FILE} does not exist")
            if row["id"] in index_of:
                paths[index_of[row["id"]]] = path
        if not paths:
            raise ConfigError(f"no image of {data_dir} has a lesion mask in {MASKS_FILE}")
        return cls(paths)

    def mask(self, index: int, shape: tuple[int, int]) -> BoolArray:
        """Image ``index``'s mask at ``shape``; all False when it has none."""
        path = self.paths.get(index)
        if path is None:
            return np.zeros(shape, dtype=bool)
        return fit_mask(read_mask(path), shape)
