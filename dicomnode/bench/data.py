"""Benchmark data: realistic DX instances (2048x2500 and 3000x3000, 12-16 bit), made on the fly.

Knee films show one knee joint composed of a real crop (:func:`knee_picture`), so that the
localiser finds it and the classifier runs, as on a patient's film.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.training.localiser import CropBank, compose, crop_files, load_bank
from dicomnode.values import FloatArray

SIZES: tuple[tuple[int, int, int], ...] = ((2500, 2048, 12), (3000, 3000, 16))
"""(rows, columns, bits stored) of the generated instances, used in turn."""

SMALL: tuple[tuple[int, int, int], ...] = ((512, 512, 12),)
"""Small instances for the memory soak (many images quickly)."""


@dataclass(frozen=True)
class Study:
    study_uid: str
    files: tuple[Path, ...]


KNEE_CROPS_VARIABLE = "DICOMNODE_BENCH_KNEE_CROPS"
DEFAULT_KNEE_CROPS = Path("../shared/data/knee-kl224-train")
BANK_CROPS = 40


def knee_crops() -> Path:
    """The folder of real knee-joint crops the benchmark's knee films are composed of
    (``$DICOMNODE_BENCH_KNEE_CROPS``, else the training data beside the project)."""
    return Path(os.environ.get(KNEE_CROPS_VARIABLE, str(DEFAULT_KNEE_CROPS)))


def knee_pictures_available() -> bool:
    return knee_crops().is_dir()


@lru_cache(maxsize=1)
def _bank() -> CropBank:
    return load_bank(crop_files(knee_crops(), holdout=True)[:BANK_CROPS])


def knee_picture(rows: int, columns: int, seed: int) -> FloatArray:
    """A one-knee film: a real joint crop on a synthetic leg and background (the knee
    localiser's training composites), brought to ``rows`` x ``columns``.

    The node grades only the joints its localiser finds; on a film without one it grades
    nothing, so a benchmark of knee films must show a knee to measure the classifier.
    """
    composite = compose(_bank(), np.random.default_rng(seed), joints=1)
    picture = Image.fromarray(composite.pixels).resize((columns, rows), Image.Resampling.BILINEAR)
    return np.asarray(picture, dtype=np.float32)


def _templates(body_part: str, sizes: tuple[tuple[int, int, int], ...]) -> list[pydicom.Dataset]:
    knees = body_part == "KNEE" and knee_pictures_available()
    return [
        make_radiograph(
            rows=r,
            columns=c,
            bits_stored=b,
            body_part=body_part,
            seed=i,
            picture=knee_picture(r, c, i) if knees else None,
        )
        for i, (r, c, b) in enumerate(sizes)
    ]


def make_studies(
    folder: Path,
    studies: int,
    per_study: int,
    *,
    body_part: str = "KNEE",
    sizes: tuple[tuple[int, int, int], ...] = SIZES,
) -> list[Study]:
    """Write ``studies`` x ``per_study`` instances with fresh UIDs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    templates = _templates(body_part, sizes)
    made: list[Study] = []
    count = 0
    for _ in range(studies):
        study_uid, series_uid = generate_uid(), generate_uid()
        files = []
        for index in range(per_study):
            ds = templates[count % len(templates)]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = index + 1
            files.append(write_dataset(ds, folder / f"{count:05d}.dcm"))
            count += 1
        made.append(Study(str(study_uid), tuple(files)))
    return made


def all_files(studies: list[Study]) -> Iterator[Path]:
    for study in studies:
        yield from study.files
