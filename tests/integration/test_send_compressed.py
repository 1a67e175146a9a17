"""JPEG overlays: sent as JPEG to a peer that accepts it, uncompressed to one that does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from dicomnode.config import ModelSettings, ResultsSettings, Settings
from dicomnode.offline import predict_files
from dicomnode.peers import PeerInfo
from dicomnode.send.scu import Delivery, send_files
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


def _send_one_to(path: Path, **collector: Any) -> tuple[Delivery, CollectingSCP]:
    """Send ``path`` to a collecting peer made with ``collector``; the delivery and the peer."""
    peer_scp = CollectingSCP(ae_title="DEST", **collector).start()
    try:
        peer = PeerInfo("DEST", "DEST", "127.0.0.1", peer_scp.port)
        (delivery,) = send_files(peer, [path], calling_ae="DICOMNODE", timeout=10)
    finally:
        peer_scp.stop()
    return delivery, peer_scp


@pytest.mark.parametrize("accept_jpeg", [True, False], ids=["pacs-accepts-jpeg", "uncompressed"])
def test_jpeg_overlay_reaches_every_peer(jpeg_overlay: Path, accept_jpeg: bool) -> None:
    stored = pydicom.dcmread(jpeg_overlay)
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    delivery, collector = _send_one_to(jpeg_overlay, accept_jpeg=accept_jpeg)
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


@pytest.mark.parametrize(
    ("status", "ok", "retry"),
    [
        (0x0000, True, True),
        (0xB000, True, True),  # coerced: stored, a warning
        (0x0111, True, True),  # duplicate SOP instance: the peer holds it already
        (0xA700, False, True),  # out of resources: wait and retry
        (0x0110, False, True),  # processing failure: may be passing
        (0xA900, False, False),  # does not match SOP class: repeats itself
        (0xC000, False, False),  # cannot understand: repeats itself
        (0x0124, False, False),  # not authorised: until an admin acts (dicomnode retry)
    ],
)
def test_a_status_is_a_delivery_or_says_whether_waiting_helps(
    jpeg_overlay: Path, status: int, ok: bool, retry: bool
) -> None:
    delivery, _ = _send_one_to(jpeg_overlay, status=status)
    assert (delivery.ok, delivery.status) == (ok, status)
    if not ok:
        assert (delivery.retry, delivery.reason) == (retry, f"peer returned status 0x{status:04X}")


def test_an_unreadable_file_fails_alone_and_for_good(jpeg_overlay: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(jpeg_overlay.read_bytes()[:100])
    missing = tmp_path / "missing.dcm"
    collector = CollectingSCP(ae_title="DEST").start()
    try:
        peer = PeerInfo("DEST", "DEST", "127.0.0.1", collector.port)
        deliveries = send_files(
            peer, [missing, jpeg_overlay, truncated], calling_ae="DICOMNODE", timeout=10
        )
    finally:
        collector.stop()
    assert [d.path for d in deliveries] == [missing, jpeg_overlay, truncated]
    assert [d.ok for d in deliveries] == [False, True, False]
    assert [d.retry for d in deliveries if not d.ok] == [False, False]
    assert "cannot read result file missing.dcm" in deliveries[0].reason
    assert len(collector.received) == 1


def test_no_association_says_why(jpeg_overlay: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.testing.peers import free_port

    closed = PeerInfo("GONE", "GONE", "127.0.0.1", free_port())
    (delivery,) = send_files(closed, [jpeg_overlay], calling_ae="DICOMNODE", timeout=5)
    assert delivery.reason == f"association failed or timed out by GONE (127.0.0.1:{closed.port})"
    assert delivery.retry
    echo_only = AE(ae_title="ECHO")
    echo_only.add_supported_context(Verification)
    port = free_port()
    server = echo_only.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        peer = PeerInfo("ECHO", "ECHO", "127.0.0.1", port)
        (delivery,) = send_files(peer, [jpeg_overlay], calling_ae="DICOMNODE", timeout=5)
    finally:
        server.shutdown()
    assert delivery.reason.startswith("association aborted: the peer accepted no presentation")
    assert not delivery.retry  # the peer's configuration has to change first


def test_a_rejection_says_the_peers_reason(jpeg_overlay: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicomnode.send.scu import echo
    from dicomnode.testing.peers import free_port

    strict = AE(ae_title="PACS")
    strict.add_supported_context(Verification)
    strict.require_calling_aet = ["KNOWN"]
    port = free_port()
    server = strict.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        peer = PeerInfo("PACS", "PACS", "127.0.0.1", port)
        (delivery,) = send_files(peer, [jpeg_overlay], calling_ae="DICOMNODE", timeout=5)
        answer = echo(peer, calling_ae="DICOMNODE", timeout=5)
        accepted = echo(peer, calling_ae="KNOWN", timeout=5)
    finally:
        server.shutdown()
    why = "Rejected Permanent; Service User: Calling AE title not recognised"
    assert delivery.reason == f"association rejected ({why}) by PACS (127.0.0.1:{port})"
    assert delivery.retry  # the PACS administrator may register the node meanwhile
    assert answer.status is None and answer.reason == f"association rejected ({why})"
    assert accepted.status == 0 and accepted.reason == ""


def test_a_response_may_take_longer_than_the_connection_timeout() -> None:
    from dicomnode.send.scu import _ae

    ae = _ae("DICOMNODE", [], 30, 120)
    assert (ae.acse_timeout, ae.connection_timeout) == (30, 30)
    assert (ae.dimse_timeout, ae.network_timeout) == (120, 120)  # silence while it archives
    assert _ae("DICOMNODE", [], 30, 0).dimse_timeout == 30  # never shorter than the rest


def test_a_results_association_sends_without_waiting_for_acknowledgements() -> None:
    """The SCU's socket has Nagle's algorithm off (TCP_NODELAY): each C-STORE's last PDU
    leaves at once instead of waiting for the peer's delayed acknowledgement."""
    import socket

    from pynetdicom import AE

    from dicomnode.send import scu

    peer_scp = CollectingSCP(ae_title="DEST").start()
    try:
        peer = PeerInfo("DEST", "DEST", "127.0.0.1", peer_scp.port)
        ae = AE(ae_title="DICOMNODE")
        ae.add_requested_context(SecondaryCaptureImageStorage)
        assoc = scu._associate(ae, peer, scu._Rejection(), None)
        try:
            assert assoc.is_established
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            sock = assoc.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            assoc.release()
    finally:
        peer_scp.stop()
