"""Deliver files to a peer over one association.

:func:`send_files` returns one :class:`Delivery` per file and never raises: a
refused or aborted association marks every file not yet sent as failed with
the reason, and a file that cannot be read or sent fails alone. Each failure
says whether waiting may mend it (:attr:`Delivery.retry`): network trouble and
"out of resources" (``0xA7xx``) or "processing failure" (``0x0110``) answers
are retried with backoff; a refusal that repeats itself (the SOP class not
supported or not accepted, the dataset not understood, a missing file) is not.
A warning status (``0xB000`` coerced, ``0xB007`` does not match SOP class,
``0xB006`` elements discarded, ...) is a delivery, logged with its code; so is
``0x0111`` (duplicate SOP instance): the peer holds the object already.

A peer marked ``tls`` is reached over DICOM TLS with the context the caller gives
(:mod:`dicomnode.tls`): its certificate verified, the node's shown.

Every SOP class is proposed with the uncompressed transfer syntaxes; a file
stored compressed (the JPEG Baseline overlays) is also proposed in its own
transfer syntax, in a presentation context of its own so that the peer can
accept it. When the peer accepts only uncompressed, the file is decompressed
in memory and sent uncompressed (the stored file does not change).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicomnode.peers import PeerInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending one file."""

    path: Path
    ok: bool
    status: int | None
    reason: str = ""
    retry: bool = True


UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
DUPLICATE_SOP_INSTANCE = 0x0111
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class _Kind:
    """The SOP class and stored transfer syntax of a file to send."""

    sop_class: str
    transfer_syntax: UID


def _kind(path: Path) -> _Kind:
    header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return _Kind(str(header.SOPClassUID), UID(header.file_meta.TransferSyntaxUID))


def _ae(calling_ae: str, kinds: Sequence[_Kind], timeout: float, response_timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.connection_timeout = timeout
    # a peer that archives before it answers is silent meanwhile: the network may be too
    ae.dimse_timeout = ae.network_timeout = max(timeout, response_timeout)
    for sop_class in sorted({k.sop_class for k in kinds}):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    for kind in sorted(set(kinds), key=lambda k: (k.sop_class, k.transfer_syntax)):
        if kind.transfer_syntax not in UNCOMPRESSED:
            ae.add_requested_context(kind.sop_class, [kind.transfer_syntax])
    return ae


def send_files(
    peer: PeerInfo,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    timeout: float,
    response_timeout: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> list[Delivery]:
    """C-STORE ``paths`` to ``peer`` over one association; one :class:`Delivery` each, in order.

    ``timeout`` bounds connecting and associating; ``response_timeout`` (at least
    ``timeout``) how long a C-STORE response, and network silence meanwhile, may take;
    ``tls``: the context of a peer reached over DICOM TLS (:mod:`dicomnode.tls`).
    """
    if not paths:
        return []
    if peer.tls and tls is None:
        reason = f"peer {peer.name} is reached over TLS, but the node has no TLS settings (tls.*)"
        return [Delivery(p, False, None, reason, retry=False) for p in paths]
    kinds = {p: _readable_kind(p) for p in paths}
    sendable = [(p, k) for p, k in kinds.items() if isinstance(k, _Kind)]
    sent: dict[Path, Delivery] = {}
    if sendable:
        sent = _send_all(peer, sendable, calling_ae, (timeout, response_timeout), tls)
    return [
        sent[p] if isinstance(kinds[p], _Kind) else Delivery(p, False, None, str(kinds[p]), False)
        for p in paths
    ]


class _Rejection:
    """Keeps the peer's A-ASSOCIATE-RJ, so that a job's error can say why it was rejected."""

    def __init__(self) -> None:
        self.reason = ""

    def __call__(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if getattr(primitive, "result", None) in (0x01, 0x02) and hasattr(primitive, "reason_str"):
            self.reason = f"{primitive.result_str}; {primitive.source_str}: {primitive.reason_str}"


def _not_established(assoc: Association, rejection: str = "") -> tuple[str, bool]:
    """Why no association, and whether waiting may help: the peer's rejection (retried, since
    the peer's administrator may register the node meanwhile), no presentation context
    accepted (not until the peer is set up otherwise), or no connection, an abort or no
    answer."""
    if assoc.is_rejected:
        return f"association rejected ({rejection or 'no reason given'})", True
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return "association aborted: the peer accepted no presentation context", False
    return "association failed or timed out", True


def _readable_kind(path: Path) -> _Kind | str:
    """The file's kind, or why it cannot be read (that file alone fails, for good)."""
    try:
        return _kind(path)
    except Exception as exc:  # a missing, truncated or foreign file
        return f"cannot read result file {path.name}: {type(exc).__name__}: {exc}"


def _send_all(
    peer: PeerInfo,
    files: Sequence[tuple[Path, _Kind]],
    calling_ae: str,
    timeouts: tuple[float, float],
    tls: ssl.SSLContext | None,
) -> dict[Path, Delivery]:
    ae = _ae(calling_ae, [kind for _, kind in files], *timeouts)
    rejection = _Rejection()
    assoc = _associate(ae, peer, rejection, tls)
    if not assoc.is_established:
        why, retry = _not_established(assoc, rejection.reason)
        reason = f"{why} by {peer.name} ({peer.host}:{peer.port})"
        return {p: Delivery(p, False, None, reason, retry) for p, _ in files}
    try:
        return {path: _send_one(assoc, path, kind) for path, kind in files}
    finally:
        if assoc.is_established:
            assoc.release()


def _associate(
    ae: AE, peer: PeerInfo, rejection: _Rejection, tls: ssl.SSLContext | None
) -> Association:
    """Request an association with ``peer`` (over TLS when it is reached so), its socket
    sending at once (:func:`_without_delay`)."""
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_ACSE_RECV, rejection)],
        tls_args=(tls, peer.host) if peer.tls and tls is not None else None,
    )
    if assoc.is_established:
        _without_delay(assoc)
    return assoc


def _without_delay(assoc: Association) -> None:
    """Turn Nagle's algorithm off on the association's socket (``TCP_NODELAY``).

    Each C-STORE ends in a small PDU that otherwise waits for the peer's delayed
    acknowledgement: to Orthanc on loopback, 64 results went at 14-15 files/s with it and
    20 files/s without it (README, Performance). pynetdicom does not
    set it; a socket that refuses the option is used as it is.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    if not _accepts_class(assoc, kind):
        reason = f"the peer accepted no presentation context for SOP class {kind.sop_class}"
        return Delivery(path, False, None, reason, retry=False)
    try:
        if kind.transfer_syntax in UNCOMPRESSED or _accepts(assoc, kind):
            status = assoc.send_c_store(path)
        else:
            log.info("peer does not accept %s: sending uncompressed", kind.transfer_syntax.name)
            status = assoc.send_c_store(_uncompressed(path))
    except Exception as exc:  # a file that cannot be encoded for the peer fails alone
        return Delivery(path, False, None, f"C-STORE error: {type(exc).__name__}: {exc}")
    code = getattr(status, "Status", None)
    if code is None:
        return Delivery(path, False, None, "no response (time-out or abort)")
    return status_delivery(path, int(code))


def status_delivery(path: Path, code: int, reason: str = "") -> Delivery:
    """What a C-STORE response status (or a STOW-RS Failure Reason, the same codes) means
    for the file (see the module docstring); ``reason``: the failure's text."""
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        return Delivery(path, True, code)
    if category == STATUS_WARNING or code == DUPLICATE_SOP_INSTANCE:
        log.warning("%s: stored by the peer with status 0x%04X", path.name, code)
        return Delivery(path, True, code)
    retry = code >> 8 == 0xA7 or code == PROCESSING_FAILURE
    return Delivery(path, False, code, reason or f"peer returned status 0x{code:04X}", retry)


def _accepts_class(assoc: Association, kind: _Kind) -> bool:
    return any(str(c.abstract_syntax) == kind.sop_class for c in assoc.accepted_contexts)


@dataclass(frozen=True)
class Echo:
    """The outcome of a C-ECHO: the peer's status, or why there was no answer."""

    status: int | None
    reason: str = ""


def echo(
    peer: PeerInfo, *, calling_ae: str, timeout: float, tls: ssl.SSLContext | None = None
) -> Echo:
    """C-ECHO ``peer``: its status, or why no association could be made or no answer came."""
    if peer.tls and tls is None:
        return Echo(None, "the peer is reached over TLS, but the node has no TLS settings (tls.*)")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    rejection = _Rejection()
    assoc = _associate(ae, peer, rejection, tls)
    if not assoc.is_established:
        return Echo(None, _not_established(assoc, rejection.reason)[0])
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return Echo(None, "no response (time-out or abort)") if code is None else Echo(int(code))
    finally:
        assoc.release()
