"""Tiny synthetic labelled folders for tests and the smoke recipe.

Each class gets a distinguishable pattern (a bright disc whose radius grows
with the class index, on noise), so a few training steps can learn something.
File names follow the knee set's rule, ``<patient id><L|R>.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_tiny_dataset(
    directory: Path, *, classes: int = 3, patients: int = 8, size: int = 32, seed: int = 0
) -> Path:
    """Write ``patients`` x 2 knees per class as 8-bit PNGs under ``directory/<class>/``."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    distance = np.hypot(rows - size / 2, cols - size / 2)
    for label in range(classes):
        folder = directory / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        radius = size * (0.15 + 0.3 * label / max(classes - 1, 1))
        for patient in range(patients):
            for side in "LR":
                noise = rng.normal(0.3, 0.08, (size, size))
                image = np.where(distance < radius, 0.8, noise)
                pixels = np.clip(image * 255.0, 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(
                    folder / f"{9000000 + label * 1000 + patient}{side}.png"
                )
    return directory
