"""Round trips of the encoders: render, SC and SR written, read back and validated."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode import uids
from dicomnode.encode import (
    SrImageItem,
    encode_pr,
    encode_sc,
    encode_sr,
    overlay_lines,
    render_overlay,
)
from dicomnode.encode import codes as dn
from dicomnode.encode.header import conformant_header
from dicomnode.encode.render import (
    HEAT_FULL,
    HEAT_THRESHOLD,
    MAX_ALPHA,
    SYNTHETIC_NOTICE,
    TURBO,
    heat_image,
    percent,
    region_labels,
)
from dicomnode.encode.sc import compress_jpeg, series_description
from dicomnode.errors import EncodeError
from dicomnode.pipeline import Analysed, Prepared
from dicomnode.pipeline import make_sc as pipeline_make_sc
from dicomnode.pipeline import make_sr as pipeline_make_sr
from dicomnode.testing.validate import dciodvfy_errors, dciodvfy_warnings
from dicomnode.values import (
    BodyPart,
    CodedClass,
    Finding,
    ImageResult,
    ModelIdentity,
    Placement,
    PreparedImage,
    Region,
)

ROWS, COLUMNS = 256, 300
PEAK = (200, 110)  # (column, row)
DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"
DCMDUMP = "/usr/bin/dcmdump"

needs_dicom3tools = pytest.mark.skipif(
    not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) is not installed"
)
needs_dcmtk = pytest.mark.skipif(
    not (shutil.which(DSRDUMP) and shutil.which(DCMDUMP)), reason="dcmtk is not installed"
)


# Builders ------------------------------------------------------------------


def make_source(
    *,
    laterality: str | None = "R",
    body_part: str = "KNEE",
    study_uid: str | None = None,
    orientation: bool = True,
) -> Dataset:
    """A DX For Presentation header (no pixel data), as read with stop_before_pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Knee"
    ds.PatientID = "DN-0001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-1"
    ds.StudyID = "1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.Modality = "DX"
    ds.Manufacturer = "Phantom Imaging"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    if laterality:
        ds.ImageLaterality = laterality
    if orientation:
        ds.PatientOrientation = ["P", "F"]
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def make_classes(count: int) -> tuple[CodedClass, ...]:
    if count == 2:
        names = ("normal", "abnormal")
        return tuple(
            CodedClass(i, name, name.upper(), dn.PRIVATE_SCHEME, f"{name.capitalize()} knee")
            for i, name in enumerate(names)
        )
    return tuple(
        CodedClass(i, f"KL{i}", f"KL{i}", dn.PRIVATE_SCHEME, f"KL grade {i}") for i in range(count)
    )


def make_probabilities(count: int, predicted: int) -> tuple[float, ...]:
    rest = 0.2 / (count - 1)
    return tuple(0.8 if i == predicted else rest for i in range(count))


def make_heatmap(
    region: Region, peak: tuple[int, int], rows: int, columns: int
) -> npt.NDArray[np.float32]:
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    sigma = min(rows, columns) / 12
    distance = (xx - peak[0]) ** 2 + (yy - peak[1]) ** 2
    heat: npt.NDArray[np.float32] = np.exp(-distance / (2 * sigma**2)).astype(np.float32)
    outside = np.ones_like(heat, dtype=bool)
    outside[region.y0 : region.y1, region.x0 : region.x1] = False
    heat[outside] = 0.0
    return heat


def make_result(
    classes: int = 5,
    *,
    synthetic: bool = True,
    region: Region | None = None,
    uncertain: bool = False,
    laterality: str | None = "R",
    rows: int = ROWS,
    columns: int = COLUMNS,
    peak: tuple[int, int] = PEAK,
    note: str = "",
) -> ImageResult:
    coded = make_classes(classes)
    region = region or Region(0, 0, columns, rows)
    predicted = coded[min(2, classes - 1)]
    finding = Finding(
        predicted=predicted,
        probabilities=make_probabilities(classes, predicted.index),
        heatmap=make_heatmap(region, peak, rows, columns),
        peak=(float(peak[0]), float(peak[1])),
        region=region,
        laterality=laterality,
        localisation_uncertain=uncertain,
        localised=region != Region(0, 0, columns, rows),  # a region given: a localiser's
        uncertainty=("weak joint signal (0.30)",) if uncertain else (),
    )
    model = ModelIdentity(
        name="knee-kl",
        version="1.0.0",
        sha256="0123456789abcdef" * 4,
        synthetic_training_data=synthetic,
        explanation="LayerCAM at blocks.2+blocks.4",
        reader_note=note,
        explanation_method="layercam",
    )
    return ImageResult(model=model, classes=coded, findings=(finding,))


def make_image(rows: int = ROWS, columns: int = COLUMNS) -> PreparedImage:
    """A smooth grey ramp so every pixel has a known grey level."""
    ramp = np.linspace(0.2, 0.8, columns, dtype=np.float32)
    return PreparedImage(pixels=np.tile(ramp, (rows, 1)), laterality="R", source="test")


def make_sc(source: Dataset, result: ImageResult, jpeg_quality: int = 0) -> Dataset:
    rgb = render_overlay(make_image(), result)
    return encode_sc(
        source,
        rgb,
        result,
        Placement(generate_uid(), generate_uid(), 901, 1, "0.1.0"),
        jpeg_quality=jpeg_quality,
    )


def make_pr(source: Dataset, result: ImageResult) -> Dataset:
    return encode_pr(
        source,
        result,
        (ROWS, COLUMNS),
        Placement("1.2.3.4.905", "1.2.3.4.905.1", 905, 2, "0.1.0"),
    )


def make_sr(
    items: list[SrImageItem], predecessor: Dataset | None = None, uid_root: str = "1.2.3."
) -> Dataset:
    return encode_sr(
        items,
        Placement(generate_uid(), generate_uid(), 902, 1, "0.1.0"),
        predecessor=predecessor,
        uid_root=uid_root,
    )


# Validators ----------------------------------------------------------------


def dump(tool: str, path: Path) -> str:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def save(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def walk(items: pydicom.Sequence) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def text_values(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in walk(sr.ContentSequence) if "TextValue" in item]


def items_named(sr: Dataset, concept: hd.sr.CodedConcept) -> list[Dataset]:
    return [
        item
        for item in walk(sr.ContentSequence)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == concept.value
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == concept.scheme_designator
    ]


# Render --------------------------------------------------------------------


def test_render_has_heat_colours_where_heat_is_high_and_grey_elsewhere() -> None:
    image, result = make_image(), make_result()
    rgb = render_overlay(image, result)
    band = rgb.shape[0] - ROWS
    assert rgb.dtype == np.uint8
    assert band > 0 and rgb.shape == (band + ROWS, COLUMNS, 3)
    picture = rgb[band:]
    at_peak = picture[PEAK[1] + 6, PEAK[0] + 6].astype(int)  # next to the peak cross
    assert at_peak.max() - at_peak.min() > 60
    column, row = 20, ROWS // 2  # far from heat
    grey = round(float(image.pixels[row, column]) * 255)
    assert picture[row, column].tolist() == [grey, grey, grey]


def test_render_writes_its_text_in_a_band_above_the_image_never_over_it() -> None:
    """Burned-in text over the anatomy can hide a lesion, or the model's own peak."""
    image, result = make_image(), make_result(synthetic=True)
    rgb = render_overlay(image, result)
    band = rgb.shape[0] - ROWS
    text = rgb[:band].astype(int)
    bright = (text.min(axis=2) > 200).sum()
    dark = (text.max(axis=2) < 60).sum()
    assert bright > 50 and dark > bright
    # Where the banner used to be drawn, the image is the image: grey, no text.
    corner = rgb[band : band + 60, :150].astype(int)
    expected = np.floor(image.pixels[:60, :150].astype(np.float64) * 255 + 0.5).astype(int)
    assert np.array_equal(corner, np.repeat(expected[..., None], 3, axis=2))


def test_render_synthetic_banner_only_for_synthetic_models() -> None:
    image = make_image()
    synthetic = render_overlay(image, make_result(synthetic=True))
    real = render_overlay(image, make_result(synthetic=False))

    def orange(rgb: np.ndarray) -> int:
        r, g, b = (rgb[..., i].astype(int) for i in range(3))
        return int(((r > 200) & (g > 120) & (g < 210) & (b < 60)).sum())

    assert SYNTHETIC_NOTICE in overlay_lines(make_result(synthetic=True))
    assert "not for diagnostic use" in SYNTHETIC_NOTICE
    assert SYNTHETIC_NOTICE not in overlay_lines(make_result(synthetic=False))
    # (the colour scale has orange of its own: compare the two bands)
    synthetic_band, real_band = synthetic[: synthetic.shape[0] - ROWS], real[: real.shape[0] - ROWS]
    assert orange(synthetic_band) > orange(real_band) + 20


def test_render_lines_name_finding_and_model() -> None:
    result = make_result()
    lines = overlay_lines(result)
    assert lines[0] == "R: KL grade 2, probability 80%"
    assert lines[1] == "Colour: evidence for KL grade 2"  # what the heat shows
    assert "knee-kl 1.0.0" in lines[2]
    assert "AI result, requires review by a radiologist" in lines


def test_render_lines_name_a_close_runner_up_and_why_localisation_is_uncertain() -> None:
    close = make_result(uncertain=True, region=Region(40, 60, 280, 240))
    finding = close.findings[0]
    probabilities = (0.05, 0.40, 0.42, 0.10, 0.03)
    finding = replace(finding, probabilities=probabilities, uncertainty=("box leaves the image",))
    close = replace(close, findings=(finding,))
    assert overlay_lines(close)[0] == (
        "R: KL grade 2, probability 42% (next: KL grade 1 40%); "
        "localisation uncertain: box leaves the image"
    )
    shown = [percent(p) for p in (0.9999986, 0.004, 0.0, 1.0, 0.715, 0.125, 0.005, 0.995)]
    assert shown == [">99%", "<1%", "0%", "100%", "72%", "13%", "1%", ">99%"]


def test_two_knees_are_labelled_by_side_or_number_on_their_boxes_and_lines() -> None:
    image = make_image()
    left_box, right_box = Region(10, 60, 130, 180), Region(160, 60, 280, 180)
    one = make_result(region=left_box, laterality="R", peak=(70, 120)).findings[0]
    two = make_result(region=right_box, laterality="L", peak=(220, 120)).findings[0]
    both = replace(make_result(), findings=(one, two))
    lines = overlay_lines(both)
    assert lines[0].startswith("R: KL grade 2") and lines[1].startswith("L: KL grade 2")
    assert "each box scaled to its own peak" in lines[2]
    unsided = replace(both, findings=(replace(one, laterality=None), replace(two, laterality=None)))
    assert region_labels(unsided) == ("1", "2")
    assert overlay_lines(unsided)[0].startswith("1: ")
    rgb = render_overlay(image, both)
    band = rgb.shape[0] - ROWS
    top, left = band + left_box.y0, left_box.x0
    label = rgb[top - 30 : top - 1, left : left + 27]  # just above the box, not over it
    r, g, b = (label[..., i].astype(int) for i in range(3))
    assert ((r > 150) & (g > 130) & (b < 60)).sum() > 10  # the side letter


def test_an_image_without_a_finding_says_why_in_orange_without_heat_or_scale() -> None:
    image = make_image()
    result = replace(
        make_result(synthetic=False),
        findings=(),
        not_assessed="No knee joint found on the image: not graded",
    )
    lines = overlay_lines(result)
    assert lines[0] == "No knee joint found on the image: not graded"
    assert not any(line.startswith("Colour") for line in lines)
    rgb = render_overlay(image, result)
    colours = {tuple(c) for c in TURBO.tolist()[1:-1]}
    assert not any(tuple(pixel) in colours for row in rgb.tolist() for pixel in row)
    r, g, b = (rgb[: rgb.shape[0] - ROWS, :, i].astype(int) for i in range(3))
    assert ((r > 200) & (g > 120) & (g < 210) & (b < 60)).sum() > 20


def test_render_outlines_localised_region_only() -> None:
    image = make_image()
    yellow = [255, 230, 0]
    region = Region(40, 60, 280, 240)
    boxed = render_overlay(image, make_result(region=region))
    assert boxed[boxed.shape[0] - ROWS + 150, region.x0].tolist() == yellow
    whole = render_overlay(image, make_result())
    assert not (whole == np.array(yellow, dtype=np.uint8)).all(axis=2).any()


def test_render_draws_the_colour_scale_in_the_band_low_to_high() -> None:
    rgb = render_overlay(make_image(), make_result())
    band = rgb[: rgb.shape[0] - ROWS]
    colours = {tuple(c) for c in TURBO.tolist()}
    counts = [sum(tuple(pixel) in colours for pixel in row) for row in band.tolist()]
    row = band[int(np.argmax(counts))].tolist()
    bar = [tuple(pixel) for pixel in row if tuple(pixel) in colours]
    assert len(bar) >= COLUMNS // 5
    assert bar[0] == tuple(TURBO[0].tolist()) and bar[-1] == tuple(TURBO[255].tolist())


def test_heat_blend_is_the_weighted_mean_of_grey_and_colour() -> None:
    """Every pixel: (grey * (255 - a) + colour * a + 127) // 255, ``a`` the opacity of its
    heat level: none below HEAT_THRESHOLD, rising to MAX_ALPHA at HEAT_FULL."""
    rng = np.random.default_rng(3)
    pixels = rng.random((64, 48), dtype=np.float32)
    heat = rng.random((64, 48), dtype=np.float32)
    heat[:8] = 0.0  # rows without heat stay grey
    rgb = heat_image(pixels, heat).astype(np.int64)

    grey = np.floor(pixels.astype(np.float64) * 255.0 + 0.5).astype(np.int64)
    levels = np.floor(heat.astype(np.float64) * 255.0 + 0.5).astype(np.int64)
    ramp = np.clip((levels / 255.0 - HEAT_THRESHOLD) / (HEAT_FULL - HEAT_THRESHOLD), 0.0, 1.0)
    alpha = np.where(levels / 255.0 >= HEAT_THRESHOLD, np.round(ramp * MAX_ALPHA * 255.0), 0)
    alpha = alpha.astype(np.int64)[..., None]
    expected = grey[..., None] * (255 - alpha) + TURBO[levels].astype(np.int64) * alpha + 127
    expected //= 255
    assert (rgb[:8] == grey[:8, :, None]).all()
    assert (alpha > 0).sum() > 64 * 48 // 4  # the test covers blended pixels
    assert np.array_equal(rgb, expected)


def test_render_rejects_heatmap_of_other_shape() -> None:
    with pytest.raises(EncodeError, match="heatmap shape"):
        render_overlay(make_image(rows=ROWS + 1), make_result())


def test_render_3000_square_keeps_its_size() -> None:
    """A full-size overlay of a large film (its render time is measured by `dicomnode
    bench`, per stage, not here: a timed unit test would fail on a busy machine)."""
    size = 3000
    image = make_image(rows=size, columns=size)
    result = make_result(
        rows=size, columns=size, peak=(1500, 1400), region=Region(500, 500, 2500, 2500)
    )
    rgb = render_overlay(image, result)
    assert rgb.shape[1:] == (size, 3) and size < rgb.shape[0] < size * 1.2
    assert rgb.dtype == np.uint8


# Secondary Capture ---------------------------------------------------------


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(("classes", "synthetic"), [(2, True), (5, False)])
def test_sc_round_trip(tmp_path: Path, classes: int, synthetic: bool) -> None:
    source = make_source()
    result = make_result(classes, synthetic=synthetic)
    rgb = render_overlay(make_image(), result)
    sc = encode_sc(
        source,
        rgb,
        result,
        Placement("1.2.3.4.901", "1.2.3.4.901.1", 901, 3, "0.1.0"),
    )
    path = save(sc, tmp_path / "sc.dcm")

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == ("1.2.3.4.901", "1.2.3.4.901.1")
    assert (back.SeriesNumber, back.InstanceNumber) == (901, 3)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert back[keyword].value == source[keyword].value
    assert list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert back.ConversionType == "WSD"
    assert back.BurnedInAnnotation == "YES"
    assert back.DerivationDescription.startswith("LayerCAM at blocks.2+blocks.4 overlay by knee-kl")
    assert back.PhotometricInterpretation == "RGB"
    assert back.Laterality == "R"
    label = " [synthetic training data]" if synthetic else ""
    assert back.SeriesDescription == "AI overlay R knee-kl 1.0.0" + label
    reference = back.SourceImageSequence[0]
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, rgb)
    assert hd.imread(path).SOPInstanceUID == "1.2.3.4.901.1"

    assert dciodvfy_errors(path) == []
    dump(DCMDUMP, path)


@needs_dicom3tools
@needs_dcmtk
def test_jpeg_sc_is_flagged_lossy_valid_and_close_to_the_overlay(tmp_path: Path) -> None:
    result = make_result(5, synthetic=True)
    rgb = render_overlay(make_image(), result)  # what make_sc renders
    sc = make_sc(make_source(), result, jpeg_quality=90)
    path = save(sc, tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert back.PhotometricInterpretation == "YBR_FULL_422"
    assert back.LossyImageCompression == "01"
    assert back.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(back.LossyImageCompressionRatio) > 5
    assert path.stat().st_size < rgb.nbytes / 5
    decoded = back.pixel_array  # pydicom converts YBR_FULL_422 to RGB
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 3.0
    assert dciodvfy_errors(path) == []
    dump(DCMDUMP, path)
    with pytest.raises(EncodeError, match="quality"):
        compress_jpeg(sc, rgb, 101)


@needs_dicom3tools
@pytest.mark.parametrize("jpeg_quality", [0, 90])
def test_an_overlay_of_a_lossy_source_is_flagged_lossy_with_its_history(
    tmp_path: Path, jpeg_quality: int
) -> None:
    """PS3.3 C.7.6.1.1.5: once 01, never reset. The overlay of a JPEG 2000 lossy radiograph
    said nothing of it when written uncompressed, and only its own JPEG step otherwise."""
    result = make_result(5, synthetic=False)
    lossless = make_sc(make_source(), result, jpeg_quality=jpeg_quality)
    assert ("LossyImageCompression" in lossless) == bool(jpeg_quality)
    source = make_source()
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = "10"
    source.LossyImageCompressionMethod = "ISO_15444_1"
    back = pydicom.dcmread(save(make_sc(source, result, jpeg_quality), tmp_path / "sc.dcm"))
    assert back.LossyImageCompression == "01"
    if jpeg_quality:
        assert list(back.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
        assert float(back.LossyImageCompressionRatio[0]) == 10.0
        assert float(back.LossyImageCompressionRatio[1]) > 5
    else:
        assert back.LossyImageCompressionMethod == "ISO_15444_1"
        assert float(back.LossyImageCompressionRatio) == 10.0
    assert dciodvfy_errors(tmp_path / "sc.dcm") == []


@needs_dicom3tools
@pytest.mark.parametrize(("body_part", "laterality"), [("KNEE", ""), ("SPINE", None)])
def test_sc_of_unknown_side_keeps_laterality_type_2c(
    tmp_path: Path, body_part: str, laterality: str | None
) -> None:
    source = make_source(laterality=None, orientation=False, body_part=body_part)
    path = save(make_sc(source, make_result(laterality=None)), tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    assert back.get("Laterality", None) == laterality  # empty for a paired body part
    assert "PatientOrientation" in back
    assert dciodvfy_errors(path) == []


@needs_dicom3tools
def test_sc_of_two_knees_says_both_sides_in_image_laterality(tmp_path: Path) -> None:
    """Series Laterality allows R or L only; left empty for a bilateral film, dciodvfy warns."""
    source = make_source(laterality=None, orientation=False, body_part="KNEE")
    one = make_result(region=Region(10, 60, 130, 180), laterality="R").findings[0]
    two = make_result(region=Region(160, 60, 280, 180), laterality="L").findings[0]
    path = save(make_sc(source, replace(make_result(), findings=(one, two))), tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    assert back.ImageLaterality == "B" and "Laterality" not in back
    assert dciodvfy_errors(path) == [] and dciodvfy_warnings(path) == []


@needs_dicom3tools
@needs_dcmtk
def test_sr_of_an_image_without_a_knee_says_not_assessed_and_why(tmp_path: Path) -> None:
    source = make_source(laterality="L")
    result = replace(
        make_result(synthetic=False),
        findings=(),
        not_assessed="No knee joint found on the image: not graded",
    )
    sc = make_sc(source, result)
    path = save(make_sr([SrImageItem(source=source, sc=sc, result=result)]), tmp_path / "sr.dcm")
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_planar_roi_measurement_groups() == []  # nothing graded, no region
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == dn.NOT_ASSESSED
    back = pydicom.dcmread(path)
    assert "No knee joint found on the image: not graded" in text_values(back)
    assert items_named(back, dn.PROBABILITY) == []  # no grade, no probabilities
    (finding,) = items_named(back, dn.FINDING)
    assert finding.ConceptCodeSequence[0].CodeValue == "NOTASSESSED"
    assert dciodvfy_errors(path) == []
    dump(DSRDUMP, path)


@needs_dicom3tools
def test_sr_states_the_intended_use_and_leaves_localisation_out_of_whole_image_findings(
    tmp_path: Path,
) -> None:
    source = make_source()
    result = make_result()  # the whole image: nothing was localised
    model = replace(result.model, intended_use="Decision support, not diagnosis.")
    result = replace(result, model=model)
    sr = make_sr([SrImageItem(source=source, sc=make_sc(source, result), result=result)])
    path = save(sr, tmp_path / "sr.dcm")
    (intended,) = items_named(pydicom.dcmread(path), dn.INTENDED_USE)
    assert intended.TextValue == "knee-kl 1.0.0: Decision support, not diagnosis."
    assert items_named(pydicom.dcmread(path), dn.LOCALISATION_UNCERTAIN) == []
    assert dciodvfy_errors(path) == []


@needs_dicom3tools
@needs_dcmtk
def test_a_whole_image_finding_is_reported_on_the_image_not_on_a_box_around_its_border(
    tmp_path: Path,
) -> None:
    """Hand and spine models grade the whole image: a TID 1410 box drawn round the border
    would claim a region nobody outlined. Their findings are TID 1501 groups on the image."""
    source = make_source(body_part="HAND")
    result = make_result(2)  # the whole image: nothing was localised
    path = save(
        make_sr([SrImageItem(source=source, sc=make_sc(source, result), result=result)]),
        tmp_path / "sr.dcm",
    )
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_planar_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    assert group.finding_type == dn.class_concept(result.findings[0].predicted)
    (image,) = group.source_images
    assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert len(group.get_measurements(name=dn.PROBABILITY)) == 2
    back = pydicom.dcmread(path)
    assert [item.GraphicType for item in items_named(back, dn.peak_concept("layercam"))] == [
        "POINT"
    ]
    assert not any(getattr(item, "GraphicType", "") == "POLYLINE" for item in _all_items(back))
    assert dciodvfy_errors(path) == []
    assert result.findings[0].predicted.code_meaning in dump(DSRDUMP, path)


def _all_items(dataset: Dataset) -> Iterator[Dataset]:
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _all_items(item)


@needs_dicom3tools
def test_results_answer_the_order_of_their_images(tmp_path: Path) -> None:
    """A RIS files a report under its order: the SR names the request in its Referenced
    Request Sequence, and the overlay keeps the source's Request Attributes Sequence."""
    source = make_source()
    request = Dataset()
    request.RequestedProcedureID = "RP-7"
    request.AccessionNumber = "ACC-1"
    request.RequestedProcedureDescription = "XR KNEE 2 VIEWS RIGHT"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID7", "99ORD", "XR knee"
    request.RequestedProcedureCodeSequence = [code]
    request.ScheduledProcedureStepID = "SPS-7"
    source.RequestAttributesSequence = [request]
    result = make_result()
    sc = make_sc(source, result)
    sr_path = save(make_sr([SrImageItem(source=source, sc=sc, result=result)]), tmp_path / "sr.dcm")
    (item,) = pydicom.dcmread(sr_path).ReferencedRequestSequence
    assert (item.StudyInstanceUID, item.AccessionNumber) == (source.StudyInstanceUID, "ACC-1")
    assert (item.RequestedProcedureID, item.RequestedProcedureDescription) == (
        "RP-7",
        "XR KNEE 2 VIEWS RIGHT",
    )
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "RPID7"
    assert "PlacerOrderNumberImagingServiceRequest" in item  # Type 2: present, empty
    assert dciodvfy_errors(sr_path) == []
    sc_path = save(sc, tmp_path / "sc.dcm")
    assert pydicom.dcmread(sc_path).RequestAttributesSequence[0].RequestedProcedureID == "RP-7"
    assert dciodvfy_errors(sc_path) == []

    # An image of the same order without request attributes adds no second item.
    same_order = make_source(study_uid=source.StudyInstanceUID)
    items = [SrImageItem(source=s, sc=None, result=result) for s in (source, same_order)]
    assert len(make_sr(items).ReferencedRequestSequence) == 1

    # Without request attributes the Accession Number alone names the order; with
    # neither, the report answers no known request and the sequence (Type 1C) is absent.
    bare = make_source()
    sr = make_sr([SrImageItem(source=bare, sc=None, result=result)])
    (item,) = sr.ReferencedRequestSequence
    assert (item.AccessionNumber, item.RequestedProcedureID) == ("ACC-1", None)
    del bare.AccessionNumber
    assert "ReferencedRequestSequence" not in make_sr(
        [SrImageItem(source=bare, sc=None, result=result)]
    )


@needs_dicom3tools
def test_sc_copies_the_whole_patient_and_study_modules(tmp_path: Path) -> None:
    """What a patient index matches on (issuer, other IDs) files the overlay with the image."""
    source = make_source()
    source.IssuerOfPatientID = "HOSP-A"
    source.StudyDescription = "XR KNEE BILATERAL"
    source.PatientAge = "064Y"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "77", "HOSP-B", "TEXT"
    source.OtherPatientIDsSequence = [other]
    path = save(make_sc(source, make_result()), tmp_path / "sc.dcm")
    back = pydicom.dcmread(path)
    for keyword in ("IssuerOfPatientID", "StudyDescription", "PatientAge"):
        assert back[keyword].value == source[keyword].value
    assert back.OtherPatientIDsSequence[0].IssuerOfPatientID == "HOSP-B"
    assert dciodvfy_errors(path) == []


def test_series_description_keeps_the_synthetic_label_whole() -> None:
    model = replace(make_result(2, synthetic=True).model, name="x" * 80)
    text = series_description("AI overlay", model)
    assert len(text) == 64
    assert text.endswith(" [synthetic training data]")
    real = replace(model, synthetic_training_data=False)
    assert "synthetic" not in series_description("AI overlay", real)


def test_sc_rejects_non_rgb() -> None:
    with pytest.raises(EncodeError, match="uint8"):
        encode_sc(
            make_source(),
            np.zeros((ROWS, COLUMNS), dtype=np.uint8),
            make_result(),
            Placement(generate_uid(), generate_uid(), 1, 1, "0.1.0"),
        )


# Structured Report ---------------------------------------------------------


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(("classes", "synthetic"), [(2, True), (5, False)])
def test_sr_round_trip(tmp_path: Path, classes: int, synthetic: bool) -> None:
    source = make_source()
    region = Region(40, 60, 280, 240)
    note = "" if synthetic else "KL4 probabilities run high; read the grade."
    result = make_result(classes, synthetic=synthetic, region=region, uncertain=True, note=note)
    sc = make_sc(source, result)
    sr = make_sr([SrImageItem(source=source, sc=sc, result=result)])
    path = save(sr, tmp_path / "sr.dcm")

    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.ComprehensiveSR)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert (back.PreliminaryFlag, back.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    evidence = {uid for _, _, uid, _ in back.get_evidence()}
    assert evidence == {source.SOPInstanceUID, sc.SOPInstanceUID}

    report = back.content
    assert isinstance(report, hd.sr.MeasurementReport)
    observer = report.get_observer_contexts(
        observer_type=hd.sr.CodedConcept.from_code(codes.cid270.Device)
    )[0]
    assert observer.observer_identifying_attributes.name == "knee-kl 1.0.0"

    (group,) = report.get_planar_roi_measurement_groups()
    finding = result.findings[0]
    assert group.finding_type == dn.class_concept(finding.predicted)
    assert group.finding_sites[0].value == dn.BODY_PARTS["KNEE"]  # type: ignore[index]
    assert group.finding_sites[0].laterality == dn.LATERALITY["R"]

    roi = group.roi
    assert roi is not None
    assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(roi.value, [[40, 60], [280, 60], [280, 240], [40, 240], [40, 60]])
    assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )

    probabilities = {}
    for measurement in group.get_measurements(name=dn.PROBABILITY):
        assert measurement.unit == dn.PROBABILITY_UNIT
        modifier = measurement[0].ContentSequence[0].ConceptCodeSequence[0]
        probabilities[modifier.CodeValue] = measurement.value
    assert probabilities == pytest.approx(
        {c.code_value: p for c, p in zip(result.classes, finding.probabilities, strict=True)}
    )
    (uncertain,) = group.get_qualitative_evaluations(name=dn.LOCALISATION_UNCERTAIN)
    assert uncertain.value == dn.YES
    assert "Localisation uncertain: weak joint signal (0.30)" in text_values(back)

    (explanation,) = items_named(back, dn.VISUAL_EXPLANATION)
    assert explanation.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    # The peak is named by the map it comes from (the card's method), not always Grad-CAM.
    assert items_named(back, dn.GRADCAM_PEAK) == []
    (peak,) = items_named(back, dn.peak_concept("layercam"))
    assert peak.ConceptNameCodeSequence[0].CodeMeaning == "LayerCAM peak"
    assert peak.GraphicType == "POINT"
    assert list(peak.GraphicData) == [PEAK[0] + 0.5, PEAK[1] + 0.5]

    texts = text_values(back)
    assert "knee-kl" in texts  # Algorithm Name (TID 4019)
    assert "1.0.0" in texts  # Algorithm Version
    assert f"weights sha256: {result.model.sha256}" in texts
    assert "explanation: LayerCAM at blocks.2+blocks.4" in texts
    assert "AI result, requires review by a radiologist" in texts
    assert any(SYNTHETIC_NOTICE in text for text in texts) == synthetic
    # A card's reader note is said once, naming the model it belongs to.
    assert [t for t in texts if "run high" in t] == (
        [] if synthetic else [f"knee-kl 1.0.0: {note}"]
    )

    assert dciodvfy_errors(path) == []
    dumped = dump(DSRDUMP, path)
    assert finding.predicted.code_meaning in dumped
    dump(DCMDUMP, path)


@needs_dicom3tools
@needs_dcmtk
def test_sr_of_two_images_without_overlay_for_one(tmp_path: Path) -> None:
    study_uid = generate_uid()
    right, left = make_source(study_uid=study_uid), make_source(study_uid=study_uid, laterality="L")
    right_result, left_result = make_result(), make_result(laterality=None, uncertain=True)
    items = [
        SrImageItem(source=right, sc=make_sc(right, right_result), result=right_result),
        SrImageItem(source=left, sc=None, result=left_result),
    ]
    path = save(make_sr(items), tmp_path / "sr.dcm")
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()  # whole-image findings: TID 1501
    assert len(groups) == 2
    assert groups[1].finding_sites[0].laterality == dn.LATERALITY["L"]  # from ImageLaterality
    assert len(items_named(pydicom.dcmread(path), dn.VISUAL_EXPLANATION)) == 1
    assert dciodvfy_errors(path) == []
    dump(DSRDUMP, path)


def _results_read_back(source: Dataset, tmp_path: Path) -> list[tuple[Path, Dataset]]:
    """The SC, SR and presentation state of ``source`` (saved and read back first, as the
    node reads it), each saved as ``sc.dcm`` / ``sr.dcm`` / ``pr.dcm`` and read back."""
    stored = pydicom.dcmread(save(source, tmp_path / "source.dcm"))
    result = make_result()
    sc = make_sc(stored, result)
    sr = make_sr([SrImageItem(source=stored, sc=sc, result=result)])
    pr = make_pr(stored, result)
    paths = [save(sc, tmp_path / "sc.dcm"), save(sr, tmp_path / "sr.dcm")]
    paths.append(save(pr, tmp_path / "pr.dcm"))
    return [(path, pydicom.dcmread(path)) for path in paths]


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(
    ("charsets", "name", "study", "written"),
    [
        ("ISO_IR 100", "Müller^Jürgen", "Knie Röntgen", "ISO_IR 100"),
        ("ISO_IR 192", "Ωμέγα^Ψ", "Γόνατο 膝", "ISO_IR 192"),
        (  # an empty first value means ISO 2022 IR 6, which highdicom wants written out
            ["", "ISO 2022 IR 87"],
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "膝",
            ["ISO 2022 IR 6", "ISO 2022 IR 87"],
        ),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "무릎", "ISO_IR 192"),
    ],
)
def test_results_keep_the_patients_name_in_any_character_set(
    tmp_path: Path, charsets: str | list[str], name: str, study: str, written: str | list[str]
) -> None:
    """Names from PS3.5's examples. Japanese and Korean headers (``\\ISO 2022 IR 87``) made
    highdicom refuse the results; a term it does not know (Korean) is written as UTF-8."""
    source = make_source()
    source.SpecificCharacterSet = charsets
    source.PatientName = name
    source.StudyDescription = study
    for path, back in _results_read_back(source, tmp_path):
        assert (str(back.PatientName), back.StudyDescription) == (name, study)
        assert back.SpecificCharacterSet == written
        assert dciodvfy_errors(path) == []
    run = subprocess.run([DSRDUMP, str(tmp_path / "sr.dcm")], capture_output=True, timeout=30)
    assert run.returncode == 0 and b"Patient" in run.stdout  # printed in its own charset


def _wrong_vr(source: Dataset, tag: int, vr: str, value: object) -> None:
    """An attribute written with another VR than the standard's, as some archives forward it."""
    from pydicom.dataelem import DataElement

    source[tag] = DataElement(tag, vr, value)


def _lo_date(source: Dataset, value: str) -> None:
    _wrong_vr(source, 0x00080020, "LO", value)  # Study Date


def _two_character_sets(source: Dataset) -> None:
    source.SpecificCharacterSet = ["ISO_IR 100", "ISO_IR 192"]
    source.PatientName = "Müller^Jürgen"


@needs_dicom3tools
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda ds: setattr(ds, "PatientSex", "f"), {"PatientSex": "F"}),
        (lambda ds: setattr(ds, "PatientName", ["Doe", "John"]), {"PatientName": "Doe John"}),
        (lambda ds: setattr(ds, "AccessionNumber", ["A1", "A2"]), {"AccessionNumber": "A1 A2"}),
        (
            lambda ds: setattr(ds, "PatientBirthDate", "1965.01.01"),
            {"PatientBirthDate": "19650101"},
        ),
        (lambda ds: _lo_date(ds, "2024-03-14"), {"StudyDate": ""}),
        (lambda ds: _lo_date(ds, "20240314"), {"StudyDate": "20240314"}),
        (lambda ds: setattr(ds, "BodyPartExamined", ["KNEE", "LEG"]), {}),
        (
            _two_character_sets,
            {"PatientName": "Müller^Jürgen", "SpecificCharacterSet": "ISO_IR 192"},
        ),
        (
            lambda ds: setattr(ds, "SpecificCharacterSet", "ISO 2022 IR 100"),
            {"SpecificCharacterSet": "ISO_IR 192"},
        ),
        (lambda ds: _wrong_vr(ds, 0x00280010, "OB", b"\x00\x02"), {}),  # US as OB: kept
    ],
)
def test_results_of_non_conformant_headers_are_valid(
    tmp_path: Path, change: Callable[[Dataset], object], expected: dict[str, str]
) -> None:
    """Headers real archives send (found probing the encoders): each once killed the SC or
    SR job (highdicom refused it) or made dciodvfy errors in the results."""
    source = make_source()
    change(source)
    for path, back in _results_read_back(source, tmp_path):
        assert {k: str(back.get(k) or "") for k in expected} == expected
        assert dciodvfy_errors(path) == []


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(
    ("charset", "institution", "written"),
    [
        (None, "Klinikum Göttingen – Radiologie", "ISO_IR 192"),
        ("ISO_IR 100", "Klinikum Göttingen", "ISO_IR 100"),  # Latin-1 writes it
        ("ISO_IR 100", "Hôpital – Radiologie", "ISO_IR 192"),  # the dash is not Latin-1
        (None, "St Mary Radiology", None),
        ("ISO_IR 6", "St Mary Radiology", None),  # the default repertoire, written as absent
        ("ISO_IR 13", "山田病院", "ISO_IR 192"),  # JIS X 0201 has no kanji
    ],
)
def test_the_nodes_own_words_are_written_in_a_character_set_that_has_them(
    tmp_path: Path, charset: str | None, institution: str, written: str | None
) -> None:
    """node.institution_name (and a model's notes) are the node's text, not the source's:
    where the source's character set cannot write them, the results are UTF-8."""
    from dicomnode.encode.header import fit_character_set

    source = make_source()
    if charset is not None:
        source.SpecificCharacterSet = charset
    result = make_result()
    sc = make_sc(source, result)
    sc.InstitutionName = institution  # as pipeline.make_sc does
    sr = make_sr([SrImageItem(source=source, sc=sc, result=result)])
    sr.InstitutionName = institution
    for kind, dataset in (("sc", sc), ("sr", sr)):
        path = save(fit_character_set(dataset), tmp_path / f"{kind}.dcm")
        back = pydicom.dcmread(path)
        assert back.get("SpecificCharacterSet") == written
        assert back.InstitutionName == institution and str(back.PatientName) == "Synthetic^Knee"
        assert dciodvfy_errors(path) == []
    dump(DSRDUMP, tmp_path / "sr.dcm")


@needs_dicom3tools
def test_sr_references_its_predecessor(tmp_path: Path) -> None:
    source = make_source()
    result = make_result()
    items = [SrImageItem(source=source, sc=None, result=result)]
    first = pydicom.dcmread(save(make_sr(items), tmp_path / "sr1.dcm"))
    second_path = save(make_sr(items, predecessor=first), tmp_path / "sr2.dcm")
    second = pydicom.dcmread(second_path)
    study = second.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == first.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first
    assert dciodvfy_errors(second_path) == []
    assert first.SOPInstanceUID != second.SOPInstanceUID
    # the finding keeps its tracking UID in the follow-up document
    assert _tracking_uids(first) == _tracking_uids(second)
    assert len(_tracking_uids(first)) == 1


def _tracking_uids(sr: Dataset) -> list[str]:
    return [str(i.UID) for i in items_named(sr, codes.DCM.TrackingUniqueIdentifier)]


def test_sr_uids_made_by_the_node_are_under_its_root() -> None:
    root = "1.2.826.0.1.3680043.10.999."
    sr = make_sr([SrImageItem(make_source(), None, make_result())], uid_root=root)
    made = _tracking_uids(sr) + [str(i.UID) for i in items_named(sr, codes.DCM.DeviceObserverUID)]
    assert len(made) == 2
    assert all(uid.startswith(root) for uid in made)


@needs_dicom3tools
def test_sr_of_sparse_source_is_valid_and_leaves_source_alone(tmp_path: Path) -> None:
    source = make_source(body_part="SPINE", laterality=None)
    for keyword in ("AccessionNumber", "StudyID", "PatientBirthDate", "PatientSex"):
        delattr(source, keyword)
    before = set(source.dir())
    items = [SrImageItem(source=source, sc=None, result=make_result(laterality=None))]
    path = save(make_sr(items), tmp_path / "sr.dcm")
    assert set(source.dir()) == before
    back = pydicom.dcmread(path)
    assert back.AccessionNumber in ("", None)
    assert dciodvfy_errors(path) == []


def test_sr_refuses_images_of_several_studies() -> None:
    items = [SrImageItem(source=make_source(), sc=None, result=make_result()) for _ in range(2)]
    with pytest.raises(EncodeError, match="one study"):
        make_sr(items)


@pytest.mark.parametrize("keyword", ["PatientID", "PatientName", "PatientBirthDate"])
def test_sr_refuses_images_of_two_patients(keyword: str) -> None:
    study_uid = generate_uid()
    first, second = make_source(study_uid=study_uid), make_source(study_uid=study_uid)
    setattr(second, keyword, "19710203" if keyword == "PatientBirthDate" else "Other^Person")
    items = [SrImageItem(source=s, sc=None, result=make_result()) for s in (first, second)]
    with pytest.raises(EncodeError, match=f"different patients \\({keyword} differ\\)") as info:
        make_sr(items)
    assert "Other" not in str(info.value) and "19710203" not in str(info.value)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"PatientName": "Doe^John^^"}, {"PatientName": "DOE^JOHN"}),
        ({"PatientName": "Yamada^Tarou=山田^太郎"}, {"PatientName": "Yamada^Tarou"}),
        ({"PatientBirthDate": ""}, {"PatientBirthDate": "19600101"}),
        ({}, {"IssuerOfPatientID": "HOSP-A"}),
        ({"PatientBirthDate": "00000000"}, {"PatientBirthDate": "19600101"}),  # emptied
        ({"PatientBirthDate": "1960.01.01"}, {"PatientBirthDate": "19600101"}),  # ACR-NEMA
    ],
)
def test_sr_takes_one_patient_written_two_ways(
    first: dict[str, str], second: dict[str, str]
) -> None:
    """Trailing delimiters, case, a missing component group or an empty value are the same
    patient (PS3.5 6.2.1), not a clash."""
    study_uid = generate_uid()
    sources = [make_source(study_uid=study_uid), make_source(study_uid=study_uid)]
    for source, values in zip(sources, (first, second), strict=True):
        for keyword, value in values.items():
            setattr(source, keyword, value)
    items = [SrImageItem(source=s, sc=None, result=make_result()) for s in sources]
    assert make_sr(items).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"


def test_sr_refuses_no_images() -> None:
    with pytest.raises(EncodeError, match="at least one"):
        make_sr([])


def test_a_smaller_overlay_keeps_findings_in_place() -> None:
    from dicomnode.encode.render import fitted_result
    from dicomnode.values import Finding, PreparedImage, Region

    pixels = np.zeros((3000, 2400), dtype=np.float32)
    pixels[:, 1200:] = 1.0  # white right half
    heat = np.zeros_like(pixels)
    heat[1500:1600, 1200:1300] = 1.0
    image = PreparedImage(pixels=pixels, laterality="R")
    coded = CodedClass(0, "a", "A", "99DICOMNODE", "A")
    finding = Finding(coded, (1.0,), heat, (1250.0, 1550.0), Region(1000, 1000, 2000, 2000))
    model = ModelIdentity("m", "1", "0" * 64, False)
    result = ImageResult(model, (coded,), (finding,))
    shrunk = fitted_result(image, result, 1500)
    (f,) = shrunk.findings
    assert f.heatmap.shape == (1500, 1200)
    assert f.peak == (625.0, 775.0)
    assert (f.region.x0, f.region.y0, f.region.x1, f.region.y1) == (500, 500, 1000, 1000)
    row, column = np.unravel_index(np.argmax(f.heatmap), f.heatmap.shape)
    assert 745 <= row <= 805 and 595 <= column <= 655
    assert fitted_result(image, result, 0) is result
    assert fitted_result(image, result, 3000) is result
    # A heatmap made at the overlay's shape is used as it is.
    made = replace(finding, heatmap=f.heatmap)
    assert fitted_result(image, replace(result, findings=(made,)), 1500).findings[0].heatmap is (
        f.heatmap
    )
    overlay = render_overlay(image, result, 1500)
    band = overlay.shape[0] - 1500
    rgb = overlay[band:]
    assert rgb.shape == (1500, 1200, 3)
    # The grey image is shrunk with its findings: black left, white right, heat at the peak.
    assert rgb[200, 100].tolist() == [0, 0, 0] and rgb[200, 1100].tolist() == [255, 255, 255]
    assert len(set(rgb[775, 625].tolist())) > 1  # coloured by the heat, not grey
    # Regions and peaks stay in original pixels; only the heatmap may come at the overlay's shape.
    np.testing.assert_array_equal(
        overlay, render_overlay(image, replace(result, findings=(made,)), 1500)
    )
    with pytest.raises(EncodeError, match="overlay's shape"):
        render_overlay(image, replace(result, findings=(replace(finding, heatmap=heat[:-1]),)))


# UIDs ----------------------------------------------------------------------


def test_derived_uids_do_not_collide_when_parts_shift() -> None:
    """Parts are hashed with a separator: ("1.0.1", 11) and ("1.0.11", 1) differ."""
    root = "1.2.826.0.1.3680043.10.1."
    assert uids.sr_instance_uid(root, "1.2.3", "m", "1.0.1", 11) != uids.sr_instance_uid(
        root, "1.2.3", "m", "1.0.11", 1
    )
    assert uids.sc_series_uid(root, "1.2.3", "hand-ra2", "1.0") != uids.sc_series_uid(
        root, "1.2.3", "hand-ra", "21.0"
    )
    again = uids.sr_instance_uid(root, "1.2.3", "m", "1.0.1", 11)
    assert again == uids.sr_instance_uid(root, "1.2.3", "m", "1.0.1", 11)
    assert again.startswith(root)


def test_overlays_of_each_side_go_into_a_series_of_their_own() -> None:
    """Laterality is a series attribute: a right and a left knee image get two SC series,
    each with a number of its own (a PACS lists series by number)."""
    study = generate_uid()
    result = make_result(5)
    series: dict[str, set[tuple[str, int]]] = {}
    for side in ("R", "L", "R", None):
        prepared = Prepared(
            generate_uid(), make_source(laterality=side, study_uid=study), make_image()
        )
        sc = pipeline_make_sc(Analysed(prepared, result), uid_root="1.2.826.0.1.3680043.10.1.")
        side_shown = str(sc.get("Laterality", "") or "")
        series.setdefault(sc.SeriesInstanceUID, set()).add((side_shown, int(sc.SeriesNumber)))
    assert sorted(series.values(), key=str) == [{("", 9901)}, {("L", 9904)}, {("R", 9903)}]


@needs_dicom3tools
def test_a_film_of_both_knees_labelled_with_one_side_is_not_filed_under_that_side(
    tmp_path: Path,
) -> None:
    """A bilateral film whose header says R: its overlay shows a right and a left knee, so
    it goes to the overlay series of no side (9901), not to the right knees' series."""
    source = make_source(laterality="R")
    one = make_result(region=Region(10, 60, 130, 180), laterality="R").findings[0]
    two = make_result(region=Region(160, 60, 280, 180), laterality="L").findings[0]
    result = replace(make_result(), findings=(one, two))
    sc = pipeline_make_sc(
        Analysed(Prepared(generate_uid(), source, make_image()), result),
        uid_root="1.2.826.0.1.3680043.10.1.",
    )
    assert (int(sc.SeriesNumber), sc.ImageLaterality) == (9901, "B")
    assert "Laterality" not in sc
    assert not sc.SeriesDescription.startswith("AI overlay R")
    path = save(sc, tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == [] and dciodvfy_warnings(path) == []


# Non-conformant source headers ---------------------------------------------


@needs_dicom3tools
@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientBirthDate", "00000000", ""),
        ("PatientBirthDate", "19650100", ""),
        ("PatientBirthDate", "1965-01-01", ""),
        ("StudyDate", "2024", ""),
        ("StudyTime", "25:00", ""),
        ("PatientSex", "female", "F"),
        ("PatientSex", "unknown", ""),
    ],
)
def test_outputs_of_a_non_conformant_header_are_valid_and_the_source_unchanged(
    tmp_path: Path, keyword: str, value: str, expected: str
) -> None:
    """A bad date or sex in an archive's header must not stop the study being analysed."""
    source = make_source()
    setattr(source, keyword, value)
    sc_path = save(make_sc(source, make_result()), tmp_path / "sc.dcm")
    sr_path = save(make_sr([SrImageItem(source, None, make_result())]), tmp_path / "sr.dcm")
    for path in (sc_path, sr_path):
        assert str(pydicom.dcmread(path).get(keyword) or "") == expected
        assert dciodvfy_errors(path) == []
    assert source[keyword].value == value


def test_a_conformant_header_is_not_copied() -> None:
    source = make_source()
    assert conformant_header(source) is source


# Finding sites -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body_part", "routed", "expected"),
    [
        ("KNEE", (), codes.SCT.Knee),
        ("LSPINE", (BodyPart.SPINE,), codes.SCT.LumbarSpine),
        ("CSPINE", (BodyPart.SPINE,), codes.SCT.CervicalSpine),
        ("WRIST", (BodyPart.HAND,), codes.SCT.WristJoint),
        ("", (BodyPart.KNEE,), codes.SCT.Knee),  # routed from the study description
        ("", (BodyPart.KNEE, BodyPart.HAND), codes.SCT.AnatomicalStructure),
        ("CHEST", (), codes.SCT.AnatomicalStructure),
    ],
)
def test_sr_finding_site_names_the_body_part_examined_or_the_models(
    body_part: str, routed: tuple[BodyPart, ...], expected: hd.sr.CodedConcept
) -> None:
    source = make_source(body_part=body_part)
    result = make_result()
    result = replace(result, model=replace(result.model, body_parts=routed))
    sr = make_sr([SrImageItem(source, None, result)])
    (site,) = {
        (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        for item in items_named(sr, codes.SCT.FindingSite)
    }
    assert site == (expected.value, expected.scheme_designator)


# Time zone -----------------------------------------------------------------


@needs_dicom3tools
def test_results_of_a_source_with_a_time_zone_are_stamped_in_that_zone(tmp_path: Path) -> None:
    source = make_source()
    source.TimezoneOffsetFromUTC = "+0900"
    before = datetime.now(UTC)
    sc = make_sc(source, make_result())
    sr = make_sr([SrImageItem(source, None, make_result())])
    after = datetime.now(UTC)
    for made, name in ((sc, "sc"), (sr, "sr")):
        assert made.TimezoneOffsetFromUTC == "+0900"
        stamped = datetime.strptime(
            f"{made.ContentDate}{made.ContentTime}+0900", "%Y%m%d%H%M%S.%f%z"
        )
        assert before - timedelta(seconds=1) <= stamped <= after + timedelta(seconds=1)
        assert (made.InstanceCreationDate, made.InstanceCreationTime) == (
            made.ContentDate,
            made.ContentTime,
        )
        assert dciodvfy_errors(save(made, tmp_path / f"{name}.dcm")) == []
    assert sc.TimeOfSecondaryCapture == sc.ContentTime


def test_results_of_a_source_without_a_time_zone_carry_none() -> None:
    sc = make_sc(make_source(), make_result())
    assert "TimezoneOffsetFromUTC" not in sc


@needs_dicom3tools
def test_the_nodes_institution_is_named_in_both_results(tmp_path: Path) -> None:
    result = make_result()
    prepared = Prepared(generate_uid(), make_source(), make_image())
    sc = pipeline_make_sc(
        Analysed(prepared, result), uid_root="1.2.3.", institution_name="St Elsewhere"
    )
    sr = pipeline_make_sr(
        [SrImageItem(prepared.header, sc, result)],
        uid_root="1.2.3.",
        sequence=1,
        institution_name="St Elsewhere",
    )
    for made, name in ((sc, "sc"), (sr, "sr")):
        assert made.InstitutionName == "St Elsewhere"
        assert dciodvfy_errors(save(made, tmp_path / f"{name}.dcm")) == []
    plain = pipeline_make_sc(Analysed(prepared, result), uid_root="1.2.3.")
    assert "InstitutionName" not in plain


# Grayscale Softcopy Presentation State --------------------------------------

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def _inside(points: npt.NDArray[np.float64], x: float, y: float) -> bool:
    """Whether (x, y) lies inside the closed polyline ``points`` (ray casting)."""
    inside = False
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _layer(pr: Dataset, name: str) -> Dataset:
    annotations: list[Dataset] = list(pr.GraphicAnnotationSequence)
    return next(a for a in annotations if a.GraphicLayer == name)


def _texts_of(pr: Dataset, units: str | None = None) -> list[str]:
    return [
        str(t.UnformattedTextValue)
        for a in pr.GraphicAnnotationSequence
        for t in a.get("TextObjectSequence", [])
        if units is None or t.BoundingBoxAnnotationUnits == units
    ]


def _polylines(annotation: Dataset) -> list[npt.NDArray[np.float64]]:
    return [
        np.asarray(g.GraphicData, dtype=np.float64).reshape(-1, 2)
        for g in annotation.get("GraphicObjectSequence", [])
        if g.GraphicType == "POLYLINE"
    ]


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(
    ("photometric", "source_shape", "synthetic", "shape"),
    [
        ("MONOCHROME2", None, True, "IDENTITY"),
        ("MONOCHROME1", None, False, "INVERSE"),
        ("MONOCHROME1", "INVERSE", False, "INVERSE"),  # as DX asks of MONOCHROME1
        ("MONOCHROME2", "INVERSE", False, "INVERSE"),
    ],
)
def test_pr_draws_the_result_over_the_original_and_keeps_its_grey_scale(
    tmp_path: Path, photometric: str, source_shape: str | None, synthetic: bool, shape: str
) -> None:
    """The presentation state references the original, keeps its window and how the node
    shows it (inverted once for MONOCHROME1 or a Presentation LUT Shape INVERSE: white
    bone either way), names the model and says what a reader must know, and validates."""
    source = make_source()
    source.PhotometricInterpretation = photometric
    if source_shape is not None:
        source.PresentationLUTShape = source_shape
    source.WindowCenter, source.WindowWidth = 1800, 3000
    result = make_result(5, synthetic=synthetic)
    path = save(make_pr(source, result), tmp_path / "pr.dcm")
    back = pydicom.dcmread(path)

    assert (back.SOPClassUID, back.Modality) == (GSPS, "PR")
    assert (back.SeriesInstanceUID, back.SOPInstanceUID) == ("1.2.3.4.905", "1.2.3.4.905.1")
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert back[keyword].value == source[keyword].value
    referenced = back.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (source.SOPInstanceUID)
    assert back.PresentationLUTShape == shape
    voi = back.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (1800.0, 3000.0)
    assert back.ContentLabel == "KNEE_KL"
    label = " [synthetic training data]" if synthetic else ""
    assert (
        back.SeriesDescription
        == back.ContentDescription
        == "AI annotations R knee-kl 1.0.0" + label
    )
    assert (back.Laterality, back.BodyPartExamined) == ("R", "KNEE")
    assert [layer.GraphicLayer for layer in back.GraphicLayerSequence] == [
        "AI RESULT",
        "AI EVIDENCE",
    ]

    texts = _texts_of(back, "DISPLAY")
    assert texts[0] == overlay_lines(result)[0]  # the finding first, as on the overlay
    assert "knee-kl 1.0.0 (sha256 0123456789ab)" in texts
    assert "AI result, requires review by a radiologist" in texts
    assert (SYNTHETIC_NOTICE in texts) is synthetic
    assert dciodvfy_errors(path) == [] and dciodvfy_warnings(path) == []
    dump(DCMDUMP, path)


def test_pr_outlines_the_heat_around_its_peak_at_the_images_own_scale() -> None:
    """The heat map is made at the overlay's size (here half the image's): its outline and
    the peak cross are drawn in the original's pixel coordinates, around the peak and away
    from the cold corner."""
    full = make_result(2)
    half = make_heatmap(Region(0, 0, COLUMNS // 2, ROWS // 2), (100, 55), ROWS // 2, COLUMNS // 2)
    result = replace(full, findings=(replace(full.findings[0], heatmap=half),))
    evidence = _layer(make_pr(make_source(), result), "AI EVIDENCE")
    outline, *crosses = _polylines(evidence)
    assert len(outline) > 8 and np.array_equal(outline[0], outline[-1])  # closed
    assert _inside(outline, *PEAK) and not _inside(outline, 5.0, 5.0)
    assert outline[:, 0].min() >= 0 and outline[:, 0].max() <= COLUMNS
    assert outline[:, 1].min() >= 0 and outline[:, 1].max() <= ROWS
    # where the Gaussian heat (sigma = rows / 12) falls to half its peak, about 1.18 sigma out
    radius = np.hypot(outline[:, 0] - PEAK[0], outline[:, 1] - PEAK[1])
    assert abs(float(np.median(radius)) - 1.18 * ROWS / 12) < 3
    assert len(crosses) == 2
    centre = (crosses[0].mean(axis=0) + crosses[1].mean(axis=0)) / 2
    assert np.allclose(centre, np.add(PEAK, 0.5), atol=0.01)  # the peak pixel's centre


def test_heat_outlines_are_closed_also_where_the_heat_touches_the_border() -> None:
    from dicomnode.encode.pr import heat_outlines

    heat = np.zeros((40, 50), dtype=np.float32)
    heat[:, :10] = 1.0  # a hot band along the left edge
    (outline,) = heat_outlines(heat, 400, 500)
    assert np.array_equal(outline[0], outline[-1])
    assert outline[:, 0].min() == 0.0 and 90 <= outline[:, 0].max() <= 110
    assert heat_outlines(np.zeros((40, 50), dtype=np.float32), 400, 500) == []


@needs_dicom3tools
def test_pr_frames_each_knee_and_labels_it_with_its_side_and_grade(tmp_path: Path) -> None:
    source = make_source(laterality="R")
    boxes = (Region(10, 60, 130, 180), Region(160, 60, 280, 180))
    one = make_result(region=boxes[0], laterality="R", peak=(70, 120)).findings[0]
    two = make_result(region=boxes[1], laterality="L", peak=(220, 120)).findings[0]
    result = replace(make_result(), findings=(one, two))
    pr = make_pr(source, result)
    labels = _texts_of(pr, "PIXEL")
    assert [label[:3] for label in labels] == ["R: ", "L: "]
    assert all("KL grade 2, probability 80%" in label for label in labels)
    frames = _polylines(_layer(pr, "AI RESULT"))
    assert [(f[:, 0].min(), f[:, 1].min(), f[:, 0].max(), f[:, 1].max()) for f in frames] == [
        (b.x0, b.y0, b.x1, b.y1) for b in boxes
    ]
    corner = _texts_of(pr, "DISPLAY")
    assert not any(text.startswith(("R: ", "L: ")) for text in corner)  # on the boxes instead
    assert corner[0].startswith("Outline: evidence for each box's result")
    label_box = next(
        t
        for t in _layer(pr, "AI RESULT").TextObjectSequence
        if t.BoundingBoxAnnotationUnits == "PIXEL"
    )
    assert label_box.BoundingBoxBottomRightHandCorner[1] == boxes[0].y0  # just above its box
    assert "Laterality" in pr and not pr.Laterality  # both sides: no side, as the overlay
    assert dciodvfy_errors(save(pr, tmp_path / "pr.dcm")) == []


def test_pr_of_an_image_without_a_finding_says_why_and_draws_no_evidence() -> None:
    reason = "No knee joint found on the image: not graded"
    result = replace(make_result(), findings=(), not_assessed=reason)
    pr = make_pr(make_source(), result)
    assert [a.GraphicLayer for a in pr.GraphicAnnotationSequence] == ["AI RESULT"]
    texts = _texts_of(pr)
    assert texts[0] == reason and not any(t.startswith("Outline") for t in texts)


def test_presentation_states_of_each_side_go_into_a_series_of_their_own() -> None:
    from dicomnode.pipeline import make_pr as pipeline_make_pr

    study = generate_uid()
    result = make_result(5)
    series: dict[str, set[tuple[str, int]]] = {}
    for side in ("R", "L", "R", None):
        source = make_source(laterality=side, study_uid=study)
        analysed = Analysed(Prepared(str(source.SOPInstanceUID), source, make_image()), result)
        pr = pipeline_make_pr(analysed, uid_root="1.2.826.0.1.3680043.10.1.")
        again = pipeline_make_pr(analysed, uid_root="1.2.826.0.1.3680043.10.1.")
        assert again.SOPInstanceUID == pr.SOPInstanceUID  # made again: the same object
        assert pr.InstanceNumber == source.InstanceNumber
        side_shown = str(pr.get("Laterality") or "")
        series.setdefault(pr.SeriesInstanceUID, set()).add((side_shown, int(pr.SeriesNumber)))
    assert sorted(series.values(), key=str) == [{("", 9905)}, {("L", 9907)}, {("R", 9906)}]


def test_a_colour_image_gets_no_grey_scale_presentation_state() -> None:
    from dicomnode.encode.pr import presentation_state_applies
    from dicomnode.pipeline import wants_pr

    source = make_source()
    source.SamplesPerPixel, source.PhotometricInterpretation = 3, "RGB"
    assert not presentation_state_applies(source)
    assert not wants_pr(Analysed(Prepared(generate_uid(), source, make_image()), make_result()))
    assert wants_pr(Analysed(Prepared(generate_uid(), make_source(), make_image()), make_result()))
    with pytest.raises(EncodeError, match="MONOCHROME"):
        make_pr(source, make_result())


@needs_dicom3tools
def test_pr_of_an_image_without_a_window_carries_the_window_the_node_chose(
    tmp_path: Path,
) -> None:
    """A header with no window (nor VOI LUT): the node shows the 0.5-99.5 % percentiles of
    its values; the state carries that window, so that the image looks as on the overlay.
    One with a window keeps it."""
    from pydicom.pixels.processing import apply_modality_lut

    from dicomnode.pipeline import make_pr as pipeline_make_pr
    from dicomnode.pipeline import read_and_prepare
    from dicomnode.testing.images import make_radiograph, write_dataset

    image = make_radiograph(rows=256, columns=300, seed=5)
    del image.WindowCenter, image.WindowWidth  # as many CR headers come
    bare = write_dataset(image, tmp_path / "bare.dcm")
    prepared = read_and_prepare(bare)
    assert prepared.image is not None and prepared.image.own_window is not None
    pr = pipeline_make_pr(Analysed(prepared, make_result()), uid_root="1.2.3.")
    voi = pr.SoftcopyVOILUTSequence[0]
    assert voi.VOILUTFunction == "LINEAR_EXACT"
    values = apply_modality_lut(pydicom.dcmread(bare).pixel_array, pydicom.dcmread(bare))
    shown = np.clip((values - float(voi.WindowCenter)) / float(voi.WindowWidth) + 0.5, 0, 1)
    assert np.abs(shown - prepared.image.pixels).max() < 1e-3  # as the node shows it
    assert dciodvfy_errors(save(pr, tmp_path / "pr.dcm")) == []

    windowed = make_radiograph(rows=256, columns=300, seed=5, window=(1500.0, 2500.0))
    prepared = read_and_prepare(write_dataset(windowed, tmp_path / "windowed.dcm"))
    assert prepared.image is not None and prepared.image.own_window is None
    pr = pipeline_make_pr(Analysed(prepared, make_result()), uid_root="1.2.3.")
    voi = pr.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (1500.0, 2500.0)


@needs_dicom3tools
@needs_dcmtk
def test_the_sr_names_each_images_presentation_state_to_display_it_with(tmp_path: Path) -> None:
    """Each reference of the SR to a source image that has a presentation state names it
    (the nested Referenced SOP Sequence of the Image Reference Macro): a whole-image
    finding's source image, and a knee's region; an image without one names none."""
    whole, knee, plain = make_source(), make_source(), make_source()
    study = whole.StudyInstanceUID
    knee.StudyInstanceUID = plain.StudyInstanceUID = study
    whole_result = make_result()
    knee_result = make_result(region=Region(40, 30, 240, 220))
    items = [
        SrImageItem(
            whole, make_sc(whole, whole_result), whole_result, make_pr(whole, whole_result)
        ),
        SrImageItem(knee, make_sc(knee, knee_result), knee_result, make_pr(knee, knee_result)),
        SrImageItem(plain, make_sc(plain, whole_result), whole_result),
    ]
    items[1] = replace(items[1], pr=replace_uid(items[1].pr, "1.2.3.4.905.2"))
    path = save(make_sr(items), tmp_path / "sr.dcm")
    back = pydicom.dcmread(path)
    states = {}
    for item in walk(back.ContentSequence):
        for reference in item.get("ReferencedSOPSequence", []):
            nested = reference.get("ReferencedSOPSequence")
            if nested:
                (state,) = nested
                assert state.ReferencedSOPClassUID == GSPS
                states[str(reference.ReferencedSOPInstanceUID)] = str(
                    state.ReferencedSOPInstanceUID
                )
    assert states == {
        str(whole.SOPInstanceUID): "1.2.3.4.905.1",
        str(knee.SOPInstanceUID): "1.2.3.4.905.2",
    }
    assert dciodvfy_errors(path) == []
    run = subprocess.run([DSRDUMP, "+Pu", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0  # dcmtk reads the pair: (DX image,"<uid>"),(GSPS,"<uid>")
    assert f'(DX image,"{whole.SOPInstanceUID}"),(GSPS,"1.2.3.4.905.1")' in run.stdout
    assert f'(DX image,"{knee.SOPInstanceUID}"),(GSPS,"1.2.3.4.905.2")' in run.stdout


def replace_uid(dataset: Dataset | None, uid: str) -> Dataset:
    assert dataset is not None
    dataset.SOPInstanceUID = uid
    return dataset


def test_a_rejection_note_needs_objects_and_a_rejection_title() -> None:
    from dicomnode.encode.ko import encode_ko

    placement = Placement("1.2.3.4.908", "1.2.3.4.908.1", 9908, 1, "0.1.0")
    model = make_result().model
    with pytest.raises(EncodeError, match="at least one object"):
        encode_ko([], "113001", placement, model, uid_root="1.2.3.", description="why")
    with pytest.raises(EncodeError, match="113000 is not the title of a rejection note"):
        encode_ko([make_source()], "113000", placement, model, uid_root="1.2.3.", description="why")
    note = encode_ko(
        [make_source()], "113039", placement, model, uid_root="1.2.3.", description="x" * 2000
    )
    assert note.ConceptNameCodeSequence[0].CodeMeaning == "Data Retention Policy Expired"
    assert (note.Modality, note.SeriesNumber) == ("KO", 9908)
