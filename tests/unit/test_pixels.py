"""Pixel preparation: LUTs, inversion, bit depths, colour, rejections, picture files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import JPEGBaseline8Bit

from dicomnode.errors import ImagingError, UnsupportedImageError
from dicomnode.imaging.pixels import prepare_dataset, read_image_file
from dicomnode.testing.images import make_radiograph, write_dataset

SMALL: dict[str, Any] = {"rows": 96, "columns": 80}


def prepared(ds: Dataset | None = None, **kwargs: Any) -> npt.NDArray[np.float32]:
    """Prepared pixels of ``ds`` or of ``make_radiograph(**SMALL, **kwargs)``."""
    dataset = ds if ds is not None else make_radiograph(**SMALL, **kwargs)
    return prepare_dataset(dataset).pixels


def without_window(**kwargs: Any) -> Dataset:
    ds = make_radiograph(**SMALL, **kwargs)
    del ds.WindowCenter, ds.WindowWidth
    return ds


def linear_window(values: npt.NDArray[Any], center: float, width: float) -> npt.NDArray[Any]:
    """PS3.3 C.11.2.1.2.1 reference, in [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def test_output_is_float32_in_unit_range_with_bright_bone() -> None:
    pixels = prepared()
    assert pixels.dtype == np.float32
    assert pixels.shape == (96, 80)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels[10, 40] > pixels[10, 2] + 0.3  # bone (centre column) brighter than air


def test_monochrome1_displays_like_monochrome2() -> None:
    np.testing.assert_array_equal(prepared(photometric="MONOCHROME1"), prepared())


def test_monochrome1_with_percentile_window_matches() -> None:
    mono1 = prepared(without_window(photometric="MONOCHROME1"))
    mono2 = prepared(without_window())
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)


def test_dx_monochrome1_carries_inverse_and_is_inverted_once() -> None:
    ds = make_radiograph(**SMALL, photometric="MONOCHROME1")
    assert ds.PresentationLUTShape == "INVERSE"
    np.testing.assert_array_equal(prepared(ds), prepared())


def test_presentation_lut_shape_inverse_inverts() -> None:
    inverse = make_radiograph(**SMALL, presentation_inverse=True)
    np.testing.assert_array_equal(prepared(inverse), prepared())
    inverse.PresentationLUTShape = "IDENTITY"
    np.testing.assert_allclose(prepared(inverse), 1.0 - prepared(), atol=1e-6)


def test_rescale_slope_intercept_applied_before_window() -> None:
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4000.0
    ds = make_radiograph(**SMALL, rescale=(slope, intercept), window=(center, width))
    stored = ds.pixel_array.astype(np.float64)
    expected = linear_window(stored * slope + intercept, center, width)
    np.testing.assert_allclose(prepared(ds), expected, atol=1e-6)


def test_default_window_follows_rescale() -> None:
    np.testing.assert_array_equal(prepared(rescale=(0.5, 100.0), modality="CR"), prepared())


def test_modality_lut_sequence_is_applied() -> None:
    ds = make_radiograph(**SMALL)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = list(range(4095, -1, -1))  # an inverting table
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept
    np.testing.assert_allclose(prepared(ds), 1.0 - prepared(), atol=1e-6)


@pytest.mark.parametrize("value", [None, b"", b"junk"])
def test_unreadable_rescale_means_identity(value: bytes | None) -> None:
    ds = make_radiograph(**SMALL)
    for tag in (0x00281052, 0x00281053):  # intercept, slope, as read from a file
        ds[tag] = RawDataElement(Tag(tag), "DS", len(value or b""), value, 0, False, True)
    np.testing.assert_array_equal(prepared(ds), prepared())


def test_modality_lut_sequence_with_ow_data_and_offset() -> None:
    ds = make_radiograph(**SMALL, bits_stored=8, window=(100.5, 200.0))
    item = Dataset()
    item.LUTDescriptor = [200, 10, 16]
    item.add_new(0x00283006, "OW", np.arange(200, dtype="<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    stored = ds.pixel_array.astype(np.float64)
    expected = linear_window(np.clip(stored - 10, 0, 199), 100.5, 200.0)
    np.testing.assert_allclose(prepared(ds), expected, atol=1e-6)


def test_unusable_voi_lut_falls_back_to_window() -> None:
    ds = make_radiograph(**SMALL, voi_lut=True)
    ds.VOILUTSequence[0].LUTDescriptor = [4096, 0, 9]  # 9 bits per entry is not allowed
    ds.WindowCenter, ds.WindowWidth = 2048.0, 4096.0
    np.testing.assert_array_equal(prepared(ds), prepared())


def test_voi_lut_matches_equivalent_window() -> None:
    window = (1800.0, 1500.0)
    with_lut = prepared(voi_lut=True, window=window)
    with_window = prepared(window=window)
    np.testing.assert_allclose(with_lut, with_window, atol=2.0 / 65535.0)
    assert np.ptp(with_window) > 0.5


def test_signed_voi_lut_matches_window() -> None:
    np.testing.assert_allclose(
        prepared(signed=True, voi_lut=True), prepared(signed=True), atol=2.0 / 65535.0
    )


def test_first_of_several_windows_is_used() -> None:
    ds = make_radiograph(**SMALL)
    ds.WindowCenter = [1000.0, 3000.0]
    ds.WindowWidth = [800.0, 200.0]
    expected = linear_window(ds.pixel_array.astype(np.float64), 1000.0, 800.0)
    np.testing.assert_allclose(prepared(ds), expected, atol=1e-6)


def test_linear_exact_and_sigmoid_windows() -> None:
    ds = make_radiograph(**SMALL, window=(2000.0, 1000.0))
    values = ds.pixel_array.astype(np.float64)
    ds.VOILUTFunction = "LINEAR_EXACT"
    exact = np.clip((values - 2000.0) / 1000.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(prepared(ds), exact, atol=1e-6)
    ds.VOILUTFunction = "SIGMOID"
    sigmoid = 1.0 / (1.0 + np.exp(-4.0 * (values - 2000.0) / 1000.0))
    np.testing.assert_allclose(prepared(ds), sigmoid, atol=1e-6)


def test_percentile_window_without_voi() -> None:
    ds = without_window()
    values = ds.pixel_array.astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(prepared(ds), expected, atol=1e-6)


def test_invalid_window_falls_back_to_percentiles() -> None:
    ds = make_radiograph(**SMALL)
    ds.WindowWidth = 0
    np.testing.assert_allclose(prepared(ds), prepared(without_window()), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bit_depths_agree(bits: int) -> None:
    np.testing.assert_allclose(prepared(bits_stored=bits), prepared(bits_stored=16), atol=0.0025)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_signed_matches_unsigned(bits: int) -> None:
    ds = make_radiograph(**SMALL, bits_stored=bits, signed=True)
    assert ds.pixel_array.min() < 0
    np.testing.assert_allclose(prepared(ds), prepared(bits_stored=bits), atol=1e-6)
    signed = prepared(without_window(bits_stored=bits, signed=True))
    np.testing.assert_allclose(signed, prepared(without_window(bits_stored=bits)), atol=1e-6)


def test_bits_above_bits_stored_are_ignored() -> None:
    ds = make_radiograph(**SMALL)
    pixels = ds.pixel_array.copy()
    pixels[::3] |= 0x8000  # an overlay in the unused high bit
    ds.PixelData = pixels.tobytes()
    np.testing.assert_array_equal(prepared(ds), prepared())


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_becomes_luminance(photometric: str) -> None:
    colour = prepared(photometric=photometric, bits_stored=8)
    grey = prepared(bits_stored=8)
    np.testing.assert_allclose(colour, grey, atol=1e-6)


def test_rgb_luminance_weights() -> None:
    ds = make_radiograph(rows=16, columns=16, photometric="RGB", bits_stored=8)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 0
    rgb[0, 0] = 0  # one black pixel: an all-red picture is blank
    ds.PixelData = rgb.tobytes()
    grey = prepared(ds)
    assert grey[0, 0] == 0.0
    np.testing.assert_allclose(grey[1:], 0.299, atol=1e-6)


@pytest.mark.parametrize(("rows", "columns"), [(8, 8), (3, 4000), (4000, 15)])
def test_an_image_too_small_to_analyse_is_unsupported(rows: int, columns: int) -> None:
    """It failed later, drawing its overlay, so the node's job died instead of the image
    being reported "Not assessed" with the reason."""
    with pytest.raises(UnsupportedImageError, match=f"{rows} x {columns} pixels, too small"):
        prepared(make_radiograph(rows=rows, columns=columns))
    assert prepared(make_radiograph(rows=16, columns=4000)).shape == (16, 4000)


def test_a_blank_image_is_unsupported() -> None:
    """A model grades a blank image too (hand-ra: "Normal, probability 50%"): the reader
    is told it was not assessed, and why."""
    blank = make_radiograph(**SMALL)
    blank.PixelData = bytes(len(blank.PixelData))
    with pytest.raises(UnsupportedImageError, match="blank"):
        prepared(blank)
    constant = without_window()  # no window either: the percentile window has no span
    constant.PixelData = np.full((96, 80), 7, dtype=np.uint16).tobytes()
    with pytest.raises(UnsupportedImageError, match="blank"):
        prepared(constant)
    saturated = make_radiograph(**SMALL)
    saturated.WindowCenter, saturated.WindowWidth = -10_000, 10  # every pixel above the window
    with pytest.raises(UnsupportedImageError, match="blank"):
        prepared(saturated)
    faint = make_radiograph(**SMALL)
    values = np.zeros((faint.Rows, faint.Columns), dtype=np.uint16)
    values[0, 0] = 4095  # one bright pixel is something to see
    faint.PixelData = values.tobytes()
    del faint.WindowCenter, faint.WindowWidth
    assert prepared(faint).max() == 1.0


@pytest.mark.parametrize(
    ("stored", "high", "reason"),
    [
        (20, 19, "20 bits stored in 16 bits allocated"),
        (0, None, "0 bits stored in 16 bits allocated"),
        (12, 15, "High Bit 15 with 12 bits stored"),
    ],
)
def test_bits_stored_that_do_not_fit_are_unsupported(
    stored: int, high: int | None, reason: str
) -> None:
    """Bits Stored 20 in 16 allocated failed at decoding, a dead job named only "the
    analysis failed"; the reader is now told what is wrong with the image."""
    ds = make_radiograph(**SMALL)
    ds.BitsStored = stored
    if high is None:
        del ds.HighBit
    else:
        ds.HighBit = high
    with pytest.raises(UnsupportedImageError, match=reason):
        prepared(ds)


def test_an_image_whose_presentation_intent_is_for_processing_is_unsupported() -> None:
    """Routing skips the DX For Processing SOP class; a For Presentation object whose header
    still says FOR PROCESSING holds raw detector data too."""
    ds = make_radiograph(**SMALL)
    ds.PresentationIntentType = "FOR PROCESSING"
    with pytest.raises(UnsupportedImageError, match="FOR PROCESSING"):
        prepared(ds)


def test_multi_frame_is_unsupported() -> None:
    with pytest.raises(UnsupportedImageError, match="multi-frame"):
        prepared(frames=3)


def test_palette_colour_is_unsupported() -> None:
    ds = make_radiograph(**SMALL, bits_stored=8)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedImageError, match="PALETTE COLOR"):
        prepared(ds)


def test_missing_pixel_data_is_an_imaging_error() -> None:
    ds = make_radiograph(**SMALL)
    del ds.PixelData
    with pytest.raises(ImagingError, match="no Pixel Data") as caught:
        prepared(ds)
    assert not isinstance(caught.value, UnsupportedImageError)


@pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data")
def test_undecodable_pixel_data_is_an_imaging_error_without_patient_data() -> None:
    ds = make_radiograph(**SMALL, bits_stored=8, patient_name="Secret^Name", patient_id="PID9")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # native bytes labelled as JPEG
    with pytest.raises(ImagingError, match="could not be decoded") as caught:
        prepared(ds)
    assert "Secret" not in str(caught.value) and "PID9" not in str(caught.value)


def test_dataset_is_not_modified() -> None:
    ds = make_radiograph(**SMALL, voi_lut=True, rescale=(1.0, 0.0))
    before = ds.to_json_dict()
    prepared(ds)
    assert ds.to_json_dict() == before


def test_dataset_without_file_meta_uses_its_read_encoding(tmp_path: Path) -> None:
    path = write_dataset(make_radiograph(**SMALL), tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta = FileMetaDataset()
    np.testing.assert_array_equal(prepared(ds), prepared())


@pytest.mark.parametrize(
    ("image", "series", "expected"),
    [("R", None, "R"), (None, "L", "L"), ("U", "L", None), (None, None, None)],
)
def test_laterality(image: str | None, series: str | None, expected: str | None) -> None:
    ds = make_radiograph(**SMALL)
    del ds.ImageLaterality
    if image is not None:
        ds.ImageLaterality = image
    if series is not None:
        ds.Laterality = series
    assert prepare_dataset(ds).laterality == expected


def test_source_defaults_to_sop_instance_uid() -> None:
    ds = make_radiograph(**SMALL, sop_uid="1.2.3.4")
    assert prepare_dataset(ds).source == "1.2.3.4"
    assert prepare_dataset(ds, source="x.dcm").source == "x.dcm"


# ----------------------------------------------------------------------------- files


def _ramp(dtype: str) -> npt.NDArray[Any]:
    top = np.iinfo(dtype).max
    return (np.linspace(0, top, 64 * 48).reshape(64, 48)).round().astype(dtype)


def test_png_8_and_16_bit(tmp_path: Path) -> None:
    for dtype in ("uint8", "uint16"):
        ramp = _ramp(dtype)
        path = tmp_path / f"{dtype}.png"
        Image.fromarray(ramp).save(path)
        image = read_image_file(path)
        expected = ramp / np.iinfo(dtype).max
        np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
        assert image.pixels.dtype == np.float32 and image.source == path.name


def test_a_12_bit_radiograph_in_a_16_bit_png_spans_the_whole_range(tmp_path: Path) -> None:
    twelve_bit = np.linspace(0, 4095, 64 * 48).reshape(64, 48).astype(np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "export.png")
    pixels = read_image_file(tmp_path / "export.png").pixels
    np.testing.assert_allclose(pixels, twelve_bit / 4095.0, atol=1e-6)
    assert pixels.max() == 1.0


def test_webp_jpeg_tiff_and_colour(tmp_path: Path) -> None:
    ramp, deep = _ramp("uint8"), _ramp("uint16")
    Image.fromarray(ramp).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray(ramp).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(deep).save(tmp_path / "a.tif")
    Image.fromarray(np.stack([ramp] * 3, axis=-1)).save(tmp_path / "rgb.png")
    cases = {
        "a.webp": (ramp / 255.0, 1e-6),
        "a.jpg": (ramp / 255.0, 0.03),
        "a.tif": (deep / 65535.0, 1e-6),
        "rgb.png": (ramp / 255.0, 1e-6),
    }
    for name, (expected, atol) in cases.items():
        pixels = read_image_file(tmp_path / name).pixels
        np.testing.assert_allclose(pixels, expected, atol=atol, err_msg=name)


def test_dicom_by_extension_and_by_preamble(tmp_path: Path) -> None:
    ds = make_radiograph(**SMALL, laterality="L")
    by_name = read_image_file(write_dataset(ds, tmp_path / "image.dcm"))
    by_marker = read_image_file(write_dataset(ds, tmp_path / "IM0001"))
    np.testing.assert_array_equal(by_name.pixels, prepared())
    np.testing.assert_array_equal(by_marker.pixels, by_name.pixels)
    assert by_marker.laterality == "L" and by_marker.source == "IM0001"


def test_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    with pytest.raises(ImagingError, match="neither a picture nor DICOM"):
        read_image_file(junk)
    with pytest.raises(ImagingError):
        read_image_file(tmp_path / "missing.png")
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 16)
    with pytest.raises(ImagingError):
        read_image_file(fake)


@pytest.mark.parametrize(("raised", "lasting"), [(ValueError, True), (MemoryError, False)])
def test_an_undecodable_image_is_not_retried_but_a_worker_short_of_memory_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: type[Exception], lasting: bool
) -> None:
    """Bytes that do not decode fail the same way every time; memory running out is the
    worker's state, not the file's."""
    from dicomnode import pipeline
    from dicomnode.imaging import pixels
    from dicomnode.testing.images import make_radiograph, write_dataset

    path = write_dataset(make_radiograph(body_part="KNEE", rows=32, columns=32), tmp_path / "k.dcm")

    def fails(*_: object, **__: object) -> None:
        raise raised("decoder")

    monkeypatch.setattr(pixels, "pixel_array", fails)
    prepared = pipeline.read_and_prepare(path)
    assert prepared.error and prepared.lasting is lasting
