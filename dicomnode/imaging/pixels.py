"""DICOM or picture file -> :class:`~dicomnode.values.PreparedImage`.

The grey-scale pipeline of PS3.4 N.2 up to P-values, for single-frame
radiographs:

1. decode the Pixel Data (any transfer syntax pydicom and its plugins decode);
2. Modality LUT: the first Modality LUT Sequence item, else Rescale
   Slope/Intercept;
3. VOI LUT: the first VOI LUT Sequence item, else the first Window
   Center/Width (LINEAR, LINEAR_EXACT or SIGMOID), else a robust window from
   the 0.5th to the 99.5th percentile of the modality values;
4. inversion when Photometric Interpretation is MONOCHROME1 or Presentation
   LUT Shape is INVERSE (once, even when both are present: a DX MONOCHROME1
   image must carry INVERSE);

giving ``float32`` values in [0, 1] with 0 black and 1 white.

Steps 2 to 4 are a function of the stored value alone, so for integer pixel
data they are evaluated once per possible stored value (at most 65536 of
them, in float64) and applied to the image with one table look-up. The image
itself is never held in float64; the only full-size arrays are the decoded
pixels and the ``float32`` result.

Colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_RCT — secondary
captures of radiographs exist) are converted to luminance with the ITU-R
BT.601 weights (0.299 R + 0.587 G + 0.114 B), the same weights as the
YBR_FULL luma, and scaled by the largest stored value; no LUTs apply to them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.errors import ImagingError, UnsupportedImageError
from dicomnode.values import FloatArray, OwnWindow, PreparedImage

__all__ = ["prepare_dataset", "read_dicom", "read_image_file"]

logger = logging.getLogger(__name__)

LOW_PERCENTILE = 0.5
"""Lower end of the robust window used when an image has no VOI LUT or window."""

HIGH_PERCENTILE = 99.5
"""Upper end of the robust window used when an image has no VOI LUT or window."""

MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_LUMA = (0.299, 0.587, 0.114)
_HISTOGRAM_BLOCK = 1 << 20

Float64Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.integer[Any]]


@dataclass(frozen=True)
class _Window:
    """A VOI window in modality units (PS3.3 C.11.2.1.2)."""

    center: float
    width: float
    function: str = "LINEAR"


# --------------------------------------------------------------------------- checks

MIN_SIDE = 16
"""Rows and columns an image needs at least, to be analysed and drawn as an overlay (a
header's icon or a sliver of a stitched image is no radiograph to grade)."""


def _check_supported(ds: Dataset) -> str:
    """Reject what the node does not process; return the photometric interpretation."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedImageError("float pixel data is not a radiograph")
        raise ImagingError("the dataset has no Pixel Data")
    if str(ds.get("PresentationIntentType", "")).strip().upper() == "FOR PROCESSING":
        raise UnsupportedImageError(
            "Presentation Intent Type FOR PROCESSING (raw detector data, not for reading); "
            "the node analyses the For Presentation image"
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise UnsupportedImageError(
            f"multi-frame images are not supported ({frames} frames); send single frames"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME | COLOUR:
        raise UnsupportedImageError(
            f"photometric interpretation {photometric or '(missing)'} is not supported"
        )
    allocated = int(ds.get("BitsAllocated") or 0)
    if allocated not in (8, 16):
        raise UnsupportedImageError(f"{allocated} bits allocated is not supported (8 or 16)")
    _check_bits_stored(ds, allocated)
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if min(rows, columns) < MIN_SIDE:
        raise UnsupportedImageError(
            f"the image is {rows} x {columns} pixels, too small to analyse "
            f"(at least {MIN_SIDE} each way)"
        )
    return photometric


def _check_bits_stored(ds: Dataset, allocated: int) -> None:
    """Bits Stored must fit in Bits Allocated, with High Bit its top bit (PS3.5 8.1.1, as
    radiograph IODs require): another layout cannot be read as the header says."""
    stored = int(ds.get("BitsStored") or 0)
    if not 1 <= stored <= allocated:
        raise UnsupportedImageError(
            f"the header is inconsistent: {stored} bits stored in {allocated} bits allocated"
        )
    high = ds.get("HighBit")
    if high is not None and int(high) != stored - 1:
        raise UnsupportedImageError(
            f"High Bit {int(high)} with {stored} bits stored is not supported "
            f"(the node reads High Bit = Bits Stored - 1)"
        )


BLANK_RANGE = 1 / 255
"""Prepared pixels whose values span less than this (one displayed grey level) show nothing:
a blank exposure, or a header whose rescale or window maps every pixel to one grey."""


def _check_not_blank(pixels: FloatArray) -> None:
    """Reject an image that shows nothing: a model would still grade it, at random."""
    if float(np.ptp(pixels)) < BLANK_RANGE:
        raise UnsupportedImageError(
            "the image is blank: every pixel shows the same grey (after its rescale and window)"
        )


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax, inferred from how it was read when meta is absent."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return UID(str(syntax))
    implicit, little = ds.original_encoding
    if little is None:
        raise ImagingError("the dataset has no Transfer Syntax UID")
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


# --------------------------------------------------------------------------- decoding


def _decode(ds: Dataset) -> npt.NDArray[Any]:
    """Decoded pixels as an array (colour as RGB), without caching them on ``ds``."""
    syntax = _transfer_syntax(ds)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds = _with_transfer_syntax(ds, syntax)
    try:
        return pixel_array(ds)
    except Exception as exc:  # plugins raise many types; all mean "undecodable"
        raise ImagingError(
            f"pixel data could not be decoded ({syntax.name}): {type(exc).__name__}: "
            f"{str(exc)[:200]}"
        ) from exc


def _with_transfer_syntax(ds: Dataset, syntax: UID) -> Dataset:
    """A shallow copy of ``ds`` whose file meta names ``syntax``."""
    copy = Dataset(ds)
    copy.file_meta = pydicom.dataset.FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = syntax
    return copy


def _clear_unused_bits(pixels: IntArray, bits_stored: int) -> IntArray:
    """Zero bits above Bits Stored in unsigned data (overlays or garbage), in place."""
    if pixels.dtype.kind == "u" and bits_stored < pixels.dtype.itemsize * 8:
        np.bitwise_and(pixels, (1 << bits_stored) - 1, out=pixels)
    return pixels


# --------------------------------------------------------------------------- stored values


def _stored_domain(dtype: np.dtype[Any]) -> IntArray:
    """Every value of ``dtype``, ordered by its unsigned bit pattern (the table index)."""
    unsigned = np.dtype(f"u{dtype.itemsize}")
    return np.arange(1 << (8 * dtype.itemsize), dtype=np.int64).astype(unsigned).view(dtype)


def _table_index(pixels: IntArray) -> IntArray:
    """View signed pixels as unsigned so they index the table of :func:`_stored_domain`."""
    return pixels.view(np.dtype(f"u{pixels.dtype.itemsize}"))


def _histogram(index: IntArray, size: int) -> npt.NDArray[np.int64]:
    """Counts of each table index, computed in blocks to bound temporary memory."""
    flat = index.reshape(-1)
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, flat.size, _HISTOGRAM_BLOCK):
        counts += np.bincount(flat[start : start + _HISTOGRAM_BLOCK], minlength=size)
    return counts


# --------------------------------------------------------------------------- LUT steps


def _first(value: Any) -> float | None:
    """The first number of a possibly multi-valued DS/IS value; None when absent or invalid."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _number(ds: Dataset, keyword: str) -> float | None:
    """First value of a numeric element; None when absent, empty or unreadable."""
    try:
        return _first(ds.get(keyword))
    except (TypeError, ValueError):  # raw values that do not convert, e.g. DS "junk"
        return None


def _lut_entries(item: Dataset, ds: Dataset) -> npt.NDArray[np.int64]:
    """LUT Data of a LUT item as integers (US values or OW words in the file's byte order)."""
    element = item["LUTData"]
    if element.VR == "OW" or isinstance(element.value, bytes):
        _, little = ds.original_encoding
        order = ">" if little is False else "<"
        return np.frombuffer(element.value, dtype=f"{order}u2").astype(np.int64)
    values = element.value if isinstance(element.value, list | MultiValue) else [element.value]
    return np.asarray(values, dtype=np.int64)


def _modality_lut_sequence(domain: IntArray, ds: Dataset) -> npt.NDArray[np.int64]:
    """First Modality LUT Sequence item (PS3.3 C.11.1): values below or above the
    table take its first or last entry.

    Written here because pydicom 3.0 rejects entry sizes other than 8 and 16
    bits, which the standard allows (8 to 16).
    """
    item = ds.ModalityLUTSequence[0]
    entries, first_map = int(item.LUTDescriptor[0]) or 1 << 16, int(item.LUTDescriptor[1])
    table = _lut_entries(item, ds)[:entries]
    if table.size == 0:
        raise ImagingError("the Modality LUT Sequence has no LUT Data")
    positions = np.clip(domain.astype(np.int64) - first_map, 0, table.size - 1)
    return table[positions]


def _modality_values(domain: IntArray, ds: Dataset) -> npt.NDArray[Any]:
    """Modality LUT of every stored value: the Modality LUT Sequence, else rescale.

    Missing, empty or unreadable Rescale Slope/Intercept mean 1 and 0, and a
    zero slope means 1 (all seen in practice despite being invalid).
    """
    if ds.get("ModalityLUTSequence"):
        try:
            return _modality_lut_sequence(domain, ds)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise ImagingError(f"invalid Modality LUT Sequence ({type(exc).__name__})") from exc
    slope = _number(ds, "RescaleSlope")
    intercept = _number(ds, "RescaleIntercept")
    slope = 1.0 if slope is None or slope == 0.0 else slope
    return domain.astype(np.float64) * slope + (intercept or 0.0)


def _window(ds: Dataset) -> _Window | None:
    """The first Window Center/Width, or None when absent or invalid."""
    center, width = _number(ds, "WindowCenter"), _number(ds, "WindowWidth")
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in {"LINEAR", "LINEAR_EXACT", "SIGMOID"}:
        logger.warning(
            "ignoring window with unknown VOI LUT Function", extra={"function": function}
        )
        return None
    if width < (1.0 if function == "LINEAR" else np.finfo(np.float64).tiny):
        logger.warning("ignoring window of invalid width", extra={"width": width})
        return None
    return _Window(center, width, function)


def _apply_window(values: Float64Array, window: _Window) -> Float64Array:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3 window functions, output in [0, 1]."""
    center, width = window.center, window.width
    if window.function == "SIGMOID":
        return 0.5 * (1.0 + np.tanh(2.0 * (values - center) / width))
    if window.function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _has_voi_lut(ds: Dataset) -> bool:
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def _apply_voi_lut_sequence(values: npt.NDArray[Any], ds: Dataset) -> Float64Array | None:
    """First VOI LUT Sequence item, output scaled to [0, 1]; None when it is unusable.

    The output range is 2**n - 1 with n the bits per entry of the LUT
    Descriptor, lowered to the bits the LUT data actually use (at least 8):
    some writers declare 16 bits for a 12-bit table.
    """
    try:
        output = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0))
        declared = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except Exception as exc:  # malformed LUT items raise assorted errors
        logger.warning("ignoring unusable VOI LUT Sequence", extra={"error": type(exc).__name__})
        return None
    used = max(8, int(output.max()).bit_length())
    return output.astype(np.float64) / float((1 << min(declared, used)) - 1)


def _percentile(values: Float64Array, counts: npt.NDArray[np.int64], q: float) -> float:
    """``np.percentile(image, q)`` (linear method) from a histogram of modality values."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    position = q / 100.0 * float(cumulative[-1] - 1)
    low, high = int(np.floor(position)), int(np.ceil(position))
    at_low = values[order[np.searchsorted(cumulative, low, side="right")]]
    at_high = values[order[np.searchsorted(cumulative, high, side="right")]]
    return float(at_low + (at_high - at_low) * (position - low))


def _robust_window(
    values: Float64Array, counts: npt.NDArray[np.int64]
) -> tuple[Float64Array, OwnWindow | None]:
    """Map the 0.5-99.5 % percentile range of the image's modality values onto [0, 1]; and
    that mapping as a window (None for an image of one value, shown black)."""
    low = _percentile(values, counts, LOW_PERCENTILE)
    high = _percentile(values, counts, HIGH_PERCENTILE)
    if high <= low:
        present = values[counts > 0]
        low, high = float(present.min()), float(present.max())
    if high <= low:
        return np.zeros_like(values), None
    window = OwnWindow((low + high) / 2, high - low)
    return np.clip((values - low) / (high - low), 0.0, 1.0), window


def shown_inverted(ds: Dataset, photometric: str) -> bool:
    """MONOCHROME1 or Presentation LUT Shape INVERSE: invert once (the node's display, and
    the Presentation LUT Shape of its presentation states)."""
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _voi(
    ds: Dataset, values: npt.NDArray[Any], index: IntArray
) -> tuple[Float64Array, OwnWindow | None]:
    """VOI LUT Sequence, else window, else robust percentile window, into [0, 1]; and the
    window the node chose itself when the header had none it could use."""
    if _has_voi_lut(ds):
        display = _apply_voi_lut_sequence(values, ds)
        if display is not None:
            return display, None
    window = _window(ds)
    if window is not None:
        return _apply_window(values.astype(np.float64), window), None
    counts = _histogram(index, values.size)
    return _robust_window(values.astype(np.float64), counts)


def _grey_table(
    ds: Dataset, photometric: str, index: IntArray, domain: IntArray
) -> tuple[FloatArray, OwnWindow | None]:
    """Display value in [0, 1] of every stored value (Modality, VOI, presentation), and the
    node's own window (:func:`_voi`)."""
    display, own = _voi(ds, _modality_values(domain, ds), index)
    if shown_inverted(ds, photometric):
        display = 1.0 - display
    table: FloatArray = display.astype(np.float32)
    return table, own


# --------------------------------------------------------------------------- images


def _prepare_grey(
    ds: Dataset, pixels: npt.NDArray[Any], photometric: str
) -> tuple[FloatArray, OwnWindow | None]:
    if pixels.ndim != 2 or pixels.dtype.kind not in "iu":
        raise UnsupportedImageError(f"unexpected decoded pixel shape {pixels.shape}")
    pixels = _clear_unused_bits(pixels, int(ds.BitsStored))
    index = _table_index(pixels)
    table, own = _grey_table(ds, photometric, index, _stored_domain(pixels.dtype))
    result: FloatArray = table[index]
    return result, own


def _prepare_colour(ds: Dataset, pixels: npt.NDArray[Any]) -> FloatArray:
    """Luminance of RGB pixels (BT.601 weights), scaled by the largest stored value."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise UnsupportedImageError(f"unexpected decoded colour shape {pixels.shape}")
    scale = np.float32(1.0 / ((1 << int(ds.BitsStored)) - 1))
    grey = np.zeros(pixels.shape[:2], dtype=np.float32)
    for channel, weight in enumerate(_LUMA):
        grey += pixels[..., channel].astype(np.float32) * np.float32(weight * scale)
    result: FloatArray = np.clip(grey, 0.0, 1.0, out=grey)
    return result


def _row_direction(ds: Dataset) -> str:
    """The first value of Patient Orientation, upper case (``""`` when absent)."""
    orientation = ds.get("PatientOrientation")
    if not orientation:
        return ""
    first = orientation if isinstance(orientation, str) else orientation[0]
    return str(first or "").strip().upper()


def _laterality(ds: Dataset) -> str | None:
    """``L`` or ``R`` from Image Laterality, else (series) Laterality, else None."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword) or "").strip().upper()
        if value:
            return value if value in {"L", "R"} else None
    return None


def prepare_dataset(ds: Dataset, source: str = "") -> PreparedImage:
    """Decode a single-frame radiograph and apply its grey-scale pipeline.

    Parameters
    ----------
    ds:
        A DICOM dataset with Pixel Data, in any transfer syntax pydicom and
        the installed plugins decode. It is not modified.
    source:
        A short description for logs (never patient data); the SOP Instance
        UID when empty.

    Returns
    -------
    PreparedImage
        ``float32`` pixels in [0, 1], 0 black and 1 white, and the laterality.

    Raises
    ------
    UnsupportedImageError
        For multi-frame, palette colour, float or unusually allocated pixel
        data: images the node skips.
    ImagingError
        When Pixel Data is missing or cannot be decoded, or a LUT is invalid.
    """
    photometric = _check_supported(ds)
    pixels = _decode(ds)
    own: OwnWindow | None = None
    if photometric in MONOCHROME:
        prepared, own = _prepare_grey(ds, pixels, photometric)
    else:
        prepared = _prepare_colour(ds, pixels)
    _check_not_blank(prepared)
    return PreparedImage(
        pixels=prepared,
        laterality=_laterality(ds),
        source=source or str(ds.get("SOPInstanceUID", "")),
        row_direction=_row_direction(ds),
        own_window=own,
    )


# --------------------------------------------------------------------------- files


PICTURE_SUFFIXES = frozenset({".png", ".webp", ".jpg", ".jpeg", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage: a DICOMDIR, the index of a CD or folder export."""
_DICOM_EVIDENCE = ("SOPClassUID", "PixelData", "Rows", "StudyInstanceUID")


def has_dicom_marker(path: Path) -> bool:
    """The ``DICM`` marker after the 128-byte preamble (PS3.10)."""
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def read_dicom(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file, with or without the PS3.10 preamble and meta header.

    A file without the ``DICM`` marker (an older or a bare-dataset export) is
    read as a dataset when it has what an image has (a SOP Class UID, Pixel
    Data, Rows or a Study Instance UID); anything else is not DICOM. A
    DICOMDIR is named as such: it indexes images and holds none.

    Raises
    ------
    ImagingError
        Naming what the file is instead: empty, not DICOM, a DICOMDIR,
        unreadable.
    """
    try:
        if path.stat().st_size == 0:
            raise ImagingError("an empty file (0 bytes)")
        marked = has_dicom_marker(path)
        dataset = pydicom.dcmread(path, force=not marked, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImagingError(f"not a readable DICOM file ({type(exc).__name__})") from exc
    except OSError as exc:
        raise ImagingError(f"the file cannot be read ({type(exc).__name__})") from exc
    meta = getattr(dataset, "file_meta", None)
    sop_class = str(dataset.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_DIRECTORY or "DirectoryRecordSequence" in dataset:
        raise ImagingError("a DICOMDIR (the index of an export; it holds no image)")
    if not marked and not any(keyword in dataset for keyword in _DICOM_EVIDENCE):
        raise ImagingError("not a DICOM file (no DICM marker and no DICOM image attributes)")
    return dataset


def _is_dicom_file(path: Path) -> bool:
    """A DICOM name (``.dcm``, ``.dicom``) or the ``DICM`` marker."""
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_marker(path)


def _picture_pixels(image: Image.Image) -> FloatArray:
    """Grey ``float32`` in [0, 1] from an 8-bit or 16-bit Pillow image.

    An 8-bit picture is divided by 255. A 16-bit picture is divided by ``2**n - 1``,
    ``n`` being the bit length of this image's largest value, clamped to 8..16: a
    PNG does not say how many bits are in use (its ``sBIT`` chunk is not read), so
    they are inferred per image. A 12-bit radiograph exported as 16-bit PNG whose
    brightest pixel is 4095 (or anything from 2048) is divided by 4095 and does not
    stay near black; but an export of the same image whose brightest pixel is below
    2048 (a crop, say) is divided by 2047, twice as bright. A DICOM file says its
    bits (Bits Stored, which only clears the unused high bits), and a grey DICOM
    image is then shown through its Modality LUT and VOI (VOI LUT, window, else the
    0.5-99.5 % percentile window: :func:`prepare_dataset`), not divided by its range,
    so a PNG export matches what the node makes of its DICOM original only when the
    export applied the same window.
    """
    if image.mode in {"I;16", "I;16L", "I;16B", "I;16N", "I"}:
        values = np.asarray(image).astype(np.float32)
        bits = min(16, max(8, int(values.max(initial=0.0)).bit_length()))
        return np.clip(values / np.float32((1 << bits) - 1), 0.0, 1.0, out=values)
    if image.mode == "F":
        raise UnsupportedImageError("floating-point pictures are not supported")
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    return grey / np.float32(255.0)


def _read_picture(path: Path) -> PreparedImage:
    """PNG, WebP, JPEG or TIFF via Pillow, as grey (colour via BT.601 luma)."""
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise UnsupportedImageError("multi-frame pictures are not supported")
            oriented = ImageOps.exif_transpose(image)
            pixels = _picture_pixels(oriented)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImagingError(f"not a readable picture ({type(exc).__name__})") from exc
    return PreparedImage(pixels=pixels, laterality=None, source=path.name)


def read_image_file(path: Path) -> PreparedImage:
    """Read a DICOM file or a PNG/WebP/JPEG/TIFF picture as a prepared image.

    DICOM files (a DICOM name, the ``DICM`` marker, or, for any other name
    that is not a picture's, a dataset :func:`read_dicom` recognises: a
    file named by its UID, ``IM0001``) go through :func:`prepare_dataset`;
    pictures are read with Pillow as 8-bit or 16-bit grey and scaled to [0, 1].

    Parameters
    ----------
    path:
        The file to read.

    Returns
    -------
    PreparedImage
        With ``source`` set to the file name.

    Raises
    ------
    UnsupportedImageError
        For images the node does not process.
    ImagingError
        When the file cannot be read or decoded, saying what it is instead.
    """
    path = Path(path)
    try:
        is_dicom = _is_dicom_file(path)
    except OSError as exc:
        raise ImagingError(f"image file cannot be opened ({type(exc).__name__})") from exc
    if is_dicom:
        return prepare_dataset(read_dicom(path), source=path.name)
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return _read_picture(path)
    try:  # no suffix, or another one: a DICOM export's, else a picture's
        dataset = read_dicom(path)
    except ImagingError as not_dicom:
        try:
            return _read_picture(path)
        except UnsupportedImageError:
            raise
        except ImagingError:
            raise ImagingError(f"neither a picture nor DICOM: {not_dicom}") from not_dicom
    return prepare_dataset(dataset, source=path.name)
