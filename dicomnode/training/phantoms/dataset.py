"""Labelled phantom folders in the layout ``dicomnode train`` and ``evaluate`` read.

Layout of ``out_dir``::

    0/P000001_0.png          normal images (and/or .dcm)
    1/P000000_0.png          abnormal images
    masks/P000000_0.png      lesion mask of each abnormal image (8-bit, 255 inside)
    phantoms.csv             id,label,body_part,view,laterality,lesion,mask

File names are ``<synthetic patient id>_<image index>``; each synthetic
patient has two images (both hands, or the AP and lateral spine) with the
same label, so folds must be grouped by patient: use :data:`GROUP_PATTERN`
as the recipe's ``group_pattern``. Labels are balanced by patient (half of
the patients abnormal, in a seeded random order).

PNGs are 8-bit or 16-bit grey at random; DICOM files are DX (For
Presentation) built with :func:`dicomnode.testing.images.make_radiograph`
from the phantom's pixels: MONOCHROME1 or MONOCHROME2, Bits Stored 10 to 16,
the picture stored in a random sub-range of the stored values with the
window that maps it back, Body Part Examined HAND or LSPINE, View Position
PA, AP or LL, Image Laterality for hands, Manufacturer "dicomnode phantom"
and a Series Description saying the image is a synthetic phantom. With both
formats each case is written twice (same name and patient, so no fold
leakage, but the training set counts it twice).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.sr import CodedConcept
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.errors import ConfigError
from dicomnode.testing.images import full_window, make_radiograph, write_dataset
from dicomnode.training.phantoms.common import BODY_PARTS, Phantom, rng_for
from dicomnode.training.phantoms.hand import generate_hand
from dicomnode.training.phantoms.spine import generate_spine

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "GROUP_PATTERN",
    "PhantomCase",
    "generate_case",
    "plan_cases",
    "to_dicom",
    "write_phantom_folder",
]

logger = logging.getLogger(__name__)

GROUP_PATTERN = r"^(?P<group>P\d{6})_\d+$"
"""The training recipe's ``group_pattern`` for phantom folders (group = synthetic patient)."""

CSV_COLUMNS = ("id", "label", "body_part", "view", "laterality", "lesion", "mask")
"""Columns of ``phantoms.csv``, in order."""

FORMATS = ("png", "dcm")
"""File formats :func:`write_phantom_folder` writes."""

_PLAN_STREAM, _ENCODING_STREAM = 901, 902
_VIEW_CODES = {
    "PA": ("PA", "272479007", "postero-anterior"),
    "AP": ("AP", "399348003", "antero-posterior"),
    "LAT": ("LL", "399173006", "left lateral"),
}
_BODY_PART_EXAMINED = {"HAND": "HAND", "SPINE": "LSPINE"}


@dataclass(frozen=True)
class PhantomCase:
    """One planned image of a phantom folder.

    Attributes
    ----------
    id:
        File stem, ``P<6-digit patient>_<index>``.
    patient:
        Synthetic patient number; ``seed`` is that patient's generator seed.
    index:
        Image index within the patient (0 or 1).
    label:
        0 normal, 1 abnormal (the same for both images of a patient).
    body_part, view, laterality:
        As in :class:`~dicomnode.training.phantoms.common.Phantom`.
    """

    id: str
    patient: int
    seed: int
    index: int
    label: int
    body_part: str
    view: str
    laterality: str | None


def _check(body_part: str, count: int, size: int, formats: tuple[str, ...]) -> None:
    if body_part not in BODY_PARTS:
        raise ConfigError(f"body part must be one of {', '.join(BODY_PARTS)}, not {body_part!r}")
    if count < 1:
        raise ConfigError(f"count must be at least 1, not {count}")
    if not 64 <= size <= 4096:
        raise ConfigError(f"size must be 64 to 4096 pixels, not {size}")
    if not formats or not set(formats) <= set(FORMATS):
        raise ConfigError(f"formats must be some of {', '.join(FORMATS)}, not {formats!r}")


def plan_cases(body_part: str, count: int, seed: int) -> tuple[PhantomCase, ...]:
    """The ``count`` images of a folder: two per patient, labels balanced by patient."""
    patients = (count + 1) // 2
    rng = rng_for(seed, _PLAN_STREAM)
    labels = rng.permutation(np.arange(patients) % 2)
    views = ("R", "L") if body_part == "HAND" else ("AP", "LAT")
    cases: list[PhantomCase] = []
    for patient in range(patients):
        patient_seed = int(np.random.SeedSequence([seed, patient]).generate_state(1)[0])
        order = rng.permutation(2)
        for index in range(min(2, count - 2 * patient)):
            choice = views[int(order[index])]
            cases.append(
                PhantomCase(
                    id=f"P{patient:06d}_{index}",
                    patient=patient,
                    seed=patient_seed,
                    index=index,
                    label=int(labels[patient]),
                    body_part=body_part,
                    view="PA" if body_part == "HAND" else choice,
                    laterality=choice if body_part == "HAND" else None,
                )
            )
    return tuple(cases)


def generate_case(case: PhantomCase, size: int) -> Phantom:
    """Render the phantom a :class:`PhantomCase` plans."""
    abnormal = bool(case.label)
    if case.body_part == "HAND":
        side = case.laterality or "R"
        return generate_hand(case.seed, laterality=side, size=size, abnormal=abnormal)
    return generate_spine(case.seed, view=case.view, size=size, abnormal=abnormal)


# --------------------------------------------------------------------------- encoders


def _write_png(pixels: np.ndarray, path: Path, sixteen_bits: bool) -> None:
    if sixteen_bits:
        image = Image.fromarray(np.rint(pixels * 65535.0).astype(np.uint16))
    else:
        image = Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["dicomnode phantom", *(str(p) for p in parts)]))


def to_dicom(
    phantom: Phantom, case: PhantomCase, folder_seed: int, photometric: str | None = None
) -> Dataset:
    """A DX (For Presentation) dataset of ``phantom`` with varied, plausible encoding.

    Bits Stored (10-16), photometric interpretation (MONOCHROME1 a third of
    the time, unless ``photometric`` is given) and the stored sub-range (with
    the window that maps it back to the phantom's display) are drawn from the
    case; UIDs are derived from the folder seed and the case, so the same
    folder is written identically.
    """
    rng = rng_for(case.seed, _ENCODING_STREAM, case.index)
    bits = int(rng.integers(10, 17))
    drawn = "MONOCHROME1" if rng.random() < 0.35 else "MONOCHROME2"
    photometric = photometric or drawn
    span = float(rng.uniform(0.6, 1.0))
    low = float(rng.uniform(0.0, 1.0 - span))
    top = (1 << bits) - 1
    first, last = round(low * top), round((low + span) * top)
    if photometric == "MONOCHROME1":
        first, last = top - last, top - first
    patient_id = case.id.split("_")[0]
    study = _uid(folder_seed, case.body_part, patient_id)
    ds = make_radiograph(
        picture=np.clip(low + span * phantom.pixels, 0.0, 1.0).astype(np.float32),
        bits_stored=bits,
        photometric=photometric,
        body_part=_BODY_PART_EXAMINED[case.body_part],
        laterality=phantom.laterality,
        window=full_window(first, last),
        study_uid=study,
        series_uid=_uid(study, "series"),
        sop_uid=_uid(study, case.index),
        patient_name=f"PHANTOM^{patient_id}",
        patient_id=patient_id,
        study_description="SYNTHETIC PHANTOM",
        series_description=f"SYNTHETIC PHANTOM {case.body_part} {case.view} - not patient data",
    )
    _describe(ds, phantom, case)
    return ds


def _describe(ds: Dataset, phantom: Phantom, case: PhantomCase) -> None:
    """Headers :func:`make_radiograph` does not set for a phantom."""
    position, code, meaning = _VIEW_CODES[phantom.view]
    ds.ViewPosition = position
    ds.ViewCodeSequence = Sequence([CodedConcept(code, "SCT", meaning)])
    ds.Manufacturer = "dicomnode phantom"
    ds.ManufacturerModelName = "dicomnode phantom generator"
    ds.SoftwareVersions = __version__
    ds.PatientOrientation = list(phantom.orientation)
    ds.InstanceNumber = case.index + 1
    spacing = round(phantom.spacing_mm, 4)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.ImageComments = f"synthetic phantom, label {phantom.label}: {phantom.lesion or 'normal'}"


# --------------------------------------------------------------------------- folder


def _write_case(
    out_dir: Path, case: PhantomCase, phantom: Phantom, formats: tuple[str, ...], seed: int
) -> str:
    """Write the case's image(s) and mask; return the mask's relative path ('' if none)."""
    folder = out_dir / str(case.label)
    if "png" in formats:
        sixteen = bool(rng_for(case.seed, _ENCODING_STREAM, case.index, 1).random() < 0.5)
        _write_png(phantom.pixels, folder / f"{case.id}.png", sixteen)
    if "dcm" in formats:
        write_dataset(to_dicom(phantom, case, seed), folder / f"{case.id}.dcm")
    if not phantom.label:
        return ""
    mask = f"masks/{case.id}.png"
    _write_png(phantom.lesion_mask.astype(np.float32), out_dir / mask, sixteen_bits=False)
    return mask


def write_phantom_folder(
    out_dir: Path,
    *,
    body_part: str,
    count: int,
    seed: int,
    size: int = 512,
    formats: tuple[str, ...] = ("png",),
) -> Path:
    """Generate ``count`` phantoms of ``body_part`` and write a labelled training folder.

    Parameters
    ----------
    out_dir:
        Destination; created if missing. Existing files of the same names are replaced.
    body_part:
        ``"HAND"`` (PA hands, rheumatoid changes) or ``"SPINE"`` (AP and lateral
        lumbar spines, fractures, scoliosis, listhesis).
    count:
        Number of images (two per synthetic patient; an odd count gives the
        last patient one image).
    seed:
        Seed of the whole folder: the same seed writes the same files.
    size:
        Rows = columns of each image (64 to 4096).
    formats:
        ``("png",)``, ``("dcm",)`` or both.

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``0/``, ``1/``, ``masks/`` and ``phantoms.csv``
        (see the module notes; group folds with :data:`GROUP_PATTERN`).

    Raises
    ------
    ConfigError
        If an argument is out of range.
    """
    formats = tuple(dict.fromkeys(formats))
    _check(body_part, count, size, formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for number, case in enumerate(plan_cases(body_part, count, seed), start=1):
        phantom = generate_case(case, size)
        mask = _write_case(out_dir, case, phantom, formats, seed)
        rows.append(_csv_row(case, phantom, mask))
        if number % 50 == 0:
            logger.info("phantoms written", extra={"done": number, "count": count})
    _write_csv(out_dir / "phantoms.csv", rows)
    logger.info("phantom folder complete", extra={"count": count, "folder": str(out_dir)})
    return out_dir


def _csv_row(case: PhantomCase, phantom: Phantom, mask: str) -> dict[str, str]:
    return {
        "id": case.id,
        "label": str(phantom.label),
        "body_part": phantom.body_part,
        "view": phantom.view,
        "laterality": phantom.laterality or "",
        "lesion": phantom.lesion,
        "mask": mask,
    }


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
