"""Synthetic radiographs and transfer-syntax copies for tests and the benchmark.

:func:`make_radiograph` builds a Digital X-Ray (DX, For Presentation) or
Computed Radiography (CR) dataset with plausible headers and a radiograph-like
picture; :func:`write_dataset` saves it as a DICOM file; :func:`compress_copy`
re-encodes a file in another transfer syntax, with dcmtk where dcmtk can and
pydicom's encoders otherwise.

Conformance of :func:`make_radiograph`
--------------------------------------
With the default arguments the dataset passes ``dciodvfy`` without errors.
Some arguments deliberately build images that occur in practice but break the
DX IOD, so that the pixel pipeline can be tested against them:

* ``rescale`` other than ``(1, 0)`` (DX requires slope 1 and intercept 0;
  use ``modality="CR"`` for a conformant rescaled image),
* ``signed=True`` (DX requires Pixel Representation 0),
* ``presentation_inverse=True`` with MONOCHROME2 (DX allows INVERSE only with
  MONOCHROME1),
* ``photometric`` ``"RGB"`` or ``"YBR_FULL"`` (secondary-capture-like colour),
* ``frames > 1`` (DX is single-frame).

Bit depths needed by the transfer syntaxes
------------------------------------------
For a copy whose pixels keep the original depth, ``jpeg-baseline`` needs
``bits_stored=8`` and ``jpeg-extended`` ``bits_stored <= 12``; given deeper
(or signed) data, ``dcmcjpeg`` reduces it to 8 or 12 bit unsigned, rescaling
the values and the window, so the copy still displays alike (lossy either
way). ``jpeg-ls-lossy`` refuses signed data. All other names take 8 to 16
bits, signed or unsigned, bit for bit.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "LOSSLESS",
    "TRANSFER_SYNTAXES",
    "compress_copy",
    "full_window",
    "make_radiograph",
    "write_dataset",
]

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
"""Digital X-Ray Image Storage - For Presentation."""

CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
"""Computed Radiography Image Storage."""

TRANSFER_SYNTAXES: dict[str, str] = {
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless-sv1": JPEGLosslessSV1,
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg-ls-lossy": JPEGLSNearLossless,
    "j2k-lossless": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "rle": RLELossless,
    "htj2k-lossless": HTJ2KLossless,
    "htj2k-rpcl": HTJ2KLosslessRPCL,
    "htj2k-lossy": HTJ2K,
}
"""Short names of the transfer syntaxes :func:`compress_copy` writes, to their UIDs."""

LOSSLESS: frozenset[str] = frozenset(
    {"implicit", "explicit", "deflate", "jpeg-lossless-sv1", "jpeg-ls-lossless"}
    | {"j2k-lossless", "rle", "htj2k-lossless", "htj2k-rpcl"}
)
"""The names in :data:`TRANSFER_SYNTAXES` whose pixels decode bit-identical."""

_DCMTK_COMMANDS: dict[str, tuple[str, ...]] = {
    "implicit": ("dcmconv", "+ti"),
    "explicit": ("dcmconv", "+te"),
    "deflate": ("dcmconv", "+td"),
    "jpeg-baseline": ("dcmcjpeg", "+eb"),
    "jpeg-extended": ("dcmcjpeg", "+ee"),
    "jpeg-lossless-sv1": ("dcmcjpeg", "+e1"),
    "jpeg-ls-lossless": ("dcmcjpls", "+el"),
    "jpeg-ls-lossy": ("dcmcjpls", "+en"),
    "rle": ("dcmcrle",),
}

_J2K_LOSSY_RATIO = 10.0
_JPEG_LS_NEAR = 2

_ANATOMY: dict[str, tuple[str, str]] = {
    "KNEE": ("72696002", "Knee"),
    "HAND": ("85562004", "Hand"),
    "SPINE": ("421060004", "Spine"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "CHEST": ("51185008", "Chest"),
}
"""SNOMED CT codes of the Anatomic Region Sequence; other body parts leave it empty."""

_STUDY_DATETIME = datetime(2024, 3, 14, 9, 26, 53)

UInt16Array = npt.NDArray[np.uint16]


# --------------------------------------------------------------------------- picture


def _smooth_step(values: npt.NDArray[np.float32], softness: float) -> npt.NDArray[np.float32]:
    """Map signed distances to (0, 1): 0.5 at 0, saturating beyond ``softness``."""
    result: npt.NDArray[np.float32] = 0.5 * (1.0 + np.tanh(values / np.float32(softness)))
    return result.astype(np.float32, copy=False)


def _bone(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    centre: float,
    joint: float,
    half_width: float,
    above: bool,
) -> npt.NDArray[np.float32]:
    """One long bone ending at ``joint`` with condyles, with a brighter cortex."""
    flare = half_width * 0.6 * np.exp(-(((y - joint) / 0.07) ** 2))
    width = half_width + flare
    inside = width - np.abs(x - np.float32(centre))
    body = _smooth_step(inside, 0.006)
    cortex = _smooth_step(inside, 0.006) * np.exp(-inside.clip(0) / 0.015)
    side = y - np.float32(joint)
    extent = _smooth_step(-side if above else side, 0.004)
    bone: npt.NDArray[np.float32] = ((0.42 * body + 0.3 * cortex) * extent).astype(np.float32)
    return bone


def _picture(rows: int, columns: int, seed: int) -> npt.NDArray[np.float32]:
    """A radiograph-like display picture in [0, 1]: soft tissue, two bones, noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, columns, dtype=np.float32)[None, :]
    centre = 0.5 + float(rng.uniform(-0.05, 0.05))
    joint = 0.5 + float(rng.uniform(-0.06, 0.06))
    half_width = 0.1 + float(rng.uniform(-0.015, 0.015))
    tissue = _smooth_step(np.float32(0.3) - np.abs(x - np.float32(centre)), 0.03)
    picture = 0.06 + 0.04 * y + 0.25 * tissue
    gap = 0.012 + float(rng.uniform(0.0, 0.01))
    picture = picture + _bone(x, y, centre, joint - gap, half_width, above=True)
    picture = picture + _bone(x, y, centre, joint + gap, half_width * 0.9, above=False)
    picture += rng.standard_normal((rows, columns), dtype=np.float32) * np.float32(0.012)
    clipped: npt.NDArray[np.float32] = np.clip(picture, 0.0, 1.0).astype(np.float32, copy=False)
    return clipped


def _stored_values(
    picture: npt.NDArray[np.float32], bits_stored: int, invert: bool, signed: bool
) -> npt.NDArray[np.integer]:
    """Quantise a display picture into stored values of the requested depth."""
    top = (1 << bits_stored) - 1
    values = np.rint(picture * np.float32(top)).astype(np.int32)
    if invert:
        values = top - values
    if signed:
        values -= 1 << (bits_stored - 1)
    stored: npt.NDArray[np.integer] = values.astype(_pixel_dtype(bits_stored, signed))
    return stored


def _pixel_dtype(bits_stored: int, signed: bool) -> np.dtype[np.integer]:
    allocated = 8 if bits_stored <= 8 else 16
    return np.dtype(f"{'i' if signed else 'u'}{allocated // 8}")


# --------------------------------------------------------------------------- headers


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMNODE_TEST"
    return meta


def _patient_and_study(
    ds: Dataset, patient_name: str, patient_id: str, study_uid: str, description: str
) -> None:
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _STUDY_DATETIME.strftime("%Y%m%d")
    ds.StudyTime = _STUDY_DATETIME.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    if description:
        ds.StudyDescription = description


def _series_and_equipment(
    ds: Dataset, modality: str, series_uid: str, description: str, body_part: str
) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    if description:
        ds.SeriesDescription = description
    ds.BodyPartExamined = body_part
    ds.ViewPosition = "AP"
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = "synthetic radiograph"
    ds.StationName = "TESTSTATION"
    ds.SoftwareVersions = "1"


def _general_image(ds: Dataset, laterality: str | None, body_part: str) -> None:
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.ImageLaterality = laterality or "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    code = _ANATOMY.get(body_part)
    items = [_code_item(code[0], "SCT", code[1])] if code else []
    ds.AnatomicRegionSequence = Sequence(items)  # Type 2: empty when unknown


def _image_pixel(ds: Dataset, pixels: npt.NDArray[np.integer], bits_stored: int) -> None:
    colour = pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] == 3)
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = (
        int(pixels.shape[-3 if colour else -2]),
        int(pixels.shape[-2 if colour else -1]),
    )
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"


def _dx_modules(ds: Dataset, spacing: float) -> None:
    """Attributes only the DX IOD has (DX Series, Image, Detector, Acquisition Context)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleType = "US"
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "nominal detector pitch"
    ds.AcquisitionContextSequence = Sequence()
    ds.PositionerType = "COLUMN"
    ds.ViewCodeSequence = Sequence([_code_item("399348003", "SCT", "antero-posterior")])
    ds.ImagerPixelSpacing = [spacing, spacing]


def _cr_modules(ds: Dataset, spacing: float) -> None:
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.RescaleType = "US"


# --------------------------------------------------------------------------- grey levels


def _modality_range(
    bits_stored: int, signed: bool, rescale: tuple[float, float]
) -> tuple[float, float]:
    """Lowest and highest modality value the stored range can produce."""
    low = -(1 << (bits_stored - 1)) if signed else 0
    high = low + (1 << bits_stored) - 1
    slope, intercept = rescale
    ends = (low * slope + intercept, high * slope + intercept)
    return min(ends), max(ends)


def full_window(low: float, high: float) -> tuple[float, float]:
    """The LINEAR window (center, width) that maps [low, high] exactly onto [0, 1]."""
    return (low + high) / 2.0 + 0.5, (high - low) + 1.0


def _linear_window(
    values: npt.NDArray[np.float64], center: float, width: float
) -> npt.NDArray[np.float64]:
    """PS3.3 C.11.2.1.2.1 LINEAR window into [0, 1]."""
    if width <= 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _set_voi_lut(ds: Dataset, low: float, high: float, window: tuple[float, float]) -> None:
    """Write a 16-bit VOI LUT Sequence equivalent to ``window`` over [low, high]."""
    first, last = round(low), round(high)
    entries = last - first + 1
    if entries > 1 << 16:
        raise ValueError("a VOI LUT can cover at most 65536 modality values")
    domain = np.arange(first, last + 1, dtype=np.float64)
    table = np.rint(_linear_window(domain, *window) * 65535.0).astype("<u2")
    item = Dataset()
    descriptor_vr = "SS" if first < 0 else "US"
    item.add(DataElement(0x00283002, descriptor_vr, [entries % (1 << 16), first, 16]))
    item.add(DataElement(0x00283006, "OW", table.tobytes()))
    item.LUTExplanation = f"equivalent of window {window[0]:g}/{window[1]:g}"
    ds.VOILUTSequence = Sequence([item])


def _set_grey_levels(
    ds: Dataset,
    bits_stored: int,
    signed: bool,
    rescale: tuple[float, float],
    window: tuple[float, float] | None,
    voi_lut: bool,
) -> None:
    """Modality LUT (rescale) and VOI LUT modules; a full-range window by default."""
    ds.RescaleSlope = rescale[0]
    ds.RescaleIntercept = rescale[1]
    low, high = _modality_range(bits_stored, signed, rescale)
    chosen = window if window is not None else full_window(low, high)
    if voi_lut:
        _set_voi_lut(ds, low, high, chosen)
        return
    ds.WindowCenter = chosen[0]
    ds.WindowWidth = chosen[1]
    ds.VOILUTFunction = "LINEAR"


def _presentation(ds: Dataset, modality: str, inverse: bool) -> None:
    """Presentation LUT Shape: required by DX, written for CR only when inverse."""
    if modality == "DX" or inverse:
        ds.PresentationLUTShape = "INVERSE" if inverse else "IDENTITY"


# --------------------------------------------------------------------------- builder


def _check_arguments(bits_stored: int, photometric: str, modality: str, frames: int) -> None:
    if not 2 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 2..16, not {bits_stored}")
    if photometric not in {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL"}:
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    if photometric in {"RGB", "YBR_FULL"} and bits_stored != 8:
        raise ValueError("colour images are built with bits_stored=8")
    if modality not in {"DX", "CR"}:
        raise ValueError(f"modality must be 'DX' or 'CR', not {modality!r}")
    if frames < 1:
        raise ValueError("frames must be at least 1")


def _pixel_array(
    picture: npt.NDArray[np.float32],
    bits_stored: int,
    photometric: str,
    invert: bool,
    signed: bool,
    frames: int,
) -> npt.NDArray[np.integer]:
    """Stored pixels: grey, RGB or YBR_FULL, repeated ``frames`` times when > 1."""
    values = _stored_values(picture, bits_stored, invert, signed)
    if photometric in {"RGB", "YBR_FULL"}:
        values = np.repeat(values[..., None], 3, axis=-1)
        if photometric == "YBR_FULL":
            values = convert_color_space(values, "RGB", "YBR_FULL")
    if frames > 1:
        values = np.stack([values] * frames)
    return values


def make_radiograph(
    *,
    rows: int = 512,
    columns: int = 400,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    body_part: str = "KNEE",
    laterality: str | None = "R",
    modality: str = "DX",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: bool = False,
    presentation_inverse: bool = False,
    signed: bool = False,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "TEST001",
    study_description: str = "",
    series_description: str = "",
    frames: int = 1,
    picture: npt.NDArray[np.float32] | None = None,
) -> Dataset:
    """Build a synthetic DX (For Presentation) or CR radiograph dataset.

    The picture (soft tissue, two long bones meeting at a joint, noise) is a
    function of ``rows``, ``columns`` and ``seed`` only; every other argument
    changes how the same picture is encoded, so that differently encoded
    copies display identically. MONOCHROME1 and ``presentation_inverse``
    store the values inverted (displayed once inverted, even when both are
    set, as in a conformant DX MONOCHROME1 image with Presentation LUT Shape
    INVERSE).

    Parameters
    ----------
    rows, columns:
        Matrix size.
    bits_stored:
        2 to 16; 8 or fewer use 8 bits allocated, more use 16.
    photometric:
        ``MONOCHROME1``, ``MONOCHROME2``, ``RGB`` or ``YBR_FULL`` (colour
        needs ``bits_stored=8``; the three samples are equal).
    body_part:
        Body Part Examined; ``KNEE``, ``HAND``, ``SPINE``, ``LSPINE``,
        ``TSPINE`` and ``CHEST`` also get an Anatomic Region code; others an
        empty sequence, which dciodvfy reports as an error.
    laterality:
        Image Laterality; ``None`` writes ``U`` (unpaired).
    modality:
        ``DX`` (Digital X-Ray Image Storage - For Presentation) or ``CR``.
    rescale:
        (slope, intercept) of the Modality LUT; default (1, 0).
    window:
        (center, width) in modality units; default: the LINEAR window that
        maps the whole stored range onto the display range.
    voi_lut:
        Write a 16-bit VOI LUT Sequence equivalent to the window instead of
        Window Center/Width (needs an integer modality range).
    presentation_inverse:
        Store inverted values and write Presentation LUT Shape ``INVERSE``.
    signed:
        Pixel Representation 1 (values centred on 0).
    seed:
        Seed of the picture.
    study_uid, series_uid, sop_uid:
        UIDs; new ones are generated when ``None``.
    patient_name, patient_id, study_description, series_description:
        Header text.
    frames:
        Number of Frames; more than 1 repeats the picture (an image the node
        does not support).
    picture:
        A display picture (2-D, values in [0, 1], 1 white) to encode instead
        of the synthetic one; ``rows``, ``columns`` and ``seed`` are then
        ignored. Used by :mod:`dicomnode.training.phantoms`.

    Returns
    -------
    pydicom.dataset.Dataset
        With file meta (Explicit VR Little Endian) and native Pixel Data.

    Raises
    ------
    ValueError
        If the arguments cannot be combined.
    """
    _check_arguments(bits_stored, photometric, modality, frames)
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    sop_instance = sop_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = _STUDY_DATETIME.strftime("%Y%m%d")
    ds.InstanceCreationTime = _STUDY_DATETIME.strftime("%H%M%S")
    _patient_and_study(ds, patient_name, patient_id, study_uid or generate_uid(), study_description)
    _series_and_equipment(ds, modality, series_uid or generate_uid(), series_description, body_part)
    _general_image(ds, laterality, body_part)
    invert = photometric == "MONOCHROME1" or presentation_inverse
    if picture is None:
        picture = _picture(rows, columns, seed)
    elif picture.ndim != 2:
        raise ValueError("picture must be a 2-D array")
    pixels = _pixel_array(picture, bits_stored, photometric, invert, signed, frames)
    ds.PhotometricInterpretation = photometric
    _image_pixel(ds, pixels, bits_stored)
    if frames > 1:
        ds.NumberOfFrames = frames
    (_dx_modules if modality == "DX" else _cr_modules)(ds, 0.15)
    ds.PixelSpacing = [0.15, 0.15]
    if photometric.startswith("MONOCHROME"):
        _set_grey_levels(ds, bits_stored, signed, rescale or (1.0, 0.0), window, voi_lut)
        _presentation(ds, modality, invert)
    return ds


def make_rejection_note(rejected: list[Dataset], code: str = "113001") -> Dataset:
    """A PACS's rejection note (IHE IOCM): a Key Object Selection document titled by DCM
    ``code`` (113001 Rejected for Quality Reasons, 113037 Rejected for Patient Safety
    Reasons, ...) listing ``rejected``, in their study; as highdicom writes one."""
    from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
    from pydicom.sr.coding import Code

    from dicomnode.values import REJECTION_TITLES

    title = Code(code, "DCM", REJECTION_TITLES.get(code, "Of Interest"))
    content = KeyObjectSelection(document_title=title, referenced_objects=rejected)
    note = KeyObjectSelectionDocument(
        evidence=rejected,
        content=content,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="PACS",
    )
    note.file_meta = _file_meta(str(note.SOPClassUID), str(note.SOPInstanceUID))
    return note


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Save ``ds`` as a DICOM file (preamble and file meta) and return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- transcoding


def _dcmtk_tool(name: str) -> str | None:
    """Path of a dcmtk executable, preferring /usr/bin."""
    candidate = Path("/usr/bin") / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def _run_dcmtk(syntax: str, src: Path, dst: Path) -> bool:
    """Transcode with dcmtk; False when the tool is not installed."""
    tool, *options = _DCMTK_COMMANDS[syntax]
    executable = _dcmtk_tool(tool)
    if executable is None:
        return False
    if syntax == "jpeg-ls-lossy":
        options += ["+md", str(_JPEG_LS_NEAR)]
    completed = subprocess.run(
        [executable, *options, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{tool} failed for {syntax}: {completed.stderr.strip()[:500]}")
    return True


def _mark_lossy(ds: Dataset, original_bytes: int, method: str) -> None:
    """Lossy Image Compression attributes and a new SOP Instance UID (PS3.3 C.7.6.1.1.5)."""
    ratio = original_bytes / max(1, len(ds.PixelData))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [round(ratio, 2)]
    ds.LossyImageCompressionMethod = [method]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _encode_j2k_lossy(ds: Dataset) -> None:
    original = len(ds.PixelData)
    ds.compress(
        JPEG2000,
        encoding_plugin="pylibjpeg",
        generate_instance_uid=False,
        j2k_cr=[_J2K_LOSSY_RATIO],
    )
    _mark_lossy(ds, original, "ISO_15444_1")


def _encode_jpeg_ls_lossy(ds: Dataset) -> None:
    original = len(ds.PixelData)
    ds.compress(JPEGLSNearLossless, generate_instance_uid=False, jls_error=_JPEG_LS_NEAR)
    _mark_lossy(ds, original, "ISO_14495_1")


def _htj2k(reversible: bool, rpcl: bool = False) -> Callable[[Dataset], None]:
    """High-Throughput JPEG 2000 (PS3.5 A.4.11): pydicom decodes it but has no encoder, so
    the codestream is made by OpenJPH through imagecodecs (a test dependency). Reversible is
    lossless, the SOP Instance UID kept; irreversible (OpenJPH's default quantisation) is
    lossy and marked so. ``rpcl``: the lossless RPCL profile (PS3.5 A.4.12), RPCL
    progression with a TLM marker segment and one tile-part per resolution."""

    def encode(ds: Dataset) -> None:
        import imagecodecs

        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames") or 1) != 1:
            raise ValueError("htj2k copies are made of single-frame grey images only")
        original = len(ds.PixelData)
        by_resolution = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS
        codestream = bytes(
            imagecodecs.htj2k_encode(
                ds.pixel_array,
                reversible=reversible,
                tlm=rpcl or None,
                tilepart=by_resolution if rpcl else None,
            )
        )
        if rpcl and _progression_order(codestream) != _RPCL:
            raise RuntimeError("the HTJ2K encoder did not write RPCL progression order")
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = (
            HTJ2KLosslessRPCL if rpcl else HTJ2KLossless if reversible else HTJ2K
        )
        if not reversible:
            _mark_lossy(ds, original, "ISO_15444_15")

    return encode


_RPCL = 2
"""The RPCL progression order's code in a JPEG 2000 COD marker segment (ISO 15444-1 A.6.1)."""


def _progression_order(codestream: bytes) -> int:
    """The progression order that a codestream's COD marker segment names: the byte after
    the marker (FF52), its length (2 bytes) and its coding style (1 byte)."""
    at = codestream.find(b"\xff\x52")
    if at < 0:
        raise ValueError("the codestream has no COD marker segment")
    return codestream[at + 5]


def _lossless(uid: str, plugin: str = "") -> Callable[[Dataset], None]:
    """A lossless pydicom encoder; the SOP Instance UID stays (same pixels)."""

    def encode(ds: Dataset) -> None:
        ds.compress(uid, encoding_plugin=plugin, generate_instance_uid=False)

    return encode


def _relabel(uid: str) -> Callable[[Dataset], None]:
    """A native transfer syntax: pydicom re-encodes the dataset when it is saved."""

    def encode(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID(uid)

    return encode


_PYDICOM_ENCODERS: dict[str, Callable[[Dataset], None]] = {
    "implicit": _relabel(ImplicitVRLittleEndian),
    "explicit": _relabel(ExplicitVRLittleEndian),
    "deflate": _relabel(DeflatedExplicitVRLittleEndian),
    "jpeg-ls-lossless": _lossless(JPEGLSLossless),
    "jpeg-ls-lossy": _encode_jpeg_ls_lossy,
    "j2k-lossless": _lossless(JPEG2000Lossless, "pylibjpeg"),
    "j2k-lossy": _encode_j2k_lossy,
    "rle": _lossless(RLELossless),
    "htj2k-lossless": _htj2k(reversible=True),
    "htj2k-rpcl": _htj2k(reversible=True, rpcl=True),
    "htj2k-lossy": _htj2k(reversible=False),
}
"""pydicom encoders (HTJ2K: imagecodecs'): J2K and HTJ2K always, the others only when dcmtk
is not installed."""


def _run_pydicom(syntax: str, src: Path, dst: Path) -> None:
    if syntax not in _PYDICOM_ENCODERS:
        raise RuntimeError(f"{syntax} needs dcmtk, which is not installed")
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    _PYDICOM_ENCODERS[syntax](ds)
    write_dataset(ds, dst)


def _is_signed(path: Path) -> bool:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.get("PixelRepresentation", 0)) == 1


def compress_copy(src: Path, dst: Path, syntax: str) -> Path:
    """Write a copy of the DICOM file ``src`` in transfer syntax ``syntax``.

    Parameters
    ----------
    src:
        A DICOM file (any transfer syntax dcmtk or pydicom reads).
    dst:
        Where to write the copy; parent folders are created.
    syntax:
        A key of :data:`TRANSFER_SYNTAXES`. ``implicit``, ``explicit`` and
        ``deflate`` use ``dcmconv`` (``+ti``, ``+te``, ``+td``); the JPEG
        names ``dcmcjpeg`` (``+eb`` baseline, 8 bit; ``+ee`` extended, 12
        bit; ``+e1`` lossless process 14 selection value 1, up to 16 bit);
        the JPEG-LS names ``dcmcjpls`` (``+el``; ``+en`` near-lossless,
        NEAR 2); ``rle`` ``dcmcrle``. ``j2k-lossless`` and ``j2k-lossy``
        (compression ratio 10) use pydicom with the pylibjpeg-openjpeg
        encoder; ``htj2k-lossless``, ``htj2k-rpcl`` (lossless, RPCL profile)
        and ``htj2k-lossy`` (High-Throughput JPEG 2000, grey single-frame
        images) imagecodecs' OpenJPH encoder.
        Without dcmtk, pydicom writes every syntax except the JPEG (ISO 10918)
        ones. Lossy copies get a new SOP Instance UID and Lossy
        Image Compression ``01``; see the module notes on bit depths.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    ValueError
        If ``syntax`` is unknown, or ``jpeg-ls-lossy`` is asked for signed data.
    RuntimeError
        If the encoder fails, or a JPEG (ISO 10918) name is asked without dcmtk.
    """
    if syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax name {syntax!r}")
    src, dst = Path(src), Path(dst)
    if syntax == "jpeg-ls-lossy" and _is_signed(src):
        raise ValueError(
            "jpeg-ls-lossy does not take signed pixels: dcmcjpls refuses them and "
            "pydicom's encoder does not round-trip them"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    if syntax in _DCMTK_COMMANDS and _run_dcmtk(syntax, src, dst):
        return dst
    _run_pydicom(syntax, src, dst)
    return dst
