"""A training folder from a PACS export and a label sheet (``dicomnode label-export``).

A hospital's labels rarely come as class folders. A radiologist grades studies in a
spreadsheet by accession number; the PACS exports the studies as nested DICOM files named
by UID. :func:`read_sheet` reads the sheet (CSV: a ``label`` column of class indices and
one key column: ``accession_number``, ``study_instance_uid``, ``series_instance_uid``,
``sop_instance_uid`` or ``path``, relative to the export; optionally ``laterality``, R or
L, for a label of one side), :func:`read_export` the export's headers, :func:`match` pairs
them, and :func:`write_folder` links (or copies) each matched image into
``DATA/<label>/`` under its path in the export, the layout ``dicomnode train`` reads.

Only what the node analyses is taken: CR and DX For Presentation images of the default
routing's modalities. A study's export also holds what the node must not learn from
(its own Secondary Capture overlays and SRs, a For Processing image, a scanned request),
all under the study's accession number; they are counted by kind and left out. Nothing
read from a header (an accession number, a Patient ID) is printed or logged: rows are
named by their line in the sheet, files by their count.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dicomnode.config import RoutingSettings
from dicomnode.errors import ConfigError, ImagingError
from dicomnode.imaging.pixels import PICTURE_SUFFIXES, read_dicom
from dicomnode.studies import not_a_radiograph
from dicomnode.training.data import hashed, listed, may_be_an_image, walk_files

if TYPE_CHECKING:  # the localiser's module loads torch
    from dicomnode.models.localise import Joint

KEY_TAGS = {
    "accession_number": "AccessionNumber",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
}
"""The sheet's key columns read from each file's header (``path`` is the file's own)."""
PATH_KEY = "path"
KEYS = (*KEY_TAGS, PATH_KEY)
SIDES = frozenset({"R", "L"})

Transfer = Literal["link", "copy"]
Shown = Callable[[Sequence[Any]], Iterable[Any]]
"""What a long loop goes through its items with: ``iter``, or a progress bar's ``track``."""


@dataclass(frozen=True)
class LabelRow:
    """One row of the sheet: its line (1 = the header), key, class index and side."""

    line: int
    key: str
    label: int
    laterality: str = ""


@dataclass(frozen=True)
class LabelSheet:
    """The sheet's key column and rows."""

    key: str
    rows: tuple[LabelRow, ...]

    @property
    def classes(self) -> int:
        return max(row.label for row in self.rows) + 1


@dataclass(frozen=True)
class ExportFile:
    """An image of the export: its path relative to the export, its keys, side and patient
    (:func:`~dicomnode.training.data.patient_group`'s hash of the Patient ID; "" if none)."""

    path: str
    keys: tuple[tuple[str, str], ...]
    laterality: str = ""
    patient: str = ""

    def key(self, column: str) -> str:
        return self.path if column == PATH_KEY else dict(self.keys).get(column, "")


@dataclass(frozen=True)
class Export:
    """The images of the export in ``root`` that may be trained on, and what was left out,
    by kind."""

    root: Path
    files: tuple[ExportFile, ...]
    left_out: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Labelled:
    """An image (or one knee joint of it) to write: its label, the sheet line that gave it,
    and its name under ``<out>/<label>/``."""

    file: ExportFile
    label: int
    line: int
    name: str
    joint: Joint | None = None


@dataclass(frozen=True)
class Matched:
    """The sheet matched to the export: the images to write, the rows that matched no image
    (by line), the images that matched none, those two rows of different labels claim (by
    path), and what else was left out (joints, by reason)."""

    images: tuple[Labelled, ...]
    rows_unmatched: tuple[int, ...]
    files_unmatched: int
    ambiguous: tuple[str, ...] = ()
    left_out: tuple[tuple[str, int], ...] = ()

    def per_class(self, classes: int) -> list[int]:
        counts = Counter(image.label for image in self.images)
        return [counts.get(c, 0) for c in range(classes)]


# ----------------------------------------------------------------------------- the sheet


def read_sheet(path: Path) -> LabelSheet:
    """Read a label sheet (comma- or semicolon-separated, as spreadsheets save CSV).

    Raises
    ------
    ConfigError
        When it has no ``label`` column, not exactly one key column, a label that is not a
        class index, a row without a key, a side other than R or L, or one key (and side)
        given two labels; each naming the lines.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the label sheet {path}: {exc}") from exc
    lines = text.splitlines()
    if not lines:
        raise ConfigError(f"{path} is empty: it needs a header row")
    delimiter = ";" if lines[0].count(";") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    columns = [c.strip().lower() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    key = _key_column(columns, path)
    rows = tuple(_rows(reader, key, path))
    if not rows:
        raise ConfigError(f"{path} has a header but no rows")
    _refuse_conflicts(rows, path)
    return LabelSheet(key, rows)


def _key_column(columns: Sequence[str], path: Path) -> str:
    if "label" not in columns:
        raise ConfigError(f"{path} has no 'label' column (its columns: {', '.join(columns)})")
    keys = [c for c in columns if c in KEYS]
    if len(keys) != 1:
        raise ConfigError(
            f"{path} needs exactly one key column of {', '.join(KEYS)}; it has "
            f"{', '.join(keys) or 'none'}"
        )
    return keys[0]


def _rows(reader: csv.DictReader[str], key: str, path: Path) -> list[LabelRow]:
    rows: list[LabelRow] = []
    problems: list[str] = []
    for raw in reader:
        number = reader.line_num  # the file's line: blank lines count, as an editor shows
        value = (raw.get(key) or "").strip()
        label = (raw.get("label") or "").strip()
        side = (raw.get("laterality") or "").strip().upper()
        if not value and not label:
            continue  # a row of empty cells
        if not value:
            problems.append(f"line {number}: no {key}")
        elif not label.isdigit():
            problems.append(f"line {number}: label {label!r} is not a class index (0, 1, …)")
        elif side and side not in SIDES:
            problems.append(f"line {number}: laterality {side!r} is not R or L")
        else:
            rows.append(LabelRow(number, _normal(key, value), int(label), side))
    if problems:
        raise ConfigError(f"{path}: {listed(problems)}")
    return rows


def _normal(key: str, value: str) -> str:
    return Path(value.replace("\\", "/")).as_posix() if key == PATH_KEY else value


def _refuse_conflicts(rows: Sequence[LabelRow], path: Path) -> None:
    labels: dict[tuple[str, str], dict[int, int]] = {}
    for row in rows:
        labels.setdefault((row.key, row.laterality), {}).setdefault(row.label, row.line)
    conflicts = [
        " and ".join(f"line {line}" for line in sorted(found.values()))
        for found in labels.values()
        if len(found) > 1
    ]
    if conflicts:
        raise ConfigError(f"{path}: one key given different labels on {listed(conflicts)}")


# ----------------------------------------------------------------------------- the export


def read_export(root: Path, *, pictures: bool, shown: Shown = iter) -> Export:
    """The images under ``root`` that the node would analyse, with their keys.

    ``pictures``: PNG, WebP and JPEG files are taken too (a sheet keyed by ``path``);
    else they are left out, having no header to match. ``shown`` wraps the files as they
    are read (a progress bar).
    """
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    files, _ = walk_files(root)
    taken: list[ExportFile] = []
    left_out: Counter[str] = Counter()
    seen: set[str] = set()
    rules = RoutingSettings()
    for path in shown(files):
        relative = path.relative_to(root).as_posix()
        if not may_be_an_image(path):
            left_out["not an image (a DICOMDIR, a text file)"] += 1
        elif path.suffix.lower() in PICTURE_SUFFIXES:
            if pictures:
                taken.append(ExportFile(relative, ()))
            else:
                left_out["a picture (PNG, WebP, JPEG): no header to match"] += 1
        else:
            found = _dicom_file(path, relative, rules)
            if isinstance(found, str):
                left_out[found] += 1
            elif found.key("sop_instance_uid") in seen:
                left_out["a second copy of an image (its SOP Instance UID taken already)"] += 1
            else:
                seen.add(found.key("sop_instance_uid"))
                taken.append(found)
    return Export(root, tuple(taken), tuple(sorted(left_out.items())))


def _dicom_file(path: Path, relative: str, rules: RoutingSettings) -> ExportFile | str:
    """The file's keys, or why it is left out."""
    try:
        header = read_dicom(path, stop_before_pixels=True)
    except ImagingError:
        return "not DICOM, or unreadable"
    sop_class = str(header.get("SOPClassUID", ""))
    reason = not_a_radiograph(sop_class, str(header.get("Modality", "")).upper(), rules)
    if reason:
        return reason
    keys = tuple((column, _text(header.get(tag))) for column, tag in KEY_TAGS.items())
    side = (_text(header.get("ImageLaterality")) or _text(header.get("Laterality"))).upper()
    patient = _text(header.get("PatientID"))
    return ExportFile(relative, keys, side if side in SIDES else "", patient and hashed(patient))


def _text(value: object) -> str:
    return str(value or "").strip()


# ----------------------------------------------------------------------------- matching


def rows_by_key(sheet: LabelSheet) -> dict[str, list[LabelRow]]:
    """The sheet's rows of each key."""
    by_key: dict[str, list[LabelRow]] = {}
    for row in sheet.rows:
        by_key.setdefault(row.key, []).append(row)
    return by_key


def match(sheet: LabelSheet, export: Export) -> Matched:
    """Each image's label: the row of its key (and side, when the row gives one)."""
    by_key = rows_by_key(sheet)
    images: list[Labelled] = []
    used: set[int] = set()
    ambiguous: list[str] = []
    unmatched = 0
    for file in export.files:
        rows = [
            row
            for row in by_key.get(file.key(sheet.key), [])
            if not row.laterality or row.laterality == file.laterality
        ]
        labels = {row.label for row in rows}
        used.update(row.line for row in rows)
        if not rows:
            unmatched += 1
        elif len(labels) > 1:
            ambiguous.append(file.path)
        else:
            images.append(Labelled(file, labels.pop(), min(r.line for r in rows), file.path))
    return Matched(tuple(images), unused_lines(sheet, used), unmatched, tuple(ambiguous))


def unused_lines(sheet: LabelSheet, used: set[int]) -> tuple[int, ...]:
    """The lines of the rows that gave no image."""
    return tuple(row.line for row in sheet.rows if row.line not in used)


# ----------------------------------------------------------------------------- writing


MANIFEST = "label-export.csv"
"""In the folder made: one row per image written, what it is and where it came from."""
MANIFEST_COLUMNS = (
    "file", "label", "sheet_line", "source", "side", "x0", "y0", "x1", "y1", "confidence",
)  # fmt: skip


def refuse_full(out: Path) -> None:
    """Refuse to write into a folder that holds anything.

    Raises
    ------
    ConfigError
        When ``out`` exists and is not an empty folder.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty: give a new folder")


def write_folder(matched: Matched, export_root: Path, out: Path, transfer: Transfer) -> int:
    """Put each matched image in ``out/<label>/<its path in the export>``, and the
    :data:`MANIFEST`; the count.

    ``link`` makes hard links (no copy; a copy where ``out`` is on another file system).

    Raises
    ------
    ConfigError
        When ``out`` exists and is not an empty folder.
    """
    refuse_full(out)
    for image in matched.images:
        target = out / str(image.label) / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        _transfer(export_root / image.file.path, target, transfer)
    write_manifest(matched, out)
    return len(matched.images)


def write_manifest(matched: Matched, out: Path) -> Path:
    """:data:`MANIFEST` in ``out``: each image's file, label, sheet line and source (for a
    joint crop also its side, box in the source's pixels and the localiser's confidence)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for image in matched.images:
            joint = image.joint
            where: list[object] = ["", "", "", "", "", ""]
            if joint is not None:
                box = joint.region
                side = joint.laterality or ""
                where = [side, box.x0, box.y0, box.x1, box.y1, f"{joint.confidence:.3f}"]
            file = f"{image.label}/{image.name}"
            writer.writerow([file, image.label, image.line, image.file.path, *where])
    return out / MANIFEST


def _transfer(source: Path, target: Path, transfer: Transfer) -> None:
    if transfer == "link":
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
    shutil.copy2(source, target)
