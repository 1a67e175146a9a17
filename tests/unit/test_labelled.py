"""dicomnode label-export: a training folder from a PACS export and a label sheet."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import UID, generate_uid
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.errors import ConfigError
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.training.data import scan_folder
from dicomnode.training.labelled import match, read_export, read_sheet, write_folder

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
) -> Path:
    """One file of a PACS export: ``PATIENT/STUDY/SERIES/<SOP Instance UID>``, no suffix."""
    ds = make_radiograph(
        rows=64, columns=48, laterality=laterality, modality=modality, seed=seed,
        patient_id=patient, study_uid=f"1.2.826.0.1.3680043.8.498.{sum(map(ord, accession))}",
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
    Processing image; ACC2: a CR image; ACC3: a DX image the sheet does not grade; a text
    file and a DICOMDIR."""
    root = tmp_path / "export"
    _image(root, "ACC1", "PAT-A", laterality="R", seed=1)
    _image(root, "ACC1", "PAT-A", laterality="L", seed=2)
    _image(root, "ACC1", "PAT-A", sop_class=SECONDARY_CAPTURE, seed=3)
    _image(root, "ACC1", "PAT-A", sop_class=DX_FOR_PROCESSING, seed=4)
    _image(root, "ACC2", "PAT-B", modality="CR", laterality=None, seed=5)
    _image(root, "ACC3", "PAT-C", seed=6)
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
    matched = match(sheet, found)
    assert matched.per_class(4) == [1, 0, 1, 1]
    assert matched.rows_unmatched == (6,)  # ACC9, line 6 (line 1 is the header)
    assert matched.files_unmatched == 1  # ACC3
    assert not matched.ambiguous
    sides = {label: file.laterality for file, label in matched.images}
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
    assert [(file.laterality, label) for file, label in matched.images] == [("R", 2)]


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
    assert sorted(p.parent.parent.parent.parent.name for p in out.rglob("*") if p.is_file()) == [
        "0", "1", "1",
    ]  # fmt: skip
    dry = CliRunner().invoke(
        app,
        ["label-export", str(export), str(sheet), "--out", str(tmp_path / "dry"), "--dry-run"],
    )
    assert dry.exit_code == 1 and not (tmp_path / "dry").exists()
