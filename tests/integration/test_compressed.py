"""Copies in every transfer syntax decode, and the builder's output is a valid DX.

Uses the real dcmtk tools and dciodvfy (tests skip when they are not installed).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from dicomnode.imaging.pixels import prepare_dataset, read_image_file
from dicomnode.testing import images
from dicomnode.testing.images import (
    LOSSLESS,
    TRANSFER_SYNTAXES,
    compress_copy,
    make_radiograph,
    write_dataset,
)
from dicomnode.testing.validate import dciodvfy_errors

DCIODVFY = Path("/usr/bin/dciodvfy")
DCMTK = shutil.which("dcmcjpeg") is not None or Path("/usr/bin/dcmcjpeg").exists()
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="dcmtk is not installed")

SOURCES: dict[str, dict[str, Any]] = {
    "8bit": {"bits_stored": 8},
    "12bit": {"bits_stored": 12},
    "16bit": {"bits_stored": 16},
    "12bit-signed": {"bits_stored": 12, "signed": True},
    "mono1": {"bits_stored": 12, "photometric": "MONOCHROME1"},
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        name: write_dataset(make_radiograph(rows=128, columns=96, seed=5, **kwargs), folder / name)
        for name, kwargs in SOURCES.items()
    }


def _prepared(path: Path) -> npt.NDArray[np.float32]:
    return read_image_file(path).pixels


@needs_dcmtk
@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_copy_decodes_like_the_original(
    sources: dict[str, Path], tmp_path: Path, source: str, syntax: str
) -> None:
    original = sources[source]
    if syntax == "jpeg-ls-lossy" and SOURCES[source].get("signed"):
        with pytest.raises(ValueError, match="signed"):
            compress_copy(original, tmp_path / "copy.dcm", syntax)
        return
    copy = compress_copy(original, tmp_path / "copy.dcm", syntax)
    assert pydicom.dcmread(copy).file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    expected, actual = _prepared(original), _prepared(copy)
    if syntax in LOSSLESS:
        np.testing.assert_array_equal(actual, expected)
    else:
        assert float(np.abs(actual - expected).mean()) < 0.01
        assert float(np.abs(actual - expected).max()) < 0.1


@needs_dcmtk
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_lossy_copies_are_marked(sources: dict[str, Path], tmp_path: Path, syntax: str) -> None:
    original = pydicom.dcmread(sources["12bit"])
    copy = pydicom.dcmread(compress_copy(sources["12bit"], tmp_path / "copy.dcm", syntax))
    lossy = syntax not in LOSSLESS
    assert (copy.LossyImageCompression == "01") == lossy
    assert (copy.SOPInstanceUID != original.SOPInstanceUID) == lossy


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_pydicom_fallback_without_dcmtk(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str
) -> None:
    monkeypatch.setattr(images, "_dcmtk_tool", lambda name: None)
    target = tmp_path / "copy.dcm"
    if syntax.startswith("jpeg-") and not syntax.startswith("jpeg-ls"):
        with pytest.raises(RuntimeError, match="needs dcmtk"):
            compress_copy(sources["12bit"], target, syntax)
        return
    copy = compress_copy(sources["12bit"], target, syntax)
    difference = np.abs(_prepared(copy) - _prepared(sources["12bit"]))
    if syntax in LOSSLESS:
        assert difference.max() == 0.0
    else:
        assert difference.mean() < 0.01


def test_unknown_syntax_is_rejected(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        compress_copy(sources["8bit"], tmp_path / "copy.dcm", "jpeg-xl")


def test_compressed_dataset_in_memory(sources: dict[str, Path], tmp_path: Path) -> None:
    copy = compress_copy(sources["16bit"], tmp_path / "copy.dcm", "j2k-lossless")
    ds = pydicom.dcmread(copy)
    np.testing.assert_array_equal(prepare_dataset(ds).pixels, _prepared(sources["16bit"]))


@pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools dciodvfy is not installed")
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"photometric": "MONOCHROME1"},
        {"bits_stored": 8, "body_part": "SPINE", "laterality": None},
        {"bits_stored": 16, "voi_lut": True, "body_part": "HAND", "laterality": "L"},
        {"body_part": "CHEST", "laterality": None},
        {"modality": "CR", "rescale": (0.5, -100.0)},
    ],
    ids=["default", "mono1", "8bit-spine", "voi-lut-hand", "chest", "cr-rescaled"],
)
def test_builder_passes_dciodvfy(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    path = write_dataset(make_radiograph(**kwargs), tmp_path / "image.dcm")
    assert dciodvfy_errors(path) == []
