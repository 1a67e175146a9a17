"""Encode a rendered overlay as a DICOM Secondary Capture image.

The SC image belongs to the source's study and patient, lies in a new series,
says in its Series Description which model made it, references the original
in the Source Image Sequence and declares its burned-in annotation.
"""

from __future__ import annotations

import copy
from contextlib import suppress
from io import BytesIO

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom import LateralityValues
from highdicom.sc import SCImage
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicomnode.encode.header import conformant_header, stamp_in_source_zone
from dicomnode.errors import EncodeError
from dicomnode.values import ImageResult, ModelIdentity, Placement

_LONG_STRING = 64
_PLACEHOLDER_ORIENTATION = ("L", "F")
_PAIRED_BODY_PARTS = frozenset(
    [
        "ANKLE",
        "ARM",
        "BREAST",
        "CLAVICLE",
        "EAR",
        "ELBOW",
        "EXTREMITY",
        "EYE",
        "FEMUR",
        "FINGER",
        "FOOT",
        "FOREARM",
        "HAND",
        "HEEL",
        "HIP",
        "HUMERUS",
        "KIDNEY",
        "KNEE",
        "LEG",
        "LOWER LIMB",
        "LOWLIMB",
        "PATELLA",
        "RADIUS",
        "SCAPULA",
        "SHOULDER",
        "THIGH",
        "THUMB",
        "TIBIA",
        "TOE",
        "ULNA",
        "UPPER LIMB",
        "UPRLIMB",
        "WRIST",
    ]
)
"""BodyPartExamined values of paired structures (General Series Laterality is Type 2C)."""


SYNTHETIC_SERIES_LABEL = " [synthetic training data]"


def series_description(prefix: str, model: ModelIdentity) -> str:
    """Return "<prefix> <model name> <version>" cut to the 64 characters of a LO value.

    A model trained on synthetic data gets " [synthetic training data]" at the
    end, never cut off, so that a PACS series list says so too.

    Parameters
    ----------
    prefix:
        What the series holds, e.g. ``"AI overlay"``.
    model:
        The model that produced the series.

    Returns
    -------
    str
        The Series Description.
    """
    label = SYNTHETIC_SERIES_LABEL if model.synthetic_training_data else ""
    return f"{prefix} {model.name} {model.version}"[: _LONG_STRING - len(label)] + label


def source_laterality(source: pydicom.Dataset) -> str | None:
    """Return ``"L"`` or ``"R"`` from ImageLaterality or Laterality, else ``None``.

    Parameters
    ----------
    source:
        The original image's dataset.

    Returns
    -------
    str or None
        The side, when the source names exactly one.
    """
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def overlay_side(source: pydicom.Dataset, result: ImageResult) -> str | None:
    """The one side an overlay of ``source`` shows: the source's (``"L"`` or ``"R"``),
    unless the model found a right and a left knee on it (a bilateral film whose header
    names one side), or ``None``. Its series and series Laterality hold for it."""
    if {"R", "L"} <= {finding.laterality for finding in result.findings}:
        return None
    return source_laterality(source)


def encode_sc(
    source: pydicom.Dataset,
    rgb: npt.NDArray[np.uint8],
    result: ImageResult,
    placement: Placement,
    *,
    jpeg_quality: int = 0,
) -> pydicom.Dataset:
    """Encode the overlay of one image as a Secondary Capture Image.

    Parameters
    ----------
    source:
        The original image, read without pixel data; its patient, study and
        laterality attributes are copied.
    rgb:
        ``uint8`` array (rows, columns, 3) from
        :func:`dicomnode.encode.render.render_overlay`.
    result:
        The result the overlay shows; names the model.
    placement:
        The new image's series and SOP Instance UIDs and numbers, and the node that made
        it (General and SC Equipment modules).
    jpeg_quality:
        1-100: the pixel data as JPEG Baseline (lossy, YBR_FULL_422, flagged
        in Lossy Image Compression); 0: uncompressed Explicit VR Little Endian.

    Returns
    -------
    highdicom.sc.SCImage
        The SC image (a :class:`pydicom.Dataset`), ready to be saved or sent.

    Raises
    ------
    EncodeError
        When ``rgb`` is not an RGB ``uint8`` image or the source lacks the
        attributes an SC image needs (Study Instance UID, SOP UIDs).
    """
    _check_rgb(rgb)
    source = conformant_header(source)
    model = result.model
    side = overlay_side(source, result)
    try:
        sc = SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=np.ascontiguousarray(rgb),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=placement.series_uid,
            series_number=placement.series_number,
            sop_instance_uid=placement.sop_uid,
            instance_number=placement.instance_number,
            manufacturer=placement.manufacturer,
            laterality=_laterality(side),
            patient_orientation=_PLACEHOLDER_ORIENTATION,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description(_overlay_prefix(side), model),
            manufacturer_model_name=model.name[:_LONG_STRING],
            software_versions=placement.software_version[:_LONG_STRING],
        )
        _reference_source(sc, source)
        _copy_patient_and_study(sc, source)
    except (AttributeError, TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode the Secondary Capture image: {exc}") from exc
    _describe_capture(sc, source, model, placement)
    _image_laterality(sc, source, result)
    _carry_lossy_history(sc, source)
    stamp_in_source_zone(sc, source)
    if jpeg_quality:
        compress_jpeg(sc, rgb, jpeg_quality)
    return sc


def compress_jpeg(sc: pydicom.Dataset, rgb: npt.NDArray[np.uint8], quality: int) -> None:
    """Replace the RGB pixel data of ``sc`` by one JPEG Baseline frame.

    Colour JPEG Baseline is YBR_FULL_422 in DICOM (PS3.5 8.2.1): the frame is
    written with 4:2:2 chroma subsampling to match, and the image is flagged as
    lossy (ratio and method ISO_10918_1). An overlay of a 2048-pixel radiograph
    shrinks from 12 MB to well under 1 MB, which is what PACS storage and the
    network see for every result.
    """
    if not 1 <= quality <= 100:
        raise EncodeError(f"JPEG quality must be 1-100, got {quality}")
    with BytesIO() as buffer:
        Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").save(
            buffer,
            format="JPEG",
            quality=quality,
            subsampling=1,  # 1: 4:2:2
        )
        frame = buffer.getvalue()
    sc.PixelData = encapsulate([frame])
    sc["PixelData"].VR = "OB"
    sc.PhotometricInterpretation = "YBR_FULL_422"
    sc.PlanarConfiguration = 0
    earlier_ratios, earlier_methods = _lossy_history(sc)
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [*earlier_ratios, f"{rgb.nbytes / len(frame):.2f}"]
    sc.LossyImageCompressionMethod = [*earlier_methods, "ISO_10918_1"]
    sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _carry_lossy_history(sc: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """An overlay of an image that was once lossy compressed is flagged so too, with the
    source's ratios and methods (PS3.3 C.7.6.1.1.5: once 01, never reset): a reader sees
    that what the overlay shows went through a lossy step before the node."""
    if str(source.get("LossyImageCompression", "")).strip() != "01":
        return
    sc.LossyImageCompression = "01"
    ratios, methods = _lossy_history(source)
    if ratios:
        sc.LossyImageCompressionRatio = ratios
        sc.LossyImageCompressionMethod = methods


def _lossy_history(ds: pydicom.Dataset) -> tuple[list[str], list[str]]:
    """The dataset's lossy compressions, ratio and method in step ([] when they are missing
    or do not pair up: a history that cannot be read is not carried)."""
    ratios = [str(r) for r in _values(ds.get("LossyImageCompressionRatio"))]
    methods = [str(m) for m in _values(ds.get("LossyImageCompressionMethod"))]
    if not ratios or len(ratios) != len(methods):
        return [], []
    return ratios, methods


def _values(value: object) -> list[object]:
    """An attribute's value as a list of its values (pydicom gives one value bare)."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _check_rgb(rgb: npt.NDArray[np.uint8]) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise EncodeError(f"overlay must be uint8 (rows, columns, 3), got {rgb.dtype} {rgb.shape}")


def _overlay_prefix(side: str | None) -> str:
    """ "AI overlay", with the side when it shows one (a series per side)."""
    return "AI overlay" if side is None else f"AI overlay {side}"


def _laterality(side: str | None) -> LateralityValues | None:
    return None if side is None else LateralityValues(side)


def _image_laterality(sc: pydicom.Dataset, source: pydicom.Dataset, result: ImageResult) -> None:
    """An overlay whose series Laterality is empty (no one side) says what it shows in
    Image Laterality: ``B`` when its findings are a right and a left knee, else the
    source's ``B`` or ``U``. Then the Type 2C Laterality, which allows only R or L and
    may not be sent beside Image Laterality, is left out (PS3.3 C.7.3.1)."""
    if "Laterality" not in sc or sc.Laterality:
        return  # one side (R or L), or not a paired body part
    sides = {finding.laterality for finding in result.findings}
    copied = str(source.get("ImageLaterality", "") or "").strip().upper()
    shown = "B" if {"R", "L"} <= sides else copied if copied in ("B", "U") else ""
    if shown:
        sc.ImageLaterality = shown
        del sc.Laterality


def is_paired(source: pydicom.Dataset) -> bool:
    """The source's Body Part Examined is a paired structure (General Series Laterality is
    then Type 2C present, empty when the side is unknown)."""
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    return body_part in _PAIRED_BODY_PARTS


def _copy_patient_and_study(sc: SCImage, source: pydicom.Dataset) -> None:
    """Copy the whole Patient and Study modules of the source, not only highdicom's few.

    Issuer of Patient ID, Other Patient IDs, Study Description, Patient's Age and the
    rest of those modules let a PACS or master patient index file the overlay with the
    original. A source of a SOP class highdicom does not know keeps the constructor's copy.
    """
    with suppress(KeyError):
        sc.copy_patient_and_study_information(source)


def _reference_source(sc: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """Add the Source Image Sequence item pointing at the original image."""
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [item]


def _describe_capture(
    sc: pydicom.Dataset,
    source: pydicom.Dataset,
    model: ModelIdentity,
    placement: Placement,
) -> None:
    """Set what distinguishes a workstation overlay from a plain digitised image.

    Patient Orientation is copied from the source as it is (possibly empty):
    highdicom only accepts single-letter orientations, so the constructor got a
    placeholder that this replaces.
    """
    sc.PatientOrientation = source.get("PatientOrientation")
    if "Laterality" not in sc and is_paired(source):
        sc.Laterality = None  # Type 2C: present, empty, when the side is unknown
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"{model.explanation} overlay by {model.name} {model.version} "
        f"(weights sha256 {model.sha256})"
    )
    sc.SecondaryCaptureDeviceManufacturer = placement.manufacturer[:_LONG_STRING]
    sc.SecondaryCaptureDeviceManufacturerModelName = model.name[:_LONG_STRING]
    sc.SecondaryCaptureDeviceSoftwareVersions = placement.software_version[:_LONG_STRING]
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("RequestAttributesSequence"):  # the order the overlay answers, for the RIS
        sc.RequestAttributesSequence = copy.deepcopy(source.RequestAttributesSequence)
