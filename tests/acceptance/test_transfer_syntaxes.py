"""dcmtk storescu (pynetdicom for HTJ2K) sends one image in every accepted transfer syntax to
the node's SCP.

The node stores the bytes as received (same transfer syntax), and the lossless
copies give exactly the prediction of the uncompressed original.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicomnode.config import Settings
from dicomnode.db.migrate import upgrade
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.inference import Predictor
from dicomnode.models.card import load_card
from dicomnode.peers import sync_config_peers
from dicomnode.pipeline import read_and_prepare
from dicomnode.receive.scp import start_scp
from dicomnode.testing.images import (
    LOSSLESS,
    TRANSFER_SYNTAXES,
    compress_copy,
    make_radiograph,
    write_dataset,
)
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import make_settings
from dicomnode.testing.peers import LOOPBACK, free_port

STORESCU = "/usr/bin/storescu"
pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk missing"),
]


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    settings = make_settings(
        tmp_path,
        node={"port": free_port(), "host": "127.0.0.1"},
        peers={"MOD": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": 104}},
    )
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    with db.session() as session:
        sync_config_peers(session, dict(settings.peers))
    server = start_scp(settings, db)
    yield settings, db
    server.shutdown()
    db.dispose()


PROPOSE = {
    "implicit": "-xi",
    "explicit": "-xe",
    "deflate": "-xd",
    "jpeg-baseline": "-xy",
    "jpeg-extended": "-xx",
    "jpeg-lossless-sv1": "-xs",
    "jpeg-ls-lossless": "-xt",
    "jpeg-ls-lossy": "-xu",
    "j2k-lossless": "-xv",
    "j2k-lossy": "-xw",
    "rle": "-xr",
}
"""The storescu option that proposes each transfer syntax (so nothing is converted on the way).
dcmtk 3.6.7 (Debian 12) knows no HTJ2K: those copies are sent by pynetdicom (:func:`_send`)."""


def _send(port: int, path: Path, name: str) -> None:
    """C-STORE ``path`` from the AE MODALITY, in its own transfer syntax."""
    if name in PROPOSE:
        sent = _storescu(port, path, name)
        assert sent.returncode == 0, f"{name}: {sent.stderr}"
        return
    header = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(header.SOPClassUID, header.file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, port, ae_title="DICOMNODE")
    assert assoc.is_established, f"{name}: association rejected"
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(status.Status) == 0, f"{name}: status 0x{int(status.Status):04X}"


def _storescu(port: int, path: Path, name: str) -> subprocess.CompletedProcess[str]:
    command = [
        STORESCU,
        PROPOSE[name],
        "-R",
        "-aet",
        "MODALITY",
        "-aec",
        "DICOMNODE",
        "127.0.0.1",
        str(port),
        str(path),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_every_transfer_syntax_is_received_as_sent(
    scp: tuple[Settings, Database], tmp_path: Path
) -> None:
    settings, db = scp
    original = make_radiograph(bits_stored=8, rows=300, columns=260, body_part="KNEE")
    source = write_dataset(original, tmp_path / "original.dcm")
    card_dir = tmp_path / "model"
    make_tiny_model(card_dir, num_classes=5)
    predictor = Predictor.load(card_dir, load_card(card_dir), "cpu")
    reference = predictor.predict([read_and_prepare(source).image])[0].findings[0].probabilities  # type: ignore[list-item]

    for name, syntax in TRANSFER_SYNTAXES.items():
        same_pixels = make_radiograph(
            bits_stored=8,
            rows=300,
            columns=260,
            body_part="KNEE",
            sop_uid=generate_uid(),
            study_uid=original.StudyInstanceUID,
        )
        copy = compress_copy(
            write_dataset(same_pixels, tmp_path / f"{name}-src.dcm"), tmp_path / f"{name}.dcm", name
        )
        sop_uid = str(pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
        _send(settings.node.port, copy, name)
        with db.session() as session:
            row = session.get(Instance, sop_uid)
            assert row is not None, f"{name} was not stored"
            assert row.transfer_syntax_uid == syntax, name
            stored = Path(row.path)
        prepared = read_and_prepare(stored)
        assert prepared.image is not None, f"{name}: {prepared.error}"
        probabilities = predictor.predict([prepared.image])[0].findings[0].probabilities
        if name in LOSSLESS:
            np.testing.assert_allclose(probabilities, reference, atol=1e-6, err_msg=name)
        else:
            assert abs(sum(probabilities) - 1) < 1e-5
