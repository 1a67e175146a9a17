"""Deliver files to a peer's DICOMweb service: one STOW-RS request (PS3.18 10.5).

A peer with a ``dicomweb`` base URL gets its results by ``POST {base}/studies``, the files
as a ``multipart/related; type="application/dicom"`` body, as they are stored. Like
:func:`dicomnode.send.scu.send_files`, :func:`stow_files` returns one
:class:`~dicomnode.send.scu.Delivery` per file and never raises; each failure says whether
waiting may mend it:

- 200 OK: every file stored (a Warning Reason in the response is logged);
- 202 Accepted and 409 Conflict: each file by the response's Referenced SOP Sequence
  (stored) and Failed SOP Sequence, whose Failure Reason means what the same C-STORE status
  would (``0xA7xx`` and ``0x0110`` retried; ``0x0111``, the object held already, a
  delivery; the rest fail for good); a file the response does not name is retried (202)
  or fails (409);
- 400, 409 without details, 413 (too large), 415 (not taken as ``application/dicom``): the
  files fail for good, the reason quoting the status;
- 401, 403, 404, 408, 429, 5xx, no connection or a time-out: retried. A wrong token or
  URL is the administrator's to mend, and the sends go once it is.

The Authorization header value comes from the peer's ``dicomweb_auth_file``, read at each
send (a token renewed in place is used at once), or from the OAuth 2.0 client that file
describes (:mod:`dicomnode.send.oauth`); it never reaches the log. HTTPS verifies the
service's certificate against ``tls.ca_certificates`` (else the system's certificate
authorities) and shows the node's ``tls.certificate`` when there is one.

The HTTP client is the standard library's: a few lines of multipart framing, with the
time-outs and TLS context the node sets (the DICOMweb client libraries send without a
time-out, and would hold a worker on a silent server).
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from io import BytesIO
from pathlib import Path

import pydicom

from dicomnode.errors import AuthorizationError
from dicomnode.peers import PeerInfo
from dicomnode.send import oauth
from dicomnode.send.scu import Delivery, status_delivery

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 << 20
"""Files per request add up to at most this (uncompressed overlays are 12 MB at 2048 px: a
batch of 32 in one body would hold 400 MB in a worker's memory)."""

RETRIED_HTTP = frozenset({401, 403, 404, 408, 429})
"""HTTP statuses below 500 that waiting (or the administrator) may mend."""

_DICOM_JSON = "application/dicom+json"


@dataclass(frozen=True)
class _File:
    path: Path
    sop_uid: str
    data: bytes


def stow_files(
    peer: PeerInfo,
    paths: Sequence[Path],
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> list[Delivery]:
    """STOW-RS ``paths`` to ``peer``'s DICOMweb service, in requests of at most
    :data:`MAX_REQUEST_BYTES` (a larger file alone); one :class:`Delivery` each, in order.
    ``timeout`` bounds connecting and each wait for the service (its answer included);
    ``context``: the TLS context of an https URL."""
    deliveries: dict[Path, Delivery] = {}
    for chunk in _chunks(paths):
        readable = {p: _read(p) for p in chunk}  # only one request's files in memory
        files = [f for f in readable.values() if isinstance(f, _File)]
        sent = _post(peer, files, timeout, context) if files else {}
        for path, file in readable.items():
            failed = Delivery(path, False, None, str(file), retry=False)
            deliveries[path] = sent[path] if isinstance(file, _File) else failed
    return [deliveries[p] for p in paths]


def _chunks(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """``paths`` in order, in runs whose files add up to at most :data:`MAX_REQUEST_BYTES`."""
    chunk: list[Path] = []
    size = 0
    for path in paths:
        try:
            length = path.stat().st_size
        except OSError:
            length = 0  # read (and failed) with its run
        if chunk and size + length > MAX_REQUEST_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(path)
        size += length
    if chunk:
        yield chunk


def check_service(
    peer: PeerInfo, *, timeout: float, context: ssl.SSLContext | None = None
) -> tuple[int | None, str]:
    """Ask the peer's DICOMweb service for one study (QIDO-RS ``GET {base}/studies?limit=1``)
    with its Authorization, storing nothing: the HTTP status, or None and why no answer
    came. ``dicomnode echo`` says whether the URL, the token and the certificate work."""
    answer = _exchange(peer, studies_url(peer) + "?limit=1", timeout, context)
    return (None, answer) if isinstance(answer, str) else (answer[0], "")


def _exchange(
    peer: PeerInfo,
    url: str,
    timeout: float,
    context: ssl.SSLContext | None,
    body: bytes | None = None,
    content_type: str = "",
) -> tuple[int, bytes] | str:
    """One request to the peer's service (a POST when ``body`` is given), with its
    Authorization and ``Accept: application/dicom+json``: the HTTP status and the answer's
    body, or why no answer came (the auth file unreadable, no connection, a time-out)."""
    try:
        authorization = oauth.authorization(
            peer.dicomweb_auth_file, timeout=timeout, context=context
        )
    except OSError as exc:
        return f"cannot read dicomweb_auth_file of {peer.name}: {exc.strerror}"
    except AuthorizationError as exc:
        return f"no Authorization for {peer.name}: {exc}"
    headers = {"Accept": _DICOM_JSON}
    if authorization:
        headers["Authorization"] = authorization
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # a token of its OAuth client is asked for again next time
            oauth.forget(peer.dicomweb_auth_file)
        with exc:
            return int(exc.code), exc.read()
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        return str(getattr(exc, "reason", None) or exc)


def studies_url(peer: PeerInfo) -> str:
    """The STOW-RS resource of the peer's DICOMweb service."""
    return peer.dicomweb.rstrip("/") + "/studies"


def _read(path: Path) -> _File | str:
    """The file and its SOP Instance UID, or why it cannot be sent (it alone fails)."""
    try:
        data = path.read_bytes()
        header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        return _File(path, str(header.SOPInstanceUID), data)
    except Exception as exc:  # a missing, truncated or foreign file
        return f"cannot read result file {path.name}: {type(exc).__name__}: {exc}"


def _post(
    peer: PeerInfo, files: Sequence[_File], timeout: float, context: ssl.SSLContext | None
) -> dict[Path, Delivery]:
    boundary = uuid.uuid4().hex
    answer = _exchange(
        peer,
        studies_url(peer),
        timeout,
        context,
        body=_multipart(files, boundary),
        content_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )
    where = f"{peer.name} ({studies_url(peer)})"
    if isinstance(answer, str):
        reason = f"STOW-RS to {where} failed: {answer}"
        return {f.path: Delivery(f.path, False, None, reason, retry=True) for f in files}
    return _answered(files, *answer, where)


def _multipart(files: Iterable[_File], boundary: str) -> bytes:
    """The files as a ``multipart/related`` body of ``application/dicom`` parts (RFC 2387)."""
    body = BytesIO()
    for file in files:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(file.data)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue()


def _answered(files: Sequence[_File], status: int, body: bytes, where: str) -> dict[Path, Delivery]:
    """What the service's answer means for each file (see the module docstring)."""
    response = _response_dataset(body)
    stored, failed = _named(response)
    if status == 200:
        _log_warnings(response, where)
        return {f.path: Delivery(f.path, True, None) for f in files}
    if status in (202, 409) and (stored or failed):
        _log_warnings(response, where)
        return {f.path: _by_name(f, stored, failed, status, where) for f in files}
    reason = f"STOW-RS to {where} answered HTTP {status}"
    retry = status >= 500 or status in RETRIED_HTTP or status == 202
    return {f.path: Delivery(f.path, False, None, reason, retry) for f in files}


def _by_name(
    file: _File, stored: set[str], failed: dict[str, int | None], status: int, where: str
) -> Delivery:
    if file.sop_uid in stored:
        return Delivery(file.path, True, None)
    if file.sop_uid in failed:
        code = failed[file.sop_uid]
        if code is None:
            return Delivery(file.path, False, None, f"{where} failed it, giving no reason", False)
        return status_delivery(file.path, code, f"{where} failed it with reason 0x{code:04X}")
    reason = f"STOW-RS to {where} answered HTTP {status} without naming the object"
    return Delivery(file.path, False, None, reason, retry=status == 202)


def _response_dataset(body: bytes) -> pydicom.Dataset | None:
    """The Store Instances Response Module of a DICOM JSON answer (None when there is none,
    or it is not DICOM JSON: XML answers are read by status alone)."""
    try:
        parsed = json.loads(body.decode("utf-8")) if body.strip() else None
        if isinstance(parsed, list) and len(parsed) == 1:  # some services wrap it in a list
            parsed = parsed[0]
        return pydicom.Dataset.from_json(parsed) if isinstance(parsed, dict) else None
    except (ValueError, TypeError, KeyError):
        return None


def _named(response: pydicom.Dataset | None) -> tuple[set[str], dict[str, int | None]]:
    """The SOP Instance UIDs the answer says were stored, and those it says failed, with
    their Failure Reason."""
    if response is None:
        return set(), {}
    stored = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in response.get("ReferencedSOPSequence", [])
    }
    failed: dict[str, int | None] = {}
    for item in response.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
            None if reason is None else int(reason)
        )
    return stored - {""}, failed


def _log_warnings(response: pydicom.Dataset | None, where: str) -> None:
    if response is None:
        return
    for item in response.get("ReferencedSOPSequence", []):
        if item.get("WarningReason") is not None:
            log.warning(
                "sop=%s stored by %s with warning 0x%04X",
                item.get("ReferencedSOPInstanceUID", ""),
                where,
                int(item.WarningReason),
            )
