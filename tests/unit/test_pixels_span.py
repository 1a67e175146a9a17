"""Whether a received file's Pixel Data is whole, read from its headers alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from dicomnode.errors import IncompleteInstanceError
from dicomnode.store.instances import read_received, same_pixel_data
from dicomnode.testing.images import make_radiograph, write_dataset


def _file(tmp_path: Path, name: str, syntax: str | None = None) -> Path:
    image = make_radiograph(body_part="KNEE", rows=96, columns=80, seed=3)
    if syntax == RLELossless:
        image.compress(RLELossless)
    elif syntax is not None:
        image.file_meta.TransferSyntaxUID = UID(syntax)
    return write_dataset(image, tmp_path / name)


@pytest.mark.parametrize("syntax", [None, ImplicitVRLittleEndian, RLELossless])
def test_a_whole_file_is_read_and_a_cut_one_refused(tmp_path: Path, syntax: str | None) -> None:
    whole = _file(tmp_path, "whole.dcm", syntax)
    assert read_received(whole).SOPInstanceUID
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(IncompleteInstanceError, match="incomplete"):
        read_received(cut)


@pytest.mark.parametrize("frames", [1, 2])
def test_native_pixel_data_shorter_than_its_image_is_refused(tmp_path: Path, frames: int) -> None:
    """A whole element that holds half the image: it parses, and no viewer or model can use
    it; refused at C-STORE so that the sender hears of it."""
    image = make_radiograph(body_part="KNEE", rows=96, columns=80, frames=frames, seed=3)
    assert read_received(write_dataset(image, tmp_path / "whole.dcm")).Rows == 96
    image.PixelData = image.PixelData[: len(image.PixelData) // 2]
    with pytest.raises(IncompleteInstanceError, match=r"holds \d+ bytes, its image .* needs"):
        read_received(write_dataset(image, tmp_path / "short.dcm"))
    image.Rows = 48  # the header now describes what was sent
    assert read_received(write_dataset(image, tmp_path / "relabelled.dcm")).Rows == 48


def test_bytes_after_the_pixel_data_are_no_reason_to_refuse(tmp_path: Path) -> None:
    """Padding after the pixel data (some modalities write it) is not a cut."""
    padded = _file(tmp_path, "padded.dcm")
    padded.write_bytes(
        padded.read_bytes() + b"\xfc\xff\xfc\xff" + b"OB\0\0" + b"\4\0\0\0" + b"\0" * 4
    )
    assert read_received(padded).Rows == 96


def test_a_deflated_file_and_one_without_pixels_are_read_as_they_are(tmp_path: Path) -> None:
    """A deflated dataset's offsets are not the file's: zlib names a cut one."""
    deflated = _file(tmp_path, "deflated.dcm", DeflatedExplicitVRLittleEndian)
    assert read_received(deflated).Rows == 96
    image = make_radiograph(body_part="KNEE", rows=16, columns=16)
    del image.PixelData
    assert read_received(write_dataset(image, tmp_path / "header.dcm")).Rows == 16


def test_copies_are_compared_by_their_pixel_data(tmp_path: Path) -> None:
    first = _file(tmp_path, "first.dcm")
    again = _file(tmp_path, "again.dcm")
    assert same_pixel_data(first, again) is True
    other = make_radiograph(body_part="KNEE", rows=96, columns=80, seed=4)
    assert same_pixel_data(first, write_dataset(other, tmp_path / "other.dcm")) is False
    encoded = _file(tmp_path, "rle.dcm", RLELossless)
    assert same_pixel_data(first, encoded) is None  # another encoding: cannot be told
