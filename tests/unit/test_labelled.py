"""dicomnode label-export: a training folder from a PACS export and a label sheet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import UID, generate_uid
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.errors import ConfigError, ModelError
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.training.data import scan_folder
from dicomnode.training.labelled import (
    MANIFEST,
    match,
    read_export,
    read_sheet,
    write_folder,
    write_manifest,
)
from dicomnode.values import FloatArray, Region

ROOT = Path(__file__).parents[2]
KNEE_CROPS = ROOT.parent / "shared" / "data" / "knee-kl224-train"

SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
DX_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")


def _image(
    folder: Path,
    accession: str,
    patient: str,
    *,
    laterality: str | None = "R",
    modality: str = "DX",
    sop_class: UID | None = None,
    seed: int = 0,
    picture: FloatArray | None = None,
) -> Path:
    """One file of a PACS export: ``PATIENT/STUDY/SERIES/<SOP Instance UID>``, no suffix."""
    ds = make_radiograph(
        rows=64, columns=48, laterality=laterality, modality=modality, seed=seed,
        patient_id=patient, study_uid=f"1.2.826.0.1.3680043.8.498.{sum(map(ord, accession))}",
        picture=picture,
    )  # fmt: skip
    ds.AccessionNumber = accession
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = "OT" if sop_class == SECONDARY_CAPTURE else modality
    path = folder / patient / accession / generate_uid() / ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dataset(ds, path)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """Study ACC1: the right and left knee (DX), the node's own overlay (SC) and a For
    Processing image; ACC2: a CR image, exported twice; ACC3: a DX image the sheet does not
    grade; a text file and a DICOMDIR."""
    root = tmp_path / "export"
    _image(root, "ACC1", "PAT-A", laterality="R", seed=1)
    _image(root, "ACC1", "PAT-A", laterality="L", seed=2)
    _image(root, "ACC1", "PAT-A", sop_class=SECONDARY_CAPTURE, seed=3)
    _image(root, "ACC1", "PAT-A", sop_class=DX_FOR_PROCESSING, seed=4)
    _image(root, "ACC3", "PAT-C", seed=6)
    copy = root / "PAT-B" / "again" / "IM0001"  # the CR exported twice
    copy.parent.mkdir(parents=True)
    copy.write_bytes(
        _image(root, "ACC2", "PAT-B", modality="CR", laterality=None, seed=5).read_bytes()
    )
    (root / "README.txt").write_text("exported by the PACS\n", encoding="utf-8")
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    return root


def _sheet(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")  # Excel's CSV starts with a BOM
    return path


def test_an_export_and_a_sheet_by_accession_and_side_make_the_class_folders(
    tmp_path: Path, export: Path
) -> None:
    sheet = read_sheet(
        _sheet(
            tmp_path,
            "Accession_Number;Label;Laterality\nACC1;2;R\nACC1;3;l\n\nACC2;0;\nACC9;1;\n",
        )
    )
    assert sheet.key == "accession_number" and sheet.classes == 4
    found = read_export(export, pictures=False)
    left_out = dict(found.left_out)
    assert left_out["not a radiograph SOP class (Secondary Capture Image Storage)"] == 1
    assert sum(n for kind, n in left_out.items() if "For Processing" in kind) == 1
    assert left_out["not an image (a DICOMDIR, a text file)"] == 2
    assert left_out["a second copy of an image (its SOP Instance UID taken already)"] == 1
    matched = match(sheet, found)
    assert matched.per_class(4) == [1, 0, 1, 1]
    assert matched.rows_unmatched == (6,)  # ACC9, line 6 (line 1 is the header)
    assert matched.files_unmatched == 1  # ACC3
    assert not matched.ambiguous
    sides = {image.label: image.file.laterality for image in matched.images}
    assert sides == {2: "R", 3: "L", 0: ""}

    out = tmp_path / "data"
    assert write_folder(matched, export, out, "link") == 3
    images = scan_folder(out, 4, r"^(?P<group>.+)$", "patient_id", every_class=False)
    assert sorted(images.labels.tolist()) == [0, 2, 3]
    assert len(set(images.groups)) == 2  # PAT-A's two knees are one patient
    for path in images.paths:
        source = export / path.relative_to(out / path.relative_to(out).parts[0])
        assert path.stat().st_ino == source.stat().st_ino  # linked, not copied


def test_a_row_for_the_study_and_one_for_a_side_leave_that_image_out(
    tmp_path: Path, export: Path
) -> None:
    sheet = read_sheet(_sheet(tmp_path, "accession_number,label,laterality\nACC1,2,\nACC1,3,L\n"))
    matched = match(sheet, read_export(export, pictures=False))
    assert len(matched.ambiguous) == 1 and matched.ambiguous[0].startswith("PAT-A/ACC1/")
    assert [(image.file.laterality, image.label) for image in matched.images] == [("R", 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("accession_number,grade\nACC1,2\n", "no 'label' column"),
        ("accession_number,path,label\nACC1,a,2\n", "exactly one key column"),
        ("patient_name,label\nDoe,2\n", "it has none"),
        ("accession_number,label\nACC1,KL2\nACC2,-1\n", "line 2: label 'KL2' is not a class"),
        ("accession_number,label\n,2\n", "line 2: no accession_number"),
        ("accession_number,label,laterality\nACC1,2,B\n", "laterality 'B' is not R or L"),
        ("accession_number,label\nACC1,2\nACC2,1\nACC1,3\n", "line 2 and line 4"),
        ("accession_number,label\n", "a header but no rows"),
        ("", "is empty"),
    ],
)
def test_a_sheet_that_cannot_say_each_images_class_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_sheet(_sheet(tmp_path, text))


def test_pictures_are_matched_by_path_and_a_full_folder_is_not_written_over(
    tmp_path: Path,
) -> None:
    from PIL import Image

    root = tmp_path / "pictures"
    (root / "site-1").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("L", (16, 16), 90).save(root / "site-1" / name)
    sheet = read_sheet(_sheet(tmp_path, "path,label\nsite-1\\a.png,1\n./site-1/b.png,0\n"))
    assert read_export(root, pictures=False).files == ()
    matched = match(sheet, read_export(root, pictures=True))
    assert matched.per_class(2) == [1, 1] and not matched.rows_unmatched
    out = tmp_path / "data"
    write_folder(matched, root, out, "copy")
    assert (out / "1" / "site-1" / "a.png").is_file()
    assert (out / "0" / "site-1" / "b.png").stat().st_ino != (root / "site-1/b.png").stat().st_ino
    with pytest.raises(ConfigError, match="exists and is not empty"):
        write_folder(matched, root, out, "copy")


def test_the_command_names_rows_by_line_and_never_prints_a_header_value(
    tmp_path: Path, export: Path
) -> None:
    sheet = _sheet(tmp_path, "accession_number,label\nACC1,1\nACC2,0\nACC-MISSING,1\n")
    out = tmp_path / "data"
    result = CliRunner().invoke(
        app, ["label-export", str(export), str(sheet), "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1, result.output  # a row matched nothing
    assert "lines 4 of" in result.output
    assert "3 images linked into" in result.output
    for private in ("ACC-MISSING", "PAT-A", "PAT-B"):
        assert private not in result.output
    written = [p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert sorted(p.relative_to(out).parts[0] for p in written) == ["0", "1", "1"]
    with (out / MANIFEST).open(encoding="utf-8") as handle:
        manifest = list(csv.DictReader(handle))
    assert sorted((row["label"], row["sheet_line"]) for row in manifest) == [
        ("0", "3"), ("1", "2"), ("1", "2"),
    ]  # fmt: skip
    assert all(
        (out / row["file"]).is_file() and (export / row["source"]).is_file() for row in manifest
    )
    dry = CliRunner().invoke(
        app,
        ["label-export", str(export), str(sheet), "--out", str(tmp_path / "dry"), "--dry-run"],
    )
    assert dry.exit_code == 1 and not (tmp_path / "dry").exists()


def test_each_knee_joint_of_the_films_is_cropped_and_labelled_by_its_sides_row(
    tmp_path: Path,
) -> None:
    """``--joints``: films composed of held-out real knee crops, two knees on ACC1 and ACC3,
    one (a right knee) on ACC2; the sheet grades ACC1 per side, ACC2 as a whole and only
    the left knee of ACC3. Each graded joint becomes a crop of the node's pixels around it,
    named by the patient's hash, in its grade's folder; the others are counted."""
    if not KNEE_CROPS.is_dir():
        pytest.skip(f"the knee crops are not at {KNEE_CROPS}")
    from dicomnode.imaging.pixels import read_image_file
    from dicomnode.models.localise import crop_region
    from dicomnode.training.joint_crops import (
        CROP_GROUP_PATTERN,
        CROP_LEVELS,
        crop_joints,
        model_localiser,
        png_writer,
    )
    from dicomnode.training.localiser import compose, crop_files, load_bank

    bank = load_bank(crop_files(KNEE_CROPS, holdout=True)[:40])
    rng = np.random.default_rng(7)
    root = tmp_path / "export"
    truths: dict[str, tuple[tuple[float, float], ...]] = {}
    for accession, patient, count, laterality in (
        ("ACC1", "PAT-A", 2, None), ("ACC2", "PAT-B", 1, "R"), ("ACC3", "PAT-A", 2, None),
    ):  # fmt: skip
        film = compose(bank, rng, joints=count)
        path = _image(root, accession, patient, laterality=laterality, picture=film.pixels)
        truths[path.relative_to(root).as_posix()] = film.centres
    broken = _image(root, "ACC4", "PAT-C", laterality="R")  # a film whose pixels are cut short
    broken.write_bytes(broken.read_bytes()[:-2000])
    sheet = read_sheet(
        _sheet(
            tmp_path,
            "accession_number,label,laterality\nACC1,2,R\nACC1,4,L\nACC2,1,\nACC3,3,L\nACC4,0,R\n",
        )
    )
    out = tmp_path / "crops"
    matched = crop_joints(
        sheet,
        read_export(root, pictures=False),
        model_localiser(ROOT / "models" / "knee-kl"),
        png_writer(out),
    )
    write_manifest(matched, out)
    assert matched.per_class(5) == [0, 1, 1, 1, 1]
    broken_film, unsided = matched.left_out  # sorted by kind
    assert unsided == ("a joint whose side has no row (a row of the film grades it only alone)", 1)
    assert broken_film[0].startswith("a film whose pixels cannot be used") and broken_film[1] == 1
    assert matched.rows_unmatched == (6,)  # ACC4's row: its film was left out
    named = {(image.label, image.name[-5:]) for image in matched.images}
    assert named == {(2, "R.png"), (4, "L.png"), (1, "R.png"), (3, "L.png")}
    with (out / MANIFEST).open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:  # each box is centred on a knee of its film, and the crop is that box
        x = (int(row["x0"]) + int(row["x1"])) / 2
        y = (int(row["y0"]) + int(row["y1"])) / 2
        side = int(row["x1"]) - int(row["x0"])
        assert min(np.hypot(x - cx, y - cy) for cx, cy in truths[row["source"]]) < 0.15 * side
        with Image.open(out / row["file"]) as crop:
            assert crop.size == (side, side) and crop.mode == "I;16"
        # The crop holds the node's pixels of the box, to a step of 1/65535.
        source = read_image_file(root / row["source"]).pixels
        box = Region(*(int(row[k]) for k in ("x0", "y0", "x1", "y1")))
        held = read_image_file(out / row["file"]).pixels
        assert np.abs(held - crop_region(source, box)).max() <= 0.5 / CROP_LEVELS + 1e-6
        assert len(np.unique(held)) > 256  # more grey levels than 8 bits hold
    images = scan_folder(out, 5, CROP_GROUP_PATTERN, every_class=False)
    assert len(images) == 4 and len(set(images.groups)) == 2  # PAT-A's three knees: one group
    command = ["label-export", str(root), str(tmp_path / "labels.csv"), "--out", str(out)]
    dry = CliRunner().invoke(
        app, [*command, "--joints", str(ROOT / "models" / "knee-kl"), "--dry-run"]
    )
    assert dry.exit_code == 1, dry.output  # ACC4's row: no joint of its film was taken
    assert "lines 6 of" in dry.output
    assert "left out: 1 × a joint whose side has no row" in " ".join(dry.output.split())
    refused = CliRunner().invoke(app, [*command, "--joints", str(ROOT / "models" / "hand-ra")])
    assert isinstance(refused.exception, ModelError)  # main() prints it, exit status 2
    assert "has no knee localiser" in str(refused.exception)
