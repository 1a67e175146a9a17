"""Known application entities, kept in the database so a running node sees changes.

Peers declared in the YAML settings are written to the database at start-up
(source ``config``); ``dicomnode ae add|update|remove`` edits them at run time
(source ``cli``). Every association request reads the current list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicomnode.config import (
    PEER_NAME_PATTERN,
    PeerSettings,
    check_address,
    check_dicomweb,
    checked_ae_title,
)
from dicomnode.db.schema import Peer
from dicomnode.db.session import db_now, lock_until_commit
from dicomnode.errors import PeerError


@dataclass(frozen=True)
class PeerInfo:
    name: str
    ae_title: str
    host: str
    port: int
    source: str = "cli"
    tls: bool = False
    commitment: bool = False
    """Delivered results are followed by a storage commitment request (N-ACTION)."""
    dicomweb: str = ""
    """Base URL of its DICOMweb service: results go to it by STOW-RS (empty: C-STORE)."""
    dicomweb_auth_file: str = ""
    """The file holding the HTTP Authorization header value of its DICOMweb service."""

    @classmethod
    def from_settings(cls, name: str, settings: PeerSettings, source: str = "config") -> PeerInfo:
        """The peer the settings file declares as ``name``."""
        return cls(
            name,
            settings.ae_title,
            settings.host,
            settings.port,
            source,
            settings.tls,
            settings.commitment,
            settings.dicomweb,
            settings.dicomweb_auth_file,
        )

    @property
    def address(self) -> str:
        """``AE@host:port`` for messages; a peer without a DICOM port says so."""
        if not self.port:
            return f"{self.ae_title} (no DICOM port{'' if self.host else ', no host'})"
        return f"{self.ae_title}@{self.host}:{self.port}"


def validate(peer: PeerInfo) -> PeerInfo:
    """Raise :class:`PeerError` naming the field that is wrong."""
    if not re.fullmatch(PEER_NAME_PATTERN, peer.name):
        raise PeerError(f"peer name {peer.name!r} must be letters, digits, '_', '.', '-' (max 64)")
    try:
        checked_ae_title(peer.ae_title)
    except ValueError as exc:
        raise PeerError(str(exc)) from None
    try:
        check_address(peer.host, peer.port, peer.dicomweb)
        check_dicomweb(peer.dicomweb, peer.dicomweb_auth_file, peer.commitment)
    except ValueError as exc:
        raise PeerError(str(exc)) from None
    return peer


def _info(row: Peer) -> PeerInfo:
    return PeerInfo(
        row.name,
        row.ae_title,
        row.host,
        row.port,
        row.source,
        bool(row.tls),
        bool(row.commitment),
        row.dicomweb or "",
        row.dicomweb_auth_file or "",
    )


def destination_host(peer: PeerInfo) -> str:
    """Where results to ``peer`` go: its DICOMweb service's host, else its DICOM host."""
    return (urlsplit(peer.dicomweb).hostname or peer.host) if peer.dicomweb else peer.host


def list_peers(session: Session) -> list[PeerInfo]:
    return [_info(r) for r in session.execute(select(Peer).order_by(Peer.name)).scalars()]


def get_peer(session: Session, name: str) -> PeerInfo:
    row = session.get(Peer, name)
    if row is None:
        known = ", ".join(p.name for p in list_peers(session)) or "none"
        raise PeerError(
            f"unknown peer {name!r}; known peers: {known} (add one with `dicomnode ae add`)"
        )
    return _info(row)


def peer_by_ae_title(session: Session, ae_title: str) -> PeerInfo | None:
    row = session.execute(
        select(Peer).where(Peer.ae_title == ae_title.strip()).limit(1)
    ).scalar_one_or_none()
    return None if row is None else _info(row)


def known_ae_titles(session: Session) -> list[str]:
    return list(session.execute(select(Peer.ae_title).distinct()).scalars())


def _check_unique_ae_title(session: Session, peer: PeerInfo) -> None:
    """Refuse an AE title another peer has: results would go to either of them."""
    other = session.execute(
        select(Peer.name).where(Peer.ae_title == peer.ae_title, Peer.name != peer.name).limit(1)
    ).scalar_one_or_none()
    if other is not None:
        raise PeerError(f"AE title {peer.ae_title!r} belongs to peer {other!r} already")


def _check_not_from_config(session: Session, name: str, action: str) -> None:
    row = session.get(Peer, name)
    if row is not None and row.source == "config":
        raise PeerError(
            f"peer {name!r} comes from the configuration file; {action} it there (peers.{name})"
        )


def add_peer(session: Session, peer: PeerInfo) -> None:
    validate(peer)
    if session.get(Peer, peer.name) is not None:
        raise PeerError(f"peer {peer.name!r} exists; use `dicomnode ae update`")
    _check_unique_ae_title(session, peer)
    session.add(_written(session, Peer(name=peer.name), peer))


def _written(session: Session, row: Peer, peer: PeerInfo) -> Peer:
    """``row`` holding ``peer`` (all but its name), stamped now."""
    row.ae_title, row.host, row.port, row.source = peer.ae_title, peer.host, peer.port, peer.source
    row.tls, row.commitment = peer.tls, peer.commitment
    row.dicomweb, row.dicomweb_auth_file = peer.dicomweb, peer.dicomweb_auth_file
    row.updated_at = db_now(session)
    return row


def update_peer(
    session: Session,
    name: str,
    *,
    ae_title: str | None = None,
    host: str | None = None,
    port: int | None = None,
    tls: bool | None = None,
    commitment: bool | None = None,
    dicomweb: str | None = None,
    dicomweb_auth_file: str | None = None,
) -> PeerInfo:
    """Change the given fields of a peer added with the CLI (``dicomweb=""`` sends its
    results by C-STORE again)."""
    current = get_peer(session, name)
    _check_not_from_config(session, name, "change")
    new = validate(
        PeerInfo(
            name,
            ae_title or current.ae_title,
            current.host if host is None else host,
            current.port if port is None else port,
            "cli",
            current.tls if tls is None else tls,
            current.commitment if commitment is None else commitment,
            current.dicomweb if dicomweb is None else dicomweb,
            current.dicomweb_auth_file if dicomweb_auth_file is None else dicomweb_auth_file,
        )
    )
    _check_unique_ae_title(session, new)
    row = session.get(Peer, name)
    assert row is not None
    _written(session, row, new)
    return new


def remove_peer(session: Session, name: str, destinations: Sequence[str] = ()) -> None:
    """Remove a peer added with the CLI; not one of the file's, nor a result destination."""
    get_peer(session, name)
    _check_not_from_config(session, name, "remove")
    if name in destinations:
        raise PeerError(
            f"peer {name!r} is a result destination (results.destinations or results.routes)"
        )
    session.execute(delete(Peer).where(Peer.name == name))


def sync_config_peers(session: Session, peers: dict[str, PeerSettings]) -> None:
    """Write the peers of the settings file into the database (config wins for those names).

    Peers that came from the file and are no longer in it are removed: they may not send
    to the node any more. Nodes that start at once take turns (on PostgreSQL both found a
    peer missing, and the second start failed on its primary key).
    """
    lock_until_commit(session, "peers from the settings file")
    session.execute(delete(Peer).where(Peer.source == "config", Peer.name.not_in(list(peers))))
    for name, settings in peers.items():
        row = session.get(Peer, name)
        written = _written(session, row or Peer(name=name), PeerInfo.from_settings(name, settings))
        if row is None:
            session.add(written)
