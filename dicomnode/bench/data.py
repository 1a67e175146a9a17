"""Benchmark data: realistic DX instances (2048x2500 and 3000x3000, 12-16 bit), made on the fly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicomnode.testing.images import make_radiograph, write_dataset

SIZES: tuple[tuple[int, int, int], ...] = ((2500, 2048, 12), (3000, 3000, 16))
"""(rows, columns, bits stored) of the generated instances, used in turn."""

SMALL: tuple[tuple[int, int, int], ...] = ((512, 512, 12),)
"""Small instances for the memory soak (many images quickly)."""


@dataclass(frozen=True)
class Study:
    study_uid: str
    files: tuple[Path, ...]


def _templates(body_part: str, sizes: tuple[tuple[int, int, int], ...]) -> list[pydicom.Dataset]:
    return [
        make_radiograph(rows=r, columns=c, bits_stored=b, body_part=body_part, seed=i)
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
