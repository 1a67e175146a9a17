"""Deliver files to a peer over one association.

:func:`send_files` returns one :class:`Delivery` per file; it never raises for
network trouble (a refused or aborted association marks every file not yet
sent as failed with the reason), so the caller can record each outcome and
retry with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.peers import PeerInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending one file."""

    path: Path
    ok: bool
    status: int | None
    reason: str = ""


def _sop_class(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)


def _ae(calling_ae: str, sop_classes: Sequence[str], timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


def send_files(
    peer: PeerInfo, paths: Sequence[Path], *, calling_ae: str, timeout: float
) -> list[Delivery]:
    """C-STORE ``paths`` to ``peer`` over one association."""
    if not paths:
        return []
    try:
        classes = [_sop_class(p) for p in paths]
    except (OSError, ValueError) as exc:
        return [Delivery(p, False, None, f"cannot read result file: {exc}") for p in paths]
    ae = _ae(calling_ae, classes, timeout)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed or timed out"
        return [
            Delivery(p, False, None, f"{reason} by {peer.name} ({peer.host}:{peer.port})")
            for p in paths
        ]
    try:
        return [_send_one(assoc, path) for path in paths]
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(assoc: object, path: Path) -> Delivery:
    from pynetdicom.association import Association

    assert isinstance(assoc, Association)
    if not assoc.is_established:
        return Delivery(path, False, None, "association lost before sending")
    try:
        status = assoc.send_c_store(path)
    except (OSError, RuntimeError, ValueError) as exc:
        return Delivery(path, False, None, f"C-STORE error: {exc}")
    code = getattr(status, "Status", None)
    if code is None:
        return Delivery(path, False, None, "no response (time-out or abort)")
    if code in (0x0000, 0xB000, 0xB007, 0xB006):
        return Delivery(path, True, int(code))
    return Delivery(path, False, int(code), f"peer returned status 0x{int(code):04X}")


def echo(peer: PeerInfo, *, calling_ae: str, timeout: float) -> int | None:
    """C-ECHO ``peer``; the status, or None when no association could be made."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return None if code is None else int(code)
    finally:
        assoc.release()
