"""The flow of an image through the node, written down once.

::

    instance file --read--> dataset --prepare--> PreparedImage
        --Predictor.predict--> ImageResult (probabilities + Grad-CAM)
        --render_overlay + encode_sc--> Secondary Capture (per image)
        --encode_pr--> Grayscale Softcopy Presentation State (per image, optional)
    all results of a study round --encode_sr--> TID 1500 SR (per study)

The worker (:mod:`dicomnode.worker`) wraps these steps in queue jobs with
the database; ``dicomnode predict`` runs them on files with no network and no
database. Both produce identical objects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom

from dicomnode import __version__, uids
from dicomnode.encode.header import fit_character_set
from dicomnode.encode.ko import encode_ko
from dicomnode.encode.pr import encode_pr, presentation_state_applies
from dicomnode.encode.render import UInt8Array, render_overlay
from dicomnode.encode.sc import encode_sc, overlay_side
from dicomnode.encode.sr import SrImageItem, encode_sr
from dicomnode.errors import ImagingError, UnsupportedImageError
from dicomnode.imaging.pixels import prepare_dataset, read_dicom
from dicomnode.inference import Predictor
from dicomnode.values import (
    CodedClass,
    Finding,
    ImageResult,
    ModelIdentity,
    Placement,
    PreparedImage,
    Region,
)

log = logging.getLogger(__name__)

MANUFACTURER = "dicomnode"
SC_SERIES_NUMBERS = {"": 9901, "R": 9903, "L": 9904}
"""The overlay series of a study, one per side (:func:`overlay_side`; "" for none), each
with a number of its own, so a PACS lists them apart: 9901, then the SR's 9902, 9903, 9904."""
SR_SERIES_NUMBER = 9902
PR_SERIES_NUMBERS = {"": 9905, "R": 9906, "L": 9907}
"""The presentation state series of a study, one per side as the overlays'."""
KO_SERIES_NUMBER = 9908
"""The series of the node's rejection notes (the results it withdrew)."""


@dataclass(frozen=True, eq=False)
class Prepared:
    """One source image read and prepared, or the reason it cannot be used."""

    sop_uid: str
    header: pydicom.Dataset
    image: PreparedImage | None
    skip_reason: str = ""
    error: str = ""
    lasting: bool = False
    """The error comes from the file's own bytes (its pixel data cannot be decoded): the
    same file fails the same way, so it is not retried."""


@dataclass(frozen=True, eq=False)
class Analysed:
    """One source image with its model result (``result`` is None when skipped or failed)."""

    prepared: Prepared
    result: ImageResult | None


def header_of(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``dataset`` without its pixel data (what the encoders need)."""
    header = pydicom.Dataset()
    for element in dataset:
        if element.tag.group != 0x7FE0:
            header.add(element)
    header.file_meta = getattr(dataset, "file_meta", pydicom.dataset.FileMetaDataset())
    return header


def read_and_prepare(path: Path) -> Prepared:
    """Read an instance file and prepare its pixels; never raises for bad images."""
    try:
        dataset = read_dicom(path)  # a file of another program may lack the preamble
    except ImagingError as exc:
        return Prepared("", pydicom.Dataset(), None, error=f"cannot read {path.name}: {exc}")
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    try:
        image = prepare_dataset(dataset, source=sop_uid)
    except UnsupportedImageError as exc:
        return Prepared(sop_uid, header_of(dataset), None, skip_reason=str(exc))
    except ImagingError as exc:
        transient = isinstance(
            exc.__cause__, (MemoryError, OSError)
        )  # the worker's, not the file's
        return Prepared(sop_uid, header_of(dataset), None, error=str(exc), lasting=not transient)
    return Prepared(sop_uid, header_of(dataset), image)


def analyse(predictor: Predictor, prepared: Sequence[Prepared]) -> list[Analysed]:
    """Run the model on every usable image in one batched call."""
    usable = [p for p in prepared if p.image is not None]
    results = iter(predictor.predict([p.image for p in usable if p.image is not None]))
    return [Analysed(p, next(results) if p.image is not None else None) for p in prepared]


def overlay_pixels(analysed: Analysed, max_size: int = 0) -> UInt8Array:
    """The RGB overlay of one analysed image, longest side at most ``max_size`` (0: as is)."""
    prepared, result = analysed.prepared, analysed.result
    assert prepared.image is not None and result is not None
    return render_overlay(prepared.image, result, max_size)


def make_sc(
    analysed: Analysed,
    *,
    uid_root: str,
    max_size: int = 0,
    pixels: UInt8Array | None = None,
    jpeg_quality: int = 0,
    institution_name: str = "",
) -> pydicom.Dataset:
    """The Secondary Capture overlay of one analysed image (longest side at most ``max_size``).

    ``pixels``: the overlay when already rendered by :func:`overlay_pixels`;
    ``jpeg_quality``: JPEG Baseline quality of its pixel data (0: uncompressed).
    Its Instance Number is the source image's, so the overlays sort like the originals. The
    overlays of a study go into one series per side (the source's laterality; none for a
    film on which a right and a left knee were found), so that the series-level Laterality
    holds for every overlay in it.
    """
    result = analysed.result
    assert result is not None
    sc = encode_sc(
        analysed.prepared.header,
        overlay_pixels(analysed, max_size) if pixels is None else pixels,
        result,
        _placement(analysed, "sc", uid_root),
        jpeg_quality=jpeg_quality,
    )
    return fit_character_set(_with_institution(sc, institution_name))


def make_pr(analysed: Analysed, *, uid_root: str, institution_name: str = "") -> pydicom.Dataset:
    """The presentation state that draws the result of one analysed image over the original
    (``results.presentation_state``); its Instance Number is the source image's."""
    prepared, result = analysed.prepared, analysed.result
    assert prepared.image is not None and result is not None
    pr = encode_pr(
        prepared.header,
        result,
        (prepared.image.rows, prepared.image.columns),
        _placement(analysed, "pr", uid_root),
        own_window=prepared.image.own_window,
    )
    return fit_character_set(_with_institution(pr, institution_name))


def _placement(analysed: Analysed, kind: Literal["sc", "pr"], uid_root: str) -> Placement:
    """Where the overlay (``sc``) or presentation state (``pr``) of one analysed image goes:
    the series of its study, model version and side, the Instance Number of its source (so
    that they sort like the originals), UIDs derived from these."""
    prepared, result = analysed.prepared, analysed.result
    assert result is not None
    header, model = prepared.header, result.model
    side = overlay_side(header, result) or ""
    series_uid, sop_uid, numbers = (
        (uids.sc_series_uid, uids.sc_instance_uid, SC_SERIES_NUMBERS)
        if kind == "sc"
        else (uids.pr_series_uid, uids.pr_instance_uid, PR_SERIES_NUMBERS)
    )
    study_uid = str(header.StudyInstanceUID)
    return Placement(
        series_uid=series_uid(uid_root, study_uid, model.name, model.version, side),
        sop_uid=sop_uid(uid_root, prepared.sop_uid, model.name, model.version),
        series_number=numbers[side],
        instance_number=_instance_number(header),
        software_version=__version__,
        manufacturer=MANUFACTURER,
    )


def wants_pr(analysed: Analysed) -> bool:
    """A presentation state can be drawn over the image: it was analysed and is grey-scale
    (a colour image, rare among radiographs, gets the overlay alone)."""
    return analysed.result is not None and presentation_state_applies(analysed.prepared.header)


def _with_institution(dataset: pydicom.Dataset, name: str) -> pydicom.Dataset:
    """Name the node's institution in the General Equipment module (``node.institution_name``)."""
    if name:
        dataset.InstitutionName = name
    return dataset


def _instance_number(header: pydicom.Dataset) -> int:
    try:
        return max(1, int(header.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def make_sr(
    items: Sequence[SrImageItem],
    *,
    uid_root: str,
    sequence: int,
    predecessor: pydicom.Dataset | None = None,
    not_analysed: int = 0,
    institution_name: str = "",
) -> pydicom.Dataset:
    """The TID 1500 SR of one study round (``sequence`` 1, 2, ... for follow-ups).

    ``not_analysed``: images of the study whose analysis failed for good (flagged PARTIAL).
    """
    first = items[0]
    study_uid = str(first.source.StudyInstanceUID)
    model = first.result.model
    placement = Placement(
        series_uid=uids.sr_series_uid(uid_root, study_uid, model.name, model.version),
        sop_uid=uids.sr_instance_uid(uid_root, study_uid, model.name, model.version, sequence),
        series_number=SR_SERIES_NUMBER,
        instance_number=sequence,
        software_version=__version__,
        manufacturer=MANUFACTURER,
    )
    sr = encode_sr(
        items,
        placement,
        predecessor=predecessor,
        uid_root=uid_root,
        not_analysed=not_analysed,
    )
    return fit_character_set(_with_institution(sr, institution_name))


def make_ko(
    objects: Sequence[pydicom.Dataset],
    code: str,
    model: ModelIdentity,
    *,
    uid_root: str,
    sequence: int,
    why: str,
    institution_name: str = "",
) -> pydicom.Dataset:
    """The node's rejection note of round ``sequence`` of a study's report: it withdraws
    ``objects`` (its result objects of that study and model) under the title of DCM
    ``code``; ``why`` ends its Key Object Description (the rejection notes that withdrew
    their images, or an administrator's withdrawal)."""
    study_uid = str(objects[0].StudyInstanceUID)
    placement = Placement(
        series_uid=uids.ko_series_uid(uid_root, study_uid, model.name, model.version),
        sop_uid=uids.ko_instance_uid(
            uid_root, study_uid, model.name, model.version, sequence, code
        ),
        series_number=KO_SERIES_NUMBER,
        instance_number=sequence,
        software_version=__version__,
        manufacturer=MANUFACTURER,
    )
    description = f"AI results of {model.name} {model.version} withdrawn by {MANUFACTURER}: {why}"
    ko = encode_ko(objects, code, placement, model, uid_root=uid_root, description=description)
    return fit_character_set(_with_institution(ko, institution_name))


def findings_to_json(result: ImageResult) -> list[dict[str, Any]]:
    """What the database keeps of a result (no heatmap: the SC holds the picture)."""
    return [
        {
            "predicted": f.predicted.index,
            "probabilities": [float(p) for p in f.probabilities],
            "peak": [float(f.peak[0]), float(f.peak[1])],
            "region": [f.region.x0, f.region.y0, f.region.x1, f.region.y1],
            "laterality": f.laterality,
            "localisation_uncertain": f.localisation_uncertain,
            "localised": f.localised,
            "uncertainty": list(f.uncertainty),
        }
        for f in result.findings
    ]


ANALYSIS_FAILED = "Not analysed: the analysis of this image failed"
"""The SR's comment on an image whose analysis failed for good (the report is PARTIAL). The
error is technical text, possibly quoting header values: it stays in the node's records
(`dicomnode status`) or `dicomnode predict`'s table, never in the report."""


def not_analysed_reason(reason: str) -> str:
    """The SR's comment on an image routed to a model that cannot read it (a multi-frame
    image, say): the image is reported "Not assessed" with this reason."""
    return f"Not analysed: {reason}"


def result_from_json(
    model: ModelIdentity,
    classes: tuple[CodedClass, ...],
    data: list[dict[str, Any]],
    not_assessed: str = "",
) -> ImageResult:
    """Rebuild an :class:`ImageResult` for the SR; heatmaps are empty (0 x 0).

    A finding stored before ``localised`` was recorded reads as localised, as its SR
    said then; ``not_assessed`` is kept beside the findings (``Result.reason``).
    """
    empty = np.zeros((0, 0), dtype=np.float32)
    findings = tuple(
        Finding(
            predicted=classes[int(item["predicted"])],
            probabilities=tuple(float(p) for p in item["probabilities"]),
            heatmap=empty,
            peak=(float(item["peak"][0]), float(item["peak"][1])),
            region=Region(*(int(v) for v in item["region"])),
            laterality=item.get("laterality"),
            localisation_uncertain=bool(item.get("localisation_uncertain", False)),
            localised=bool(item.get("localised", True)),
            uncertainty=tuple(str(reason) for reason in item.get("uncertainty", ())),
        )
        for item in data
    )
    return ImageResult(model, classes, findings, "" if findings else not_assessed)
