"""Deliver files to a peer over one association.

:func:`send_files` returns one :class:`Delivery` per file; it never raises for
network trouble (a refused or aborted association marks every file not yet
sent as failed with the reason), so the caller can record each outcome and
retry with backoff.

Every SOP class is proposed with the uncompressed transfer syntaxes; a file
stored compressed (the JPEG Baseline overlays) is also proposed in its own
transfer syntax, in a presentation context of its own so that the peer can
accept it. When the peer accepts only uncompressed, the file is decompressed
in memory and sent uncompressed (the stored file does not change).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
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


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class _Kind:
    """The SOP class and stored transfer syntax of a file to send."""

    sop_class: str
    transfer_syntax: UID


def _kind(path: Path) -> _Kind:
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return _Kind(str(header.SOPClassUID), UID(header.file_meta.TransferSyntaxUID))


def _ae(calling_ae: str, kinds: Sequence[_Kind], timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in sorted({k.sop_class for k in kinds}):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    for kind in sorted(set(kinds), key=lambda k: (k.sop_class, k.transfer_syntax)):
        if kind.transfer_syntax not in UNCOMPRESSED:
            ae.add_requested_context(kind.sop_class, [kind.transfer_syntax])
    return ae


def send_files(
    peer: PeerInfo, paths: Sequence[Path], *, calling_ae: str, timeout: float
) -> list[Delivery]:
    """C-STORE ``paths`` to ``peer`` over one association."""
    if not paths:
        return []
    try:
        kinds = [_kind(p) for p in paths]
    except (OSError, ValueError, AttributeError) as exc:
        return [Delivery(p, False, None, f"cannot read result file: {exc}") for p in paths]
    ae = _ae(calling_ae, kinds, timeout)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed or timed out"
        return [
            Delivery(p, False, None, f"{reason} by {peer.name} ({peer.host}:{peer.port})")
            for p in paths
        ]
    try:
        return [_send_one(assoc, path, kind) for path, kind in zip(paths, kinds, strict=True)]
    finally:
        if assoc.is_established:
            assoc.release()


def _accepts(assoc: Association, kind: _Kind) -> bool:
    return any(
        str(c.abstract_syntax) == kind.sop_class and kind.transfer_syntax in c.transfer_syntax
        for c in assoc.accepted_contexts
    )


def _uncompressed(path: Path) -> Dataset:
    """The dataset of ``path`` with its pixel data decompressed (Explicit VR Little Endian).

    The SOP Instance UID stays: the decoded pixels are the stored ones, only the
    transfer syntax changes (pydicom would otherwise generate a new one).
    """
    dataset = dcmread(path)
    dataset.decompress(generate_instance_uid=False)
    return dataset


def _send_one(assoc: Association, path: Path, kind: _Kind) -> Delivery:
    if not assoc.is_established:
        return Delivery(path, False, None, "association lost before sending")
    try:
        if kind.transfer_syntax in UNCOMPRESSED or _accepts(assoc, kind):
            status = assoc.send_c_store(path)
        else:
            log.info("peer does not accept %s: sending uncompressed", kind.transfer_syntax.name)
            status = assoc.send_c_store(_uncompressed(path))
    except (OSError, RuntimeError, ValueError, NotImplementedError) as exc:
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
