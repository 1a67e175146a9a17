"""The knee-joint localiser: decoding, letterbox geometry, cards, inference, trained weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomnode.errors import ModelError
from dicomnode.imaging.pixels import prepare_dataset
from dicomnode.imaging.tensor import Placement
from dicomnode.inference import Predictor
from dicomnode.models.card import load_card, sha256_of
from dicomnode.models.localise import (
    DEFAULT_THRESHOLD,
    INPUT_SIZE,
    STRIDE,
    Joint,
    JointMaps,
    KneeLocaliser,
    crop_region,
    decode_joints,
    localiser_input,
)
from dicomnode.testing.images import make_radiograph
from dicomnode.testing.models import make_tiny_model
from dicomnode.values import FloatArray, PreparedImage, Region

ROOT = Path(__file__).parents[2]
DATA = ROOT.parent / "shared" / "data" / "knee-kl224-train"
TRAINED = (
    ROOT / "models" / "knee-kl" / "localiser.safetensors",
    ROOT / "var" / "localiser" / "localiser.safetensors",
)
CELLS = INPUT_SIZE // STRIDE


# --- decoding hand-made heatmaps -----------------------------------------------------------


def _maps(peaks: list[tuple[float, float, float]], side: float = 40.0) -> JointMaps:
    """Maps with a Gaussian (sigma 1 cell) of height h at each (cell column, cell row, h)."""
    rows, columns = np.mgrid[0:CELLS, 0:CELLS].astype(np.float32)
    heat = np.zeros((CELLS, CELLS), dtype=np.float32)
    for u, v, height in peaks:
        heat = np.maximum(heat, height * np.exp(-((columns - u) ** 2 + (rows - v) ** 2) / 2))
    return JointMaps(heat.astype(np.float32), np.full_like(heat, side), STRIDE)


def _image(
    rows: int, columns: int, laterality: str | None = None, level: float = 0.0
) -> PreparedImage:
    return PreparedImage(np.full((rows, columns), level, dtype=np.float32), laterality, "test")


def _decode(
    peaks: list[tuple[float, float, float]], image: PreparedImage, side: float = 40.0
) -> tuple[Joint, ...]:
    _, placement = localiser_input(image.pixels)
    return decode_joints(_maps(peaks, side), placement, image, DEFAULT_THRESHOLD)


def test_two_peaks_give_two_joints_the_left_most_is_right() -> None:
    image = _image(300, 500)  # a bilateral film: no single side in the header
    joints = _decode([(44, 32, 0.8), (20, 30, 0.9)], image)
    assert [j.laterality for j in joints] == ["R", "L"]
    assert joints[0].centre[0] < joints[1].centre[0]
    assert [round(j.confidence, 3) for j in joints] == [0.9, 0.8]
    assert not any(j.uncertain for j in joints)


def test_two_peaks_on_a_film_of_one_side_flag_the_joint_of_the_other_side() -> None:
    """A left-knee film with a weak second peak: the knee is not reported as a confident R."""
    image = _image(300, 500, laterality="L")
    knee_left_of_centre, weak_peak = (20, 30, 0.9), (44, 32, 0.3)
    joints = _decode([knee_left_of_centre, weak_peak], image)
    assert [j.laterality for j in joints] == ["R", "L"]
    assert [j.uncertain for j in joints] == [True, True]  # R contradicts L; L is weak
    agreeing = _decode([(20, 30, 0.9), (44, 32, 0.9)], image)
    assert [j.uncertain for j in agreeing] == [True, False]


def test_one_peak_takes_the_image_laterality() -> None:
    joints = _decode([(20, 32, 0.9)], _image(400, 300, laterality="L"))
    assert len(joints) == 1
    assert joints[0].laterality == "L"
    assert not joints[0].uncertain


def test_one_peak_without_image_laterality_uses_the_half_only_when_the_other_is_empty() -> None:
    image = _image(300, 600)
    pixels = np.array(image.pixels)
    pixels[:, :300] = 0.7  # the joint's half is bright, the other half black
    (alone,) = _decode([(18, 32, 0.9)], PreparedImage(pixels, None, "one leg"))
    assert alone.laterality == "R"
    pixels[:, 450:500] = 0.6  # a leg in the other half
    (beside,) = _decode([(18, 32, 0.9)], PreparedImage(pixels, None, "two legs"))
    assert beside.laterality is None


@pytest.mark.parametrize(
    ("row_direction", "expected"),
    [
        ("", ["R", "L"]),
        ("L", ["R", "L"]),
        ("LF", ["R", "L"]),
        ("R", ["L", "R"]),
        ("RF", ["L", "R"]),
        ("A", [None, None]),
        ("P", [None, None]),
        ("H", [None, None]),
    ],
)
def test_two_joints_follow_the_row_direction_of_patient_orientation(
    row_direction: str, expected: list[str | None]
) -> None:
    """A film shown mirrored (rows towards the patient's right) has the left knee on the left."""
    image = PreparedImage(np.zeros((300, 500), np.float32), None, "test", row_direction)
    joints = _decode([(44, 32, 0.8), (20, 30, 0.9)], image)
    assert [j.laterality for j in joints] == expected


def test_one_joint_by_its_half_follows_the_row_direction() -> None:
    pixels = np.zeros((300, 600), np.float32)
    pixels[:, :300] = 0.7
    (standard,) = _decode([(18, 32, 0.9)], PreparedImage(pixels, None, "one leg", "L"))
    (mirrored,) = _decode([(18, 32, 0.9)], PreparedImage(pixels, None, "one leg", "R"))
    (lateral,) = _decode([(18, 32, 0.9)], PreparedImage(pixels, None, "one leg", "A"))
    assert (standard.laterality, mirrored.laterality, lateral.laterality) == ("R", "L", None)


def test_prepared_dataset_carries_the_row_direction() -> None:
    ds = make_radiograph(rows=64, columns=48)
    ds.PatientOrientation = ["R", "F"]
    assert prepare_dataset(ds).row_direction == "R"
    del ds.PatientOrientation
    assert prepare_dataset(ds).row_direction == ""


def test_no_peak_gives_no_joint() -> None:
    """A film with no knee on it gets no grade (the centre square used to be graded)."""
    assert _decode([], _image(300, 500, laterality="R")) == ()
    assert _decode([(32, 32, 0.2)], _image(300, 500)) == ()  # below the candidate floor


def test_peak_at_the_border_weak_peak_and_crowding_are_uncertain() -> None:
    image = _image(256, 256)
    (edge,) = _decode([(1, 32, 0.9)], image)
    assert edge.region.x0 < 0 and edge.uncertain
    assert edge.reasons == ("box leaves the image",)
    (weak,) = _decode([(32, 32, 0.4)], image)
    assert weak.uncertain and weak.region.x0 >= 0
    assert weak.reasons == ("weak joint signal (0.40)",)
    crowd = _decode([(10, 32, 0.9), (32, 32, 0.8), (54, 32, 0.7)], image)
    assert len(crowd) == 2 and all(j.uncertain for j in crowd)
    assert all("more than two joint candidates" in j.reasons for j in crowd)
    assert [round(j.confidence, 3) for j in crowd] == [0.9, 0.8]


def test_near_peaks_are_suppressed() -> None:
    joints = _decode([(30, 32, 0.9), (33, 32, 0.85)], _image(256, 256), side=40.0)
    assert len(joints) == 1 and not joints[0].uncertain


def test_peaks_on_the_letterbox_bars_are_ignored() -> None:
    image = _image(400, 200)  # pillarboxed: source columns are input columns 64..191
    joints = _decode([(4, 32, 0.9), (32, 32, 0.8)], image)
    assert len(joints) == 1 and joints[0].confidence == pytest.approx(0.8, abs=1e-3)


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "columns", "placement"),
    [
        (400, 200, Placement(400, 200, 0, 64, 256, 128)),
        (200, 400, Placement(200, 400, 64, 0, 128, 256)),
    ],
)
def test_boxes_map_back_through_the_letterbox(
    rows: int, columns: int, placement: Placement
) -> None:
    image = _image(rows, columns)
    _, actual = localiser_input(image.pixels)
    assert actual == placement
    assert placement.scale == pytest.approx(1.5625)
    # Cell (32, 32) has its centre at input (130, 130); a 64-pixel side is 100 source pixels.
    (joint,) = decode_joints(_maps([(32, 32, 0.9)], side=64.0), placement, image)
    x, y = placement.source_point(130, 130)
    assert joint.centre == pytest.approx((x, y), abs=0.5)
    assert joint.region.width == joint.region.height == 100
    assert placement.input_point(x, y) == pytest.approx((130, 130))
    expected = {(400, 200): (103.125, 203.125), (200, 400): (203.125, 103.125)}[(rows, columns)]
    assert (x, y) == pytest.approx(expected)


def test_crop_region_pads_with_black() -> None:
    pixels = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    crop = crop_region(pixels, Region(-1, 1, 3, 5))
    assert crop.shape == (4, 4)
    np.testing.assert_array_equal(crop[0], [0, 5, 6, 7])
    np.testing.assert_array_equal(crop[1], [0, 9, 10, 11])
    assert not crop[2:].any()


# --- cards and inference -------------------------------------------------------------------


def _discs(rows: int, columns: int, centres: list[tuple[int, int]], radius: int) -> FloatArray:
    yy, xx = np.mgrid[0:rows, 0:columns]
    pixels = np.full((rows, columns), 0.05, dtype=np.float32)
    for x, y in centres:
        pixels[(yy - y) ** 2 + (xx - x) ** 2 < radius**2] = 0.9
    return pixels


def test_card_with_a_wrong_localiser_checksum_is_refused(tmp_path: Path) -> None:
    card = make_tiny_model(tmp_path, localiser=True)
    assert card.preprocessing.localiser == "knee" and card.localiser is not None
    assert load_card(tmp_path) == card
    raw = yaml.safe_load((tmp_path / "model.yaml").read_text(encoding="utf-8"))
    raw["localiser"]["sha256"] = "0" * 64
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ModelError, match=r"localiser localiser\.safetensors have sha256"):
        load_card(tmp_path)
    wrong = card.model_copy(
        update={"localiser": card.localiser.model_copy(update={"sha256": "1" * 64})}
    )
    with pytest.raises(ModelError, match="refusing"):
        Predictor.load(tmp_path, wrong)


def test_localiser_block_and_preprocessing_must_agree(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, localiser=True)
    raw = yaml.safe_load((tmp_path / "model.yaml").read_text(encoding="utf-8"))
    without = {**raw, "localiser": None}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(without), encoding="utf-8")
    with pytest.raises(ModelError, match="needs a localiser block"):
        load_card(tmp_path, verify=False)
    unused = {**raw, "preprocessing": {**raw["preprocessing"], "localiser": "none"}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(unused), encoding="utf-8")
    with pytest.raises(ModelError, match=r"needs preprocessing\.localiser: knee"):
        load_card(tmp_path, verify=False)


def test_card_without_localiser_is_written_as_before(tmp_path: Path) -> None:
    make_tiny_model(tmp_path)
    assert "localiser:" not in (tmp_path / "model.yaml").read_text(encoding="utf-8").replace(
        "  localiser: none", ""
    )


@pytest.fixture(scope="module")
def with_localiser(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    directory = tmp_path_factory.mktemp("models") / "tiny-knee-localised"
    card = make_tiny_model(directory, num_classes=5, localiser=True)
    return Predictor.load(directory, card)


def test_predictor_gives_one_finding_per_joint(with_localiser: Predictor) -> None:
    images = [
        PreparedImage(_discs(300, 500, [(130, 150), (370, 150)], 50), None, "bilateral"),
        PreparedImage(_discs(400, 300, [(150, 200)], 50), "L", "left knee"),
        PreparedImage(_discs(300, 400, [(20, 150)], 40), None, "at the border"),
        PreparedImage(np.zeros((200, 300), dtype=np.float32), "R", "blank"),
    ]
    results = with_localiser.predict(images)
    assert [len(r.findings) for r in results] == [2, 1, 1, 0]
    bilateral = results[0].findings
    assert [f.laterality for f in bilateral] == ["R", "L"]
    assert not any(f.localisation_uncertain for f in bilateral)
    assert results[1].findings[0].laterality == "L"
    assert results[2].findings[0].localisation_uncertain  # its square leaves the image
    assert results[2].findings[0].uncertainty == ("box leaves the image",)
    assert all(f.localised for r in results for f in r.findings)
    # Nothing found: not graded, and said so (grading the centre of a blank film gave a grade
    # to nothing).
    assert results[3].not_assessed == "No knee joint found on the image: not graded"
    assert not results[0].not_assessed
    for image, result in zip(images, results, strict=True):
        for finding in result.findings:
            _check_finding_geometry(image, finding.region, finding.heatmap, finding.peak)
            assert len(finding.probabilities) == 5


def _check_finding_geometry(
    image: PreparedImage,
    region: Region,
    heatmap: FloatArray,
    peak: tuple[float, float],
    heatmap_size: int = 0,
) -> None:
    assert heatmap.shape == image.shape_within(heatmap_size)
    assert 0 <= region.x0 < region.x1 <= image.columns and 0 <= region.y0 < region.y1 <= image.rows
    scale_y, scale_x = heatmap.shape[0] / image.rows, heatmap.shape[1] / image.columns
    outside = np.ones(heatmap.shape, dtype=bool)
    outside[
        math.floor(region.y0 * scale_y) : math.ceil(region.y1 * scale_y),
        math.floor(region.x0 * scale_x) : math.ceil(region.x1 * scale_x),
    ] = False
    assert not heatmap[outside].any()
    assert heatmap.any()
    assert region.x0 <= peak[0] < region.x1 and region.y0 <= peak[1] < region.y1


def test_joint_maps_at_the_overlays_size_sit_on_their_regions(with_localiser: Predictor) -> None:
    """With a heatmap size (the node's overlay size) each joint's map is placed at that scale."""
    small = Predictor.load(with_localiser.directory, with_localiser.card, heatmap_size=160)
    images = [
        PreparedImage(_discs(300, 500, [(130, 150), (370, 150)], 50), None, "bilateral"),
        PreparedImage(_discs(300, 400, [(20, 150)], 40), None, "at the border"),
    ]
    for image, reference, result in zip(
        images, with_localiser.predict(images), small.predict(images), strict=True
    ):
        assert [f.region for f in result.findings] == [f.region for f in reference.findings]
        for finding in result.findings:
            _check_finding_geometry(image, finding.region, finding.heatmap, finding.peak, 160)


def test_bilateral_regions_sit_on_their_discs(with_localiser: Predictor) -> None:
    image = PreparedImage(_discs(300, 500, [(130, 150), (370, 150)], 50), None, "bilateral")
    assert with_localiser.localiser is not None
    joints = with_localiser.localiser.locate(image)
    assert len(joints) == 2
    for joint, (x, y) in zip(joints, [(130, 150), (370, 150)], strict=True):
        assert abs(joint.centre[0] - x) < 20 and abs(joint.centre[1] - y) < 20


# --- the trained localiser on composed radiographs -----------------------------------------


@dataclass(frozen=True)
class _Truth:
    x: float
    y: float
    side: float
    laterality: str


def _trained() -> KneeLocaliser:
    path = next((p for p in TRAINED if p.is_file()), None)
    if path is None:  # models/knee-kl/localiser.safetensors is tracked in git: never absent
        pytest.fail(f"no trained localiser weights at {' or '.join(str(p) for p in TRAINED)}")
    return KneeLocaliser.load(path, sha256_of(path))


def _held_out_crops() -> dict[str, list[np.ndarray]]:
    if not DATA.is_dir():
        pytest.skip(f"the knee crops are not at {DATA}")
    from dicomnode.imaging.pixels import read_image_file
    from dicomnode.training.localiser import crop_files

    files = crop_files(DATA, holdout=True)[:160]
    crops: dict[str, list[np.ndarray]] = {"L": [], "R": []}
    for path in files:
        crops[path.stem[-1]].append(read_image_file(path).pixels)
    return crops


def _resize(pixels: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.rint(pixels * 255).astype(np.uint8))
    return np.asarray(image.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32) / 255


def _compose(
    rng: np.random.Generator, crops: dict[str, list[np.ndarray]], bilateral: bool
) -> tuple[PreparedImage, list[_Truth]]:
    """Crops pasted on a larger dark canvas, with margins; two side by side (R on the left)."""
    if bilateral:
        rows = int(rng.integers(320, 640))
        columns = int(rows * rng.uniform(1.2, 1.6))
        side = int(columns * rng.uniform(0.18, 0.3))
        gap = int(side * rng.uniform(0.15, 0.9))
        spare = columns - 2 * side - gap
        left = int(rng.integers(spare // 8, spare - spare // 8))
        top = int(rng.integers(rows // 8, rows - side - rows // 8))
        places = [
            (left, top, "R"),
            (left + side + gap, top + int(rng.integers(-side // 10, side // 10)), "L"),
        ]
        laterality = None
    else:
        columns = int(rng.integers(300, 520))
        rows = int(columns * rng.uniform(1.1, 1.6))
        side = int(columns * rng.uniform(0.35, 0.7))
        laterality = str(rng.choice(["L", "R"]))
        places = [
            (
                int(rng.integers(8, columns - side - 8)),
                int(rng.integers(8, rows - side - 8)),
                laterality,
            )
        ]
    pixels = rng.uniform(0.0, 0.2) + rng.normal(0.0, 0.02, (rows, columns))
    truths = []
    for x0, y0, side_of in places:
        pool = crops[side_of]
        pixels[y0 : y0 + side, x0 : x0 + side] = _resize(pool[int(rng.integers(len(pool)))], side)
        truths.append(_Truth(x0 + side / 2, y0 + side / 2, side, side_of))
    image = PreparedImage(np.clip(pixels, 0, 1).astype(np.float32), laterality, "composed")
    return image, truths


def _score(joints: tuple[Joint, ...], truths: list[_Truth]) -> tuple[int, int, list[float]]:
    """Joints within 15 % of the crop side of a true centre, how many of them with the right
    laterality, and the relative side errors of the hits."""
    hits, lateral, side_errors = 0, 0, []
    for truth in truths:
        best = min(joints, key=lambda j: np.hypot(j.centre[0] - truth.x, j.centre[1] - truth.y))
        if np.hypot(best.centre[0] - truth.x, best.centre[1] - truth.y) <= 0.15 * truth.side:
            hits += 1
            lateral += best.laterality == truth.laterality
            side_errors.append(best.region.width / truth.side - 1)
    return hits, lateral, side_errors


def test_trained_localiser_finds_joints_on_composed_images() -> None:
    localiser = _trained()
    crops = _held_out_crops()
    rng = np.random.default_rng(20261125)
    joints_total = hits = lateral = 0
    side_errors: list[float] = []
    for index in range(60):
        image, truths = _compose(rng, crops, bilateral=index % 2 == 0)
        found = localiser.locate(image)
        got, right, errors = _score(found, truths)
        joints_total += len(truths)
        hits, lateral, side_errors = hits + got, lateral + right, side_errors + errors
    rate = hits / joints_total
    print(
        f"\ntrained localiser: {hits}/{joints_total} joints hit ({rate:.1%}), "
        f"{lateral}/{hits} with the right laterality, "
        f"median |side error| {np.median(np.abs(side_errors)):.1%}"
    )
    assert rate >= 0.9, f"hit rate {rate:.1%}"
    assert lateral == hits


def test_trained_localiser_on_a_real_lower_leg_radiograph() -> None:
    """pydicom-data's ``RG3`` (NEMA WG04 set): a CR of a right tibia and ankle, AP, with
    bright collimation and an "R" marker; the knee is out of view, so no joint may be
    reported as certain."""
    localiser = _trained()
    pytest.importorskip("data_store", reason="the pydicom-data package is not installed")
    import pydicom
    from pydicom.data import get_testdata_file

    from dicomnode.imaging.pixels import prepare_dataset

    path = get_testdata_file("RG3_UNCR.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data does not hold RG3_UNCR.dcm")
    dataset = pydicom.dcmread(path)
    assert (dataset.Modality, dataset.BodyPartExamined) == ("CR", "EXTREMITY")
    image = prepare_dataset(dataset, "RG3_UNCR")
    joints = localiser.locate(image)
    print(f"\nRG3 (lower leg, no knee): {joints}")
    # No joint found (then the image is not graded), or none reported as certain.
    assert all(joint.uncertain for joint in joints)
