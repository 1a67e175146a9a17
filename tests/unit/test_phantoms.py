"""Phantom generator: determinism, labels, masks where lesions are, statistics, files."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.errors import ConfigError
from dicomnode.imaging.pixels import read_image_file
from dicomnode.testing.images import write_dataset
from dicomnode.training.data import scan_folder
from dicomnode.training.phantoms import (
    CSV_COLUMNS,
    GROUP_PATTERN,
    Phantom,
    generate_hand,
    generate_spine,
    plan_cases,
    write_phantom_folder,
)
from dicomnode.training.phantoms.cli import phantoms_command
from dicomnode.training.phantoms.common import Frame, dilate
from dicomnode.training.phantoms.dataset import generate_case, to_dicom
from dicomnode.training.phantoms.hand import JointSpace

SIZE = 192
DCIODVFY = Path("/usr/bin/dciodvfy")

Generator = Callable[..., Phantom]


def hand(side: str) -> Generator:
    def generate(seed: int, *, abnormal: bool = False, with_lesion: bool = True) -> Phantom:
        return generate_hand(
            seed, laterality=side, size=SIZE, abnormal=abnormal, with_lesion=with_lesion
        )

    return generate


def spine(view: str) -> Generator:
    def generate(seed: int, *, abnormal: bool = False, with_lesion: bool = True) -> Phantom:
        return generate_spine(
            seed, view=view, size=SIZE, abnormal=abnormal, with_lesion=with_lesion
        )

    return generate


KINDS = {
    "hand-R": hand("R"),
    "hand-L": hand("L"),
    "spine-AP": spine("AP"),
    "spine-LAT": spine("LAT"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_the_seed_decides_everything(kind: str) -> None:
    first, again = KINDS[kind](7, abnormal=True), KINDS[kind](7, abnormal=True)
    np.testing.assert_array_equal(first.pixels, again.pixels)
    np.testing.assert_array_equal(first.lesion_mask, again.lesion_mask)
    assert first.lesion == again.lesion
    assert not np.array_equal(first.pixels, KINDS[kind](8, abnormal=True).pixels)


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_empty_exactly_for_normal_images(kind: str) -> None:
    for seed in range(3):
        normal = KINDS[kind](seed)
        abnormal = KINDS[kind](seed, abnormal=True)
        assert (normal.label, normal.lesion, bool(normal.lesion_mask.any())) == (0, "", False)
        assert abnormal.label == 1 and abnormal.lesion and abnormal.lesion_mask.any()
        assert normal.pixels.dtype == np.float32 and normal.pixels.shape == (SIZE, SIZE)
        assert normal.pixels.min() >= 0.0 and normal.pixels.max() <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_the_mask_lies_where_the_lesion_was_drawn(kind: str) -> None:
    """Render each abnormal case without its lesion: only the masked pixels differ."""
    for seed in range(6):
        drawn = KINDS[kind](seed, abnormal=True)
        if drawn.lesion.startswith("listhesis"):
            continue  # a slip moves the column above it: see the next test
        twin = KINDS[kind](seed, abnormal=True, with_lesion=False)
        assert twin.label == 0 and not twin.lesion_mask.any()
        difference = np.abs(drawn.pixels - twin.pixels)
        mask = drawn.lesion_mask
        outside = difference[~dilate(mask, 3)]
        assert outside.max() < 0.03, (seed, drawn.lesion)
        assert (difference[mask] > 0.002).mean() > 0.5, (seed, drawn.lesion)


def test_a_listhesis_mask_is_the_slipped_segment() -> None:
    """A slip carries the column above it; the mask is the one level where it slips."""
    found = 0
    for seed in range(14):
        drawn = generate_spine(seed, view="LAT", size=SIZE, abnormal=True)
        if not drawn.lesion.startswith("listhesis"):
            continue
        twin = generate_spine(seed, view="LAT", size=SIZE, abnormal=True, with_lesion=False)
        difference = np.abs(drawn.pixels - twin.pixels)
        rows = np.flatnonzero(drawn.lesion_mask.any(axis=1))
        assert difference[rows.max() + 1 :].max() < 0.002, seed  # below the level: untouched
        assert difference[: rows.min()].max() > 0.05, seed  # above it: the column moved
        assert (difference[drawn.lesion_mask] > 0.002).mean() > 0.2, seed  # the step is inside
        # half a body, the disc space and half a body: one level, not the column
        assert 25.0 < (rows.max() - rows.min()) * drawn.spacing_mm < 55.0, seed
        found += 1
    assert found >= 4


def test_a_narrowed_joint_space_is_masked_tip_to_tip() -> None:
    """Joint-space narrowing is read across the joint: its mask is the space it had."""
    frame = Frame(size=64, spacing=0.5, centre=(0.0, 0.0), angle=0.3)
    space = JointSpace(proximal=(0.0, -3.0), distal=(0.0, 3.0), half_width=2.0)
    mask = space.mask(frame)
    assert abs(mask.sum() * 0.25 - 6.0 * 4.0) < 2.5  # 6 mm along, 4 mm across
    x, y = frame.grid()
    assert np.all(np.abs(x[mask]) <= 2.0 + 1e-4) and np.all(np.abs(y[mask]) <= 3.0 + 1e-4)


def test_lesion_masks_follow_the_named_site() -> None:
    """A wedge fracture's mask is one vertebra; a scoliosis mask spans a few."""
    heights = {}
    for seed in range(12):
        image = generate_spine(seed, view="LAT", size=SIZE, abnormal=True)
        rows = np.flatnonzero(image.lesion_mask.any(axis=1))
        heights[image.lesion.split()[0]] = (rows.max() - rows.min()) * image.spacing_mm
    assert heights["wedge"] < 45.0  # one body (about 30 mm) with its rim
    scoliosis = generate_spine(0, view="AP", size=SIZE, abnormal=True)
    assert scoliosis.lesion == "scoliosis"
    rows = np.flatnonzero(scoliosis.lesion_mask.any(axis=1))
    assert 60.0 < (rows.max() - rows.min()) * scoliosis.spacing_mm < 160.0


@pytest.mark.parametrize("kind", ["hand-R", "spine-AP", "spine-LAT"])
def test_lesions_do_not_shift_global_statistics(kind: str) -> None:
    """A lesion moves an image's mean far less than images differ from each other."""
    normal = [float(KINDS[kind](seed).pixels.mean()) for seed in range(100, 112)]
    pairs = [
        (KINDS[kind](s, abnormal=True), KINDS[kind](s, abnormal=True, with_lesion=False))
        for s in range(200, 212)
    ]
    abnormal = [float(p.pixels.mean()) for p, _ in pairs]
    shifts = [float(p.pixels.mean() - q.pixels.mean()) for p, q in pairs]
    spread = float(np.std(normal + abnormal))
    assert max(abs(s) for s in shifts) < 0.1 * spread
    assert abs(np.mean(abnormal) - np.mean(normal)) < spread
    assert min(abnormal) < max(normal) and min(normal) < max(abnormal)


def test_plan_balances_labels_by_patient() -> None:
    cases = plan_cases("SPINE", 21, seed=4)
    assert len(cases) == 21
    labels = [c.label for c in cases]
    assert abs(labels.count(1) - labels.count(0)) <= 2
    by_patient: dict[str, set[int]] = {}
    for case in cases:
        by_patient.setdefault(case.id.split("_")[0], set()).add(case.label)
    assert all(len(v) == 1 for v in by_patient.values())
    assert {c.view for c in cases} == {"AP", "LAT"}
    assert {c.laterality for c in plan_cases("HAND", 4, seed=4)} == {"L", "R"}


def test_folder_layout_csv_and_groups(tmp_path: Path) -> None:
    out = write_phantom_folder(tmp_path / "hands", body_part="HAND", count=8, seed=3, size=96)
    with (out / "phantoms.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 8
    assert sum(r["label"] == "1" for r in rows) == 4
    for row in rows:
        image = out / row["label"] / f"{row['id']}.png"
        assert image.is_file()
        assert bool(row["mask"]) == (row["label"] == "1") == bool(row["lesion"])
        assert row["body_part"] == "HAND" and row["view"] == "PA" and row["laterality"] in "LR"
        if row["mask"]:
            mask = read_image_file(out / row["mask"]).pixels
            assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0.0, 1.0} and mask.any()
    images = scan_folder(out, 2, GROUP_PATTERN)
    assert len(images) == 8 and len(set(images.groups)) == 4


def test_pngs_read_back_as_the_phantom(tmp_path: Path) -> None:
    out = write_phantom_folder(tmp_path / "s", body_part="SPINE", count=4, seed=5, size=96)
    for case in plan_cases("SPINE", 4, seed=5):
        expected = generate_case(case, 96).pixels
        read = read_image_file(out / str(case.label) / f"{case.id}.png").pixels
        np.testing.assert_allclose(read, expected, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("body_part", ["HAND", "SPINE"])
def test_dicom_files_pass_dciodvfy(tmp_path: Path, body_part: str) -> None:
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    out = write_phantom_folder(
        tmp_path / body_part, body_part=body_part, count=4, seed=6, size=96, formats=("dcm",)
    )
    files = sorted(out.glob("[01]/*.dcm"))
    assert len(files) == 4
    for path in files:
        result = subprocess.run(
            [str(DCIODVFY), str(path)], capture_output=True, text=True, check=False, timeout=60
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)
        ds = pydicom.dcmread(path)
        assert ds.Manufacturer == "dicomnode phantom"
        assert "SYNTHETIC PHANTOM" in ds.SeriesDescription
        assert 10 <= ds.BitsStored <= 16
        assert ds.BodyPartExamined == ("HAND" if body_part == "HAND" else "LSPINE")
        assert ds.ViewPosition in {"PA", "AP", "LL"}
        assert (ds.ImageLaterality in {"L", "R"}) == (body_part == "HAND")


def test_monochrome1_reads_back_like_monochrome2(tmp_path: Path) -> None:
    case = plan_cases("HAND", 2, seed=9)[0]
    phantom = generate_case(case, 128)
    read = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds = to_dicom(phantom, case, 9, photometric=photometric)
        read[photometric] = read_image_file(write_dataset(ds, tmp_path / f"{photometric}.dcm"))
        stored = ds.pixel_array.astype(np.float64)
        correlation = np.corrcoef(stored.ravel(), phantom.pixels.ravel())[0, 1]
        assert correlation * (1 if photometric == "MONOCHROME2" else -1) > 0.99
    mono1, mono2 = read["MONOCHROME1"].pixels, read["MONOCHROME2"].pixels
    np.testing.assert_allclose(mono1, mono2, atol=2e-3)
    np.testing.assert_allclose(mono1, phantom.pixels, atol=2e-3)  # bone bright, as drawn
    assert read["MONOCHROME1"].laterality == phantom.laterality


def test_command_checks_its_arguments(tmp_path: Path) -> None:
    out = phantoms_command(tmp_path / "p", "spine", 2, 1, 64, ["PNG", "dcm"])
    assert out == tmp_path / "p"
    assert len(list(out.glob("[01]/*.png"))) == 2 and len(list(out.glob("[01]/*.dcm"))) == 2
    bad: list[tuple[str, int, int, list[str]]] = [
        ("knee", 2, 64, ["png"]),
        ("hand", 0, 64, ["png"]),
        ("hand", 2, 16, ["png"]),
        ("hand", 2, 64, ["jpg"]),
    ]
    for body_part, count, size, formats in bad:
        with pytest.raises(ConfigError):
            phantoms_command(tmp_path / "bad", body_part, count, 0, size, formats)


def test_a_phantom_is_consistent_or_not_built() -> None:
    pixels = np.zeros((8, 8), np.float32)
    empty = np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match="abnormal"):
        Phantom(pixels, 1, empty, "HAND", "PA", "L", "erosion MCP2", 0.5, ("L", "H"))
    with pytest.raises(ValueError, match="view"):
        Phantom(pixels, 0, empty, "KNEE", "PA", None, "", 0.5, ("L", "F"))
    phantom = Phantom(pixels, 0, empty, "SPINE", "AP", None, "", 0.5, ("L", "F"))
    with pytest.raises(ValueError):
        phantom.pixels[0, 0] = 1.0


def test_generators_reject_unknown_sides_and_views() -> None:
    with pytest.raises(ValueError, match="laterality"):
        generate_hand(0, laterality="U", size=64)
    with pytest.raises(ValueError, match="view"):
        generate_spine(0, view="PA", size=64)
    with pytest.raises(ValueError, match="size"):
        generate_spine(0, view="AP", size=16)


def test_the_command_writes_dicom_dx_by_default(tmp_path: Path) -> None:
    """`dicomnode phantoms` without --format draws DICOM DX radiographs (and PNG masks)."""
    folder = phantoms_command(tmp_path / "out", "hand", 4, 3, 96, [])
    images = sorted(p.name for p in folder.glob("[01]/*"))
    assert images and all(name.endswith(".dcm") for name in images)
    ds = pydicom.dcmread(next(folder.glob("1/*.dcm")))
    assert ds.Modality == "DX" and ds.BodyPartExamined == "HAND"
    assert list(folder.glob("masks/*.png"))
