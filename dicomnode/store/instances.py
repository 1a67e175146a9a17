"""Received instances: header facts, the durable file and its database record."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ImplicitVRLittleEndian
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from dicomnode.db.schema import Association, Instance
from dicomnode.db.session import Database, db_now, lock_until_commit
from dicomnode.errors import IncompleteInstanceError, InvalidInstanceError
from dicomnode.store.files import (
    checked_uid,
    fsync_file,
    instance_path,
    move_durably,
    remove_quietly,
)
from dicomnode.store.pixels_span import pixel_data_span
from dicomnode.values import Priority

log = logging.getLogger(__name__)

PURGED = "purged"
"""State of an instance whose file holds its header only (:mod:`dicomnode.retention`)."""


@dataclass(frozen=True)
class InstanceFacts:
    """What the node records about a received instance (no patient data)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    descriptions: str


def read_received(path: Path) -> Dataset:
    """The header of a received file (read up to its pixel data), once its Pixel Data is
    checked to be whole (:mod:`dicomnode.store.pixels_span`); raises
    :class:`IncompleteInstanceError` naming what is missing."""
    header, syntax, span = _header_and_pixel_span(path)
    if span is not None and not UID(syntax).is_encapsulated:
        _check_native_length(header, span[1] - span[0])
    return header


def _check_native_length(header: Dataset, length: int) -> None:
    """Refuse native Pixel Data shorter than the image its header describes (rows, columns,
    samples, frames, bits allocated): whole as an element, it still cannot be displayed or
    analysed. A header too broken to say what it needs is left to the analysis to name."""
    try:
        needed = int(get_expected_length(header, unit="bytes"))
    except (AttributeError, KeyError, TypeError, ValueError):
        return
    if length < needed:
        raise IncompleteInstanceError(
            f"the dataset is incomplete: its Pixel Data holds {length} bytes, its image "
            f"({header.Rows} x {header.Columns}, {header.BitsAllocated} bits allocated) "
            f"needs {needed}"
        )


def _header_and_pixel_span(path: Path) -> tuple[Dataset, str, tuple[int, int] | None]:
    """The header of ``path``, its transfer syntax, and where its Pixel Data lies."""
    with path.open("rb") as fp:
        header = dcmread(fp, stop_before_pixels=True)  # leaves fp at the pixel data
        syntax = str(header.file_meta.get("TransferSyntaxUID", "")) or ImplicitVRLittleEndian
        span = pixel_data_span(fp, path.stat().st_size, syntax)
    return header, syntax, span


def _text(ds: Dataset, keyword: str) -> str:
    """The attribute's text, without NUL bytes (a broken sender's; PostgreSQL refuses them
    in text, and the image would be refused again at every attempt)."""
    value = ds.get(keyword, "")
    return str(value or "").replace("\x00", " ").strip()


def facts_from_dataset(
    ds: Dataset, transfer_syntax_uid: str, sop_class_uid: str = ""
) -> InstanceFacts:
    """Header facts, with every UID validated; raises :class:`InvalidInstanceError`."""
    descriptions = " | ".join(
        t
        for t in (
            _text(ds, "StudyDescription"),
            _text(ds, "SeriesDescription"),
            _text(ds, "ProtocolName"),
        )
        if t
    )
    return InstanceFacts(
        study_uid=checked_uid(ds.get("StudyInstanceUID"), "Study Instance UID"),
        series_uid=checked_uid(ds.get("SeriesInstanceUID"), "Series Instance UID"),
        sop_uid=checked_uid(ds.get("SOPInstanceUID"), "SOP Instance UID"),
        sop_class_uid=checked_uid(ds.get("SOPClassUID") or sop_class_uid, "SOP Class UID"),
        transfer_syntax_uid=checked_uid(transfer_syntax_uid, "Transfer Syntax UID"),
        modality=_text(ds, "Modality").upper()[:16],
        body_part=_text(ds, "BodyPartExamined").upper()[:64],
        descriptions=descriptions[:1000],
    )


@dataclass(frozen=True)
class StoreOutcome:
    """Result of :func:`store_instance`."""

    sop_uid: str
    duplicate: bool
    path: Path


def already_stored(session: Session, sop_uid: str) -> bool:
    return session.get(Instance, sop_uid) is not None


def _ensure_association(
    session: Session, association_id: str, calling_ae: str, receiver: str | None, now: datetime
) -> None:
    if session.get(Association, association_id) is None:
        session.add(
            Association(
                id=association_id,
                calling_ae=calling_ae,
                started_at=now,
                receiver=receiver,
            )
        )
        session.flush()


def store_instance(
    db: Database,
    data_dir: Path,
    facts: InstanceFacts,
    received: Path,
    *,
    calling_ae: str,
    association_id: str,
    receiver: str | None = None,
    priority: int = Priority.MEDIUM,
) -> StoreOutcome:
    """Move the received file into place durably and record it, in one transaction.

    ``received`` is the file the SCP wrote while the data arrived (same volume
    as ``data_dir``). It is fsync-ed first; then, holding the database write
    lock, a known SOP Instance UID is left alone (the first copy is kept), a
    new one is renamed into place, its folder fsync-ed and its row committed.
    If the commit fails the file is removed again, so a success status always
    means both.
    """
    path = instance_path(data_dir, facts.study_uid, facts.series_uid, facts.sop_uid)
    size = fsync_file(received)
    try:
        with db.session() as session:
            _lock_sop_uid(session, facts.sop_uid)
            if already_stored(session, facts.sop_uid):
                return StoreOutcome(facts.sop_uid, True, path)
            move_durably(received, path)
            now = db_now(session)
            _ensure_association(session, association_id, calling_ae, receiver, now)
            row = _record(facts, path, size, calling_ae, association_id, now)
            row.priority = int(priority)
            session.add(row)
    except Exception:
        if not received.exists():
            remove_quietly(path)
        raise
    return StoreOutcome(facts.sop_uid, False, path)


def _lock_sop_uid(session: Session, sop_uid: str) -> None:
    """Serialise the storing of one SOP Instance UID until the transaction ends.

    SQLite transactions already hold the write lock (``BEGIN IMMEDIATE``). On
    PostgreSQL two associations delivering the same instance at once would both
    find it new and both move a file onto the same path; the loser's failed
    commit would then remove the winner's file. A transaction-level advisory
    lock on the UID's hash makes the second wait and find the first's row.
    """
    lock_until_commit(session, sop_uid)


def _record(
    facts: InstanceFacts,
    path: Path,
    size: int,
    calling_ae: str,
    association_id: str,
    received_at: datetime,
) -> Instance:
    return Instance(
        sop_instance_uid=facts.sop_uid,
        study_instance_uid=facts.study_uid,
        series_instance_uid=facts.series_uid,
        sop_class_uid=facts.sop_class_uid,
        transfer_syntax_uid=facts.transfer_syntax_uid,
        modality=facts.modality,
        body_part=facts.body_part,
        descriptions=facts.descriptions,
        path=str(path),
        size=size,
        calling_ae=calling_ae,
        association_id=association_id,
        received_at=received_at,
        state="received",
    )


def release_association(db: Database, association_id: str) -> None:
    """Mark an association finished (released, aborted or closed)."""
    with db.session() as session:
        session.execute(
            update(Association)
            .where(Association.id == association_id, Association.released_at.is_(None))
            .values(released_at=db_now(session))
        )


def release_all_open(db: Database, receiver: str) -> int:
    """At start-up: the associations that ``receiver``'s previous run left open are over
    (and those of no recorded receiver, written before schema revision 0002). Other
    receiving nodes sharing the database keep theirs."""
    with db.session() as session:
        result = session.execute(
            update(Association)
            .where(
                Association.released_at.is_(None),
                or_(Association.receiver == receiver, Association.receiver.is_(None)),
            )
            .values(released_at=db_now(session))
        )
        return int(getattr(result, "rowcount", 0) or 0)


def release_orphaned(
    db: Database, receiver: str, live: Collection[str], started_before: datetime
) -> int:
    """Close ``receiver``'s open associations that its SCP no longer holds: their end could
    not be recorded when they ended, and their studies wait.

    ``live``: the ids the SCP holds, read after ``started_before``; an association is given
    its id before its row is written, so one that started before then and is not in ``live``
    has ended (a newer one may not be in ``live`` yet and is left alone).
    """
    with db.session() as session:
        result = session.execute(
            update(Association)
            .where(
                Association.released_at.is_(None),
                Association.receiver == receiver,
                Association.started_at < started_before,
                Association.id.not_in(list(live)),
            )
            .values(released_at=db_now(session))
        )
        return int(getattr(result, "rowcount", 0) or 0)


def same_pixel_data(stored: Path, received: Path) -> bool | None:
    """True when two files of one SOP Instance UID hold the same pixel data (byte for
    byte), False when it differs, None when it cannot be told: another transfer syntax (a
    re-encoding of maybe the same image), no pixel data (not an image, or purged), or a
    file that cannot be read. Headers are not compared: a PACS forwarding a study may
    coerce IDs or add private elements, which is no correction of the image."""
    try:
        (_, syntax, span), (_, other_syntax, other_span) = (
            _header_and_pixel_span(path) for path in (stored, received)
        )
    except (OSError, ValueError, AttributeError, InvalidInstanceError):
        return None
    if span is None or other_span is None or syntax != other_syntax:
        return None
    (first, end), (other_first, other_end) = span, other_span
    if end - first != other_end - other_first:
        return False
    return _digest(stored, first, end) == _digest(received, other_first, other_end)


def _digest(path: Path, first: int, end: int) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(first)
        left = end - first
        while left > 0:
            chunk = handle.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.digest()
