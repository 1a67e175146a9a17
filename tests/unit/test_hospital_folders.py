"""A labelled folder as a hospital brings it: a PACS export, nested, named by UID, untidy.

``dicomnode train`` and ``dicomnode evaluate`` read ``DATA/<class>/`` the same way
(:func:`~dicomnode.training.data.scan_folder`); what they cannot use they name, all of it
at once, and what they skip they say.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.errors import ConfigError, ImagingError
from dicomnode.imaging.pixels import read_dicom, read_image_file
from dicomnode.pipeline import read_and_prepare
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.training.config import DEFAULT_GROUP_PATTERN
from dicomnode.training.data import (
    LabelledImages,
    PixelCache,
    cache_key,
    scan_folder,
    warn_if_one_patient_dominates,
)
from dicomnode.training.evaluate import evaluate_model


def _bare(path: Path, **kwargs: object) -> Path:
    """A dataset written without the PS3.10 preamble and meta header (older exports)."""
    dataset = pydicom.Dataset(make_radiograph(rows=32, columns=32, **kwargs))  # type: ignore[arg-type]
    assert not hasattr(dataset, "file_meta")  # the copy has the data set alone
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, dataset, implicit_vr=True, little_endian=True)
    return path


def _image(path: Path, seed: int = 0, patient_id: str = "P1", **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = make_radiograph(rows=32, columns=32, seed=seed, patient_id=patient_id, **kwargs)  # type: ignore[arg-type]
    return write_dataset(image, path)


def _export(root: Path) -> Path:
    """Class 0 nested as a PACS writes it, named by UID and number; class 1 flat."""
    series = root / "0" / "PAT1" / "STUDY1" / "SERIES1"
    _image(series / "1.2.826.0.1.3680043.8.498.17.320", seed=1)
    _image(series / "IM0001.IMA", seed=2)
    _bare(series / "IM0002", seed=3, patient_id="P1")  # no preamble, no suffix
    _image(root / "1" / "a.dcm", seed=4, patient_id="P2")
    _image(root / "1" / "b.dcm", seed=5, patient_id="P3")
    return root


def test_a_pacs_export_is_read_nested_and_named_by_uid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _export(tmp_path / "export")
    series = data / "0" / "PAT1" / "STUDY1" / "SERIES1"
    (series / "DICOMDIR").write_bytes(b"not read")
    (series / "notes.txt").write_text("reader notes")
    (series / ".DS_Store").write_bytes(b"\0")
    os.symlink(series, data / "1" / "linked-series")
    os.symlink(data / "missing.dcm", data / "1" / "broken.dcm")
    with caplog.at_level(logging.WARNING, logger="dicomnode.training.data"):
        images = scan_folder(data, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    names = [p.relative_to(data).as_posix() for p in images.paths]
    assert names == [
        "0/PAT1/STUDY1/SERIES1/1.2.826.0.1.3680043.8.498.17.320",
        "0/PAT1/STUDY1/SERIES1/IM0001.IMA",
        "0/PAT1/STUDY1/SERIES1/IM0002",
        "1/a.dcm",
        "1/b.dcm",
    ]
    assert list(images.labels) == [0, 0, 0, 1, 1]
    assert len(set(images.groups[:3])) == 1 and len(set(images.groups)) == 3
    assert "0/PAT1/STUDY1/SERIES1/DICOMDIR" in caplog.text
    assert "0/PAT1/STUDY1/SERIES1/notes.txt" in caplog.text
    assert "1/linked-series" in caplog.text and "1/broken.dcm" in caplog.text
    assert ".DS_Store" not in caplog.text
    for path in images.paths:  # each is read, the bare dataset too
        assert read_image_file(path).pixels.shape == (32, 32)


def test_the_pixel_cache_is_not_reused_for_another_folder_or_a_changed_file(
    tmp_path: Path,
) -> None:
    first = _export(tmp_path / "first")
    other = tmp_path / "other"  # the same names and sizes, other pixels
    for path in sorted(first.rglob("*")):
        if path.is_file():
            target = other / path.relative_to(first)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    for path in (other / "1").glob("*.dcm"):
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
        dataset.PixelData = (pixels.max() - pixels).astype(pixels.dtype).tobytes()
        dataset.save_as(path)
    images = scan_folder(first, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    others = scan_folder(other, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    assert [p.stat().st_size for p in images.paths] == [p.stat().st_size for p in others.paths]
    assert cache_key(images, (32, 32)) != cache_key(others, (32, 32))
    cache = tmp_path / "cache"
    a = PixelCache.build(images, cache, (32, 32))
    b = PixelCache.build(others, cache, (32, 32))
    assert not np.array_equal(a.pixels(3), b.pixels(3))
    # A file changed in place, its size the same: decoded again.
    changed = images.paths[3]
    dataset = pydicom.dcmread(changed)
    dataset.PixelData = np.ascontiguousarray(dataset.pixel_array[::-1]).tobytes()  # upside down
    dataset.save_as(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    again = PixelCache.build(images, cache, (32, 32))
    assert not np.array_equal(a.pixels(3), again.pixels(3))


def test_every_file_without_a_patient_id_is_named_at_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "0" / "a.dcm", patient_id="P1")
    _image(data / "0" / "none.dcm", patient_id="")
    _image(data / "1" / "empty.dcm", patient_id=" ")
    with pytest.raises(ConfigError) as raised:
        scan_folder(data, 2, DEFAULT_GROUP_PATTERN, group_by="patient_id")
    message = str(raised.value)
    assert message.startswith(f"2 of 3 files in {data} cannot be grouped by patient")
    assert "0/none.dcm: no DICOM Patient ID" in message
    assert "1/empty.dcm: no DICOM Patient ID" in message


def test_one_patient_holding_more_than_a_folds_share_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def folder(groups: list[str]) -> LabelledImages:
        paths = tuple(Path(f"{i}.dcm") for i in range(len(groups)))
        labels = np.zeros(len(groups), dtype=np.int64)
        return LabelledImages(Path("."), paths, labels, tuple(groups))

    anonymised = folder(["ANONYMOUS"] * 16 + ["P1", "P2", "P3", "P4"])
    with caplog.at_level(logging.WARNING, logger="dicomnode.training.data"):
        assert warn_if_one_patient_dominates(anonymised, 5)
    assert "one patient holds 16 of the 20 images, more than a fold's share (4)" in caplog.text
    assert "ANONYMOUS" not in caplog.text  # a group is never named
    assert not warn_if_one_patient_dominates(folder([f"P{i // 2}" for i in range(20)]), 5)


def test_files_that_are_not_images_say_what_they_are(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    picture = tmp_path / "picture.dcm"
    Image.new("L", (8, 8)).save(picture, format="PNG")
    directory = tmp_path / "DICOMDIR"
    index = pydicom.Dataset()
    index.FileSetID = "EXPORT"
    index.DirectoryRecordSequence = pydicom.Sequence([])
    index.file_meta = pydicom.dataset.FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.1.3.10")
    index.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    index.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index.save_as(directory, enforce_file_format=True)
    note = tmp_path / "README"
    note.write_text("a note about the export\n")
    expected = {
        empty: "an empty file",
        picture: "not a DICOM file",
        directory: "a DICOMDIR",
        note: "neither a picture nor DICOM",
    }
    for path, words in expected.items():
        with pytest.raises(ImagingError, match=words):
            read_image_file(path)


def test_the_node_reads_a_dicom_file_without_its_preamble(tmp_path: Path) -> None:
    """`dicomnode predict` read such a file only when evaluate did: now both do."""
    bare = _bare(tmp_path / "bare.dcm", seed=7)
    prepared = read_and_prepare(bare)
    assert not prepared.error and prepared.image is not None
    assert prepared.sop_uid == str(read_dicom(bare).SOPInstanceUID)
    assert "cannot read" in str(read_and_prepare(tmp_path / "missing.dcm").error)


def test_evaluate_names_every_unusable_file_and_the_images_the_node_would_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model"
    make_tiny_model(model, input_size=(32, 32))
    data = tmp_path / "data"
    for index in range(3):
        _image(data / "0" / f"ok{index}.dcm", seed=index)
        _image(data / "1" / f"ok{index}.dcm", seed=10 + index)
    (data / "0" / "zero.dcm").write_bytes(b"")
    (data / "1" / "README").write_text("note")
    with pytest.raises(ConfigError) as raised:
        evaluate_model(model, data)
    message = str(raised.value)
    assert message.startswith(f"2 of 8 files in {data} cannot be evaluated")
    assert "0/zero.dcm: an empty file" in message and "1/README" in message
    # A Secondary Capture of a radiograph: the model grades it, the node would not.
    (data / "0" / "zero.dcm").unlink()
    (data / "1" / "README").unlink()
    capture = make_radiograph(rows=32, columns=32, seed=30)
    capture.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    capture.file_meta.MediaStorageSOPClassUID = capture.SOPClassUID
    write_dataset(capture, data / "1" / "capture.dcm")
    with caplog.at_level(logging.WARNING, logger="dicomnode.training.evaluate"):
        metrics = evaluate_model(model, data)
    assert metrics["n"] == 7
    assert "1 of 7 files are DICOM images the node does not analyse" in caplog.text
    assert "1/capture.dcm (not a radiograph SOP class (Secondary Capture" in caplog.text
