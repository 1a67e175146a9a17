"""Received instances: header facts, the durable file and its database record."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.filereader import read_file_meta_info
from sqlalchemy import or_, select, text, update
from sqlalchemy.orm import Session

from dicomnode.db.schema import Association, Instance
from dicomnode.db.session import Database, utcnow
from dicomnode.errors import IncompleteInstanceError, InvalidInstanceError
from dicomnode.store.files import (
    checked_uid,
    fsync_file,
    instance_path,
    move_durably,
    remove_quietly,
)

log = logging.getLogger(__name__)


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


_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_received(path: Path) -> Dataset:
    """The dataset of a received file, its large values (the pixel data) left on disk, once
    checked to be whole.

    A sender can deliver a dataset cut short (a truncated file sent as it is): its Pixel
    Data declares more bytes than follow, or its fragments end before their delimiter. Read
    up to the pixel data only, it parses, and would be stored and acknowledged, then fail
    in every analysis, and a good copy sent again would be a duplicate of it. Raises
    :class:`IncompleteInstanceError` naming the element and how much is missing.
    """
    size = path.stat().st_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = dcmread(path, defer_size=1024)
    if any("End of file reached before delimiter" in str(w.message) for w in caught):
        raise IncompleteInstanceError(
            "the dataset is incomplete: an element of undefined length (encapsulated pixel "
            "data or a sequence) ends before its delimiter"
        )
    for tag in list(dataset.keys()):
        element = dataset.get_item(tag, keep_deferred=True)
        length = getattr(element, "length", 0) or 0
        tell = getattr(element, "value_tell", None)
        if tell is not None and length != _UNDEFINED_LENGTH and tell + length > size:
            name = keyword_for_tag(tag) or str(tag)
            raise IncompleteInstanceError(
                f"the dataset is incomplete: {name} declares {length} bytes, "
                f"{max(0, size - tell)} were received"
            )
    return dataset


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value or "").strip()


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
    session: Session, association_id: str, calling_ae: str, receiver: str | None
) -> None:
    if session.get(Association, association_id) is None:
        session.add(
            Association(
                id=association_id, calling_ae=calling_ae, started_at=utcnow(), receiver=receiver
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
            _ensure_association(session, association_id, calling_ae, receiver)
            session.add(_record(facts, path, size, calling_ae, association_id))
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
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:uid))"), {"uid": sop_uid})


def _record(
    facts: InstanceFacts, path: Path, size: int, calling_ae: str, association_id: str
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
        received_at=utcnow(),
        state="received",
    )


def release_association(db: Database, association_id: str) -> None:
    """Mark an association finished (released, aborted or closed)."""
    with db.session() as session:
        session.execute(
            update(Association)
            .where(Association.id == association_id, Association.released_at.is_(None))
            .values(released_at=utcnow())
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
            .values(released_at=utcnow())
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
            .values(released_at=utcnow())
        )
        return int(getattr(result, "rowcount", 0) or 0)


def instance_file(session: Session, sop_uid: str) -> Path:
    """The stored file of a received instance."""
    path = session.execute(
        select(Instance.path).where(Instance.sop_instance_uid == sop_uid)
    ).scalar_one_or_none()
    if path is None:
        raise InvalidInstanceError(f"instance {sop_uid} is not recorded")
    return Path(path)


def same_dataset(stored: Path, received: Path) -> bool | None:
    """True when two files of one SOP Instance UID hold the same dataset (byte for byte, the
    file meta aside), False when they differ, None when it cannot be told (sent in another
    transfer syntax, or a file that cannot be read)."""
    try:
        starts = [_dataset_start(path) for path in (stored, received)]
        if starts[0][1] != starts[1][1]:
            return None  # another encoding of maybe the same image
        sizes = [
            path.stat().st_size - start
            for path, (start, _) in zip((stored, received), starts, strict=True)
        ]
        if sizes[0] != sizes[1]:
            return False
        return _digest(stored, starts[0][0]) == _digest(received, starts[1][0])
    except (OSError, ValueError, AttributeError):
        return None


def _dataset_start(path: Path) -> tuple[int, str]:
    """Where the dataset begins after the preamble and file meta, and its transfer syntax."""
    meta = read_file_meta_info(path)
    return 132 + 12 + int(meta.FileMetaInformationGroupLength), str(meta.TransferSyntaxUID)


def _digest(path: Path, start: int) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()
