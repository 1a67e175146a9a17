"""JPEG overlays: sent as JPEG to a peer that accepts it, uncompressed to one that does not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from dicomnode.config import ModelSettings, ResultsSettings, Settings
from dicomnode.offline import predict_files
from dicomnode.peers import PeerInfo
from dicomnode.send.scu import send_files
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.peers import CollectingSCP


@pytest.fixture(scope="module")
def jpeg_overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("overlay")
    make_tiny_model(root / "models" / "tiny-knee")
    settings = Settings(
        models=ModelSettings(dir=root / "models"),
        results=ResultsSettings(overlay_jpeg_quality=90),
    )
    image = write_dataset(make_radiograph(rows=600, columns=500), root / "image.dcm")
    predict_files(settings, [image], root / "out")
    (overlay,) = (root / "out").glob("SC_*.dcm")
    return overlay


@pytest.mark.parametrize("accept_jpeg", [True, False], ids=["pacs-accepts-jpeg", "uncompressed"])
def test_jpeg_overlay_reaches_every_peer(jpeg_overlay: Path, accept_jpeg: bool) -> None:
    stored = pydicom.dcmread(jpeg_overlay)
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    collector = CollectingSCP(ae_title="DEST", accept_jpeg=accept_jpeg).start()
    try:
        peer = PeerInfo("DEST", "DEST", "127.0.0.1", collector.port)
        (delivery,) = send_files(peer, [jpeg_overlay], calling_ae="DICOMNODE", timeout=10)
    finally:
        collector.stop()
    assert delivery.ok, delivery.reason
    (received,) = collector.received
    assert received.SOPClassUID == SecondaryCaptureImageStorage
    assert received.SOPInstanceUID == stored.SOPInstanceUID
    syntax = received.file_meta.TransferSyntaxUID
    if accept_jpeg:
        assert syntax == JPEGBaseline8Bit
        assert received.PixelData == stored.PixelData  # sent as stored, not re-encoded
    else:
        assert not syntax.is_compressed
        assert received.PhotometricInterpretation == "RGB"
        np.testing.assert_array_equal(received.pixel_array, stored.pixel_array)
    # The stored file is not changed by a fallback.
    assert pydicom.dcmread(jpeg_overlay).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
