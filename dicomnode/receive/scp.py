"""The Storage SCP: association policy and thin C-ECHO / C-STORE handlers.

pynetdicom writes the received bytes to a file as they arrive (no decoding,
no re-encoding); the C-STORE handler only validates the header, fsyncs and
renames that file and records the instance; a success status means both are
durable. Everything else happens in workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import ssl
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

from pydicom import uid as uids
from pynetdicom import AE, AllStoragePresentationContexts, _config, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.audit.events import caller_refused
from dicomnode.audit.objects import ReceivedStudies
from dicomnode.audit.trail import AuditTrail
from dicomnode.config import DEFAULT_MAX_PDU, NodeSettings, RoutingSettings, Settings
from dicomnode.db.schema import Instance
from dicomnode.db.session import Database
from dicomnode.errors import (
    IncompleteInstanceError,
    InvalidInstanceError,
    StorageError,
    StorageFullError,
)
from dicomnode.peers import known_ae_titles, peer_by_ae_title
from dicomnode.receive import statuses
from dicomnode.receive.callers import caller_matches, ip_of
from dicomnode.receive.transport import BoundedRequestHandler, NodeServer
from dicomnode.send.commitment import take_report
from dicomnode.store.files import ensure_free_space
from dicomnode.store.instances import (
    PURGED,
    facts_from_dataset,
    read_received,
    release_association,
    release_orphaned,
    same_pixel_data,
    store_instance,
)
from dicomnode.values import STORE_PRIORITY, Priority

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLossless,
    uids.JPEGLosslessSV1,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.RLELossless,
    uids.HTJ2KLossless,
    uids.HTJ2KLosslessRPCL,
    uids.HTJ2K,
)
"""Transfer syntaxes accepted for every storage SOP class."""

INCOMING_PREFIX = ".receiving-"
_NOBODY = "~" * 17
"""An AE title longer than 16 characters: matches no caller (pynetdicom treats [] as 'anyone')."""


class NodeAE(AE):
    """An AE whose list of allowed calling AE titles is read from the database per association."""

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__(ae_title=settings.node.ae_title)
        self._settings = settings
        self._db = db
        self.max_waiting_per_address = settings.node.max_waiting_per_address
        self.audit = AuditTrail.off()
        """Where :class:`~dicomnode.receive.transport.NodeServer` records failed TLS
        handshakes (the handlers' trail, set by :func:`start_scp`)."""

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if self._settings.node.allow_unknown_callers:
            return []
        with self._db.session() as session:
            titles = known_ae_titles(session)
        return titles or [_NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("allowed callers come from the peers table; use `dicomnode ae add`")

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        """pynetdicom's server, as :class:`NodeServer` when non-blocking (``start_server``)."""
        if kwargs.get("server_class") is ThreadedAssociationServer:
            kwargs["server_class"] = NodeServer
            kwargs["request_handler"] = BoundedRequestHandler
        return super().make_server(*args, **kwargs)


class StoreHandlers:
    """Event handlers bound to their dependencies (no globals)."""

    def __init__(self, settings: Settings, db: Database, audit: AuditTrail | None = None) -> None:
        self.settings = settings
        self.db = db
        self.audit = audit or AuditTrail.off()
        self.received = ReceivedStudies(self.audit)
        self.data_dir = Path(settings.storage.data_dir)
        self.receiver = receiver_name(settings)
        self._associations: dict[int, str] = {}
        self._activity: dict[int, float] = {}
        self._stored: dict[int, tuple[str, int]] = {}
        """Per association from its acceptance to its release or abort: the id it is logged
        under, and the instances stored over it (kept apart from the ids of
        :meth:`association_id`, which its connection's close may drop first)."""
        self._lock = threading.Lock()

    def association_id(self, assoc: Any) -> str:
        with self._lock:
            return self._associations.setdefault(id(assoc), str(uuid.uuid4()))

    def on_data(self, event: evt.Event) -> None:
        """A PDU arrived: the association is busy (see :meth:`idle_seconds`)."""
        self._activity[id(event.assoc)] = time.monotonic()

    def idle_seconds(self, assoc: Any) -> float:
        """Seconds since ``assoc`` last sent the node anything (infinite: never)."""
        last = self._activity.get(id(assoc))
        return float("inf") if last is None else time.monotonic() - last

    def live_associations(self) -> set[str]:
        """The ids of the associations this SCP holds now."""
        with self._lock:
            return set(self._associations.values())

    def release_orphaned(self) -> int:
        """Record the end of this SCP's associations whose end could not be recorded."""
        started_before = self.db.now()
        return release_orphaned(self.db, self.receiver, self.live_associations(), started_before)

    def on_echo(self, event: evt.Event) -> int:
        return statuses.SUCCESS

    def on_event_report(self, event: evt.Event) -> tuple[int, None]:
        """A peer's storage commitment report (N-EVENT-REPORT), on an association of its own."""
        return take_report(self.db, event)

    def on_store(self, event: evt.Event) -> int:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        association_id = self.association_id(event.assoc)
        try:
            status = self._store(event, calling_ae, association_id)
            if status == statuses.SUCCESS:
                self._count_stored(event.assoc)
            return status
        except StorageFullError as exc:
            log.error("C-STORE refused (0xA700): %s", exc)
            return statuses.OUT_OF_RESOURCES
        except StorageError as exc:
            log.error("C-STORE failed (0xA700): %s", exc)
            return statuses.OUT_OF_RESOURCES
        except Exception:
            log.exception("C-STORE failed (0xA700): unexpected error, nothing stored")
            return statuses.OUT_OF_RESOURCES

    def _store(self, event: evt.Event, calling_ae: str, association_id: str) -> int:
        request = cast(C_STORE, event.request)
        received = Path(event.dataset_path)  # written by pynetdicom as the data arrived
        ensure_free_space(self.data_dir, self.settings.storage.min_free_mb)
        try:
            header = read_received(received)
            transfer_syntax = str(event.context.transfer_syntax)
            facts = facts_from_dataset(header, transfer_syntax, str(request.AffectedSOPClassUID))
        except IncompleteInstanceError as exc:
            log.warning(
                "C-STORE rejected (0xC000) from %s: %s (sop=%s); nothing stored",
                calling_ae,
                exc,
                str(request.AffectedSOPInstanceUID).strip(),
            )
            return statuses.CANNOT_UNDERSTAND
        except InvalidInstanceError as exc:
            log.warning("C-STORE rejected (0xC001) from %s: %s", calling_ae, exc)
            return statuses.MISSING_UID
        except Exception as exc:  # pydicom raises many types for broken data
            log.warning(
                "C-STORE rejected (0xC000) from %s: dataset cannot be parsed (%s)",
                calling_ae,
                type(exc).__name__,
            )
            return statuses.CANNOT_UNDERSTAND
        if facts.sop_class_uid != str(request.AffectedSOPClassUID):
            log.warning(
                "C-STORE rejected (0xA900): SOP Class differs from the request (%s)", facts.sop_uid
            )
            return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
        if facts.sop_uid != str(request.AffectedSOPInstanceUID).strip():
            log.warning(
                "C-STORE rejected (0xC001): SOP Instance UID differs from the request (%s)",
                facts.sop_uid,
            )
            return statuses.MISSING_UID
        outcome = store_instance(
            self.db,
            self.data_dir,
            facts,
            received,
            calling_ae=calling_ae,
            association_id=association_id,
            receiver=self.receiver,
            priority=priority_of(self.settings.routing, calling_ae, request.Priority),
        )
        log.info(
            "stored sop=%s study=%s from=%s%s",
            facts.sop_uid,
            facts.study_uid,
            calling_ae,
            " (duplicate, kept the first copy)" if outcome.duplicate else "",
        )
        if outcome.duplicate:
            self._warn_if_changed(facts.sop_uid, received)
        patient_id = str(header.get("PatientID", "") or "")
        self.received.stored(id(event.assoc), facts.study_uid, patient_id, facts.sop_class_uid)
        return statuses.SUCCESS

    def _warn_if_changed(self, sop_uid: str, received: Path) -> None:
        """A copy of a stored image with other pixel data: a correction sent under the same
        SOP Instance UID (against the standard, but done). The first copy stays and is what
        was analysed; say so, and how to have the correction analysed. Never fails the
        C-STORE: the instance is stored."""
        try:
            with self.db.session() as session:
                stored = session.get(Instance, sop_uid)
                path = None if stored is None or stored.state == PURGED else Path(stored.path)
            changed = path is not None and same_pixel_data(path, received) is False
        except Exception as exc:
            log.debug("sop=%s: the copies could not be compared (%s)", sop_uid, type(exc).__name__)
            return
        if changed:
            log.warning(
                "sop=%s was sent again with other pixel data: the first copy is kept, and "
                "its results stand. A corrected image needs a new SOP Instance UID; or run "
                "`dicomnode forget STUDY_UID` and send the study again",
                sop_uid,
            )

    def on_accepted(self, event: evt.Event) -> None:
        """One line per association, with the id its instances are recorded under."""
        requestor = event.assoc.requestor
        association_id = self.association_id(event.assoc)
        self._stored[id(event.assoc)] = (association_id, 0)
        log.info(
            "association %s from AE %r at %s:%s accepted",
            association_id,
            str(requestor.ae_title).strip(),
            requestor.address,
            requestor.port,
        )

    def _count_stored(self, assoc: Any) -> None:
        association_id, count = self._stored.get(id(assoc), (self.association_id(assoc), 0))
        self._stored[id(assoc)] = (association_id, count + 1)

    def on_released(self, event: evt.Event) -> None:
        association_id, count = self._stored.pop(id(event.assoc), ("?", 0))
        self._audit_received(event.assoc, aborted=False)
        log.info("association %s released: %d instance(s) stored", association_id, count)

    def on_aborted(self, event: evt.Event) -> None:
        """The sender (or the network) broke the association off: what arrived is kept, and
        the sender is expected to send the rest again (a follow-up report covers it). The
        node's own aborts (a silent sender timed out, a stop) are said at INFO."""
        association_id, count = self._stored.pop(id(event.assoc), ("?", 0))
        self._audit_received(event.assoc, aborted=True)
        if getattr(event.assoc, "_sent_abort", False):
            log.info(
                "association %s aborted by the node (time-out or stop) after %d instance(s) stored",
                association_id,
                count,
            )
            return
        log.warning(
            "association %s from AE %r aborted after %d instance(s) stored: what arrived is "
            "kept and reported once its study settles; images sent again make a follow-up "
            "report",
            association_id,
            str(event.assoc.requestor.ae_title).strip(),
            count,
        )

    def _audit_received(self, assoc: Any, aborted: bool) -> None:
        requestor = assoc.requestor
        caller_ae = str(requestor.ae_title).strip()
        self.received.ended(id(assoc), caller_ae, str(requestor.address), aborted)

    def _refused(self, calling_ae: str, address: str, reason: str) -> None:
        """A Security Alert (Node Authentication) for a caller refused for who it is."""
        self.audit.record(
            caller_refused(
                self.settings.node.ae_title,
                caller_ae=calling_ae,
                caller_address=address,
                reason=reason,
            )
        )

    def on_closed(self, event: evt.Event) -> None:
        self._activity.pop(id(event.assoc), None)  # _stored: popped when released or aborted
        self._audit_received(event.assoc, aborted=True)  # ended with neither: a failure
        with self._lock:
            association_id = self._associations.pop(id(event.assoc), None)
        if association_id is not None:
            self._release(association_id)

    def _release(self, association_id: str, attempts: int = 6) -> None:
        """Record the association's end; retried, since its study's round waits for it."""
        for attempt in range(attempts):
            try:
                release_association(self.db, association_id)
                return
            except Exception as exc:  # a busy or restarting database
                if attempt == attempts - 1:
                    log.error(
                        "association %s: its end could not be recorded (%s); it is closed "
                        "by the next housekeeping pass",
                        association_id,
                        type(exc).__name__,
                    )
                    return
                time.sleep(0.2 * 2**attempt)

    def on_requested(self, event: evt.Event) -> None:
        """Refuse an association before anything is received when the data folder is
        below its free-space floor (transient: the sender retries later), then check a
        registered caller (:meth:`_caller_refusal`)."""
        assoc = event.assoc
        if assoc.requestor.primitive is None:
            return
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if _health_probe(address, calling_ae, self.settings.node):
            return  # rejected quietly by the AE title check; `health` checks the disk itself
        if self._low_on_space(calling_ae, address):
            reject: tuple[int, int, int] | None = REJECT_CONGESTED
        else:
            reject = self._caller_refusal(calling_ae, address, _over_tls(assoc))
        if reject is None:
            return
        assoc.acse.send_reject(*reject)
        assoc.kill()  # as pynetdicom's own rejections: the A-ASSOCIATE-RJ is sent first

    def _low_on_space(self, calling_ae: str, address: str) -> bool:
        """Below the free-space floor, or the free space cannot be read (a volume gone):
        refuse, as the C-STORE would; raising here would let the association through."""
        try:
            ensure_free_space(self.data_dir, self.settings.storage.min_free_mb)
        except StorageFullError as exc:
            reason = str(exc)
        except Exception as exc:
            reason = f"the free space of {self.data_dir} cannot be read ({type(exc).__name__})"
        else:
            return False
        log.error(
            "association from AE %r at %s rejected (transient, temporary congestion): %s",
            calling_ae,
            address,
            reason,
        )
        return True

    def _caller_refusal(
        self, calling_ae: str, address: str, over_tls: bool
    ) -> tuple[int, int, int] | None:
        """Why a caller is refused here, or ``None``: a registered peer's AE title called
        from another address than the peer's host (``node.check_caller_host``), or a peer
        registered with ``tls: true`` calling the plain port (``tls.peers_call_over_tls``);
        unknown AE titles are left to the AE title check. When the database cannot be read
        (PostgreSQL restarting) the refusal is transient, so that the sender keeps the
        study and retries: a permanent "calling AE not recognised" may make a modality
        give up, and pynetdicom would have left the caller without an answer when the AE
        title check raised."""
        check_host = self.settings.node.check_caller_host
        tls = self.settings.tls  # without a TLS listener, tls: true is about sends only
        check_tls = tls.peers_call_over_tls and bool(tls.port) and not over_tls
        if not (check_host or check_tls or not self.settings.node.allow_unknown_callers):
            return None
        try:
            with self.db.session() as session:
                peer = peer_by_ae_title(session, calling_ae)
        except Exception as exc:
            log.error(
                "association from AE %r at %s rejected (transient, temporary congestion): "
                "the database cannot be read (%s); the sender retries later",
                calling_ae,
                address,
                type(exc).__name__,
            )
            return REJECT_CONGESTED
        if peer is None:
            return None
        if check_host and not caller_matches(peer.host, address):
            log.warning(
                "association from AE %r at %s rejected: peer %s is registered at host %s. "
                "Correct its host (`dicomnode ae update %s --host ADDRESS`; a host name "
                "may resolve to several addresses), or behind NAT set "
                "node.check_caller_host: false",
                calling_ae,
                address,
                peer.name,
                peer.host or "none (a DICOMweb-only peer)",
                peer.name,
            )
            self._refused(calling_ae, address, f"not from the host of peer {peer.name}")
            return REJECT_CALLING_AE
        if check_tls and peer.tls:
            log.warning(
                "association from AE %r at %s rejected: peer %s is registered with tls: "
                "true and called the plain port; it must call the TLS port %d (or set "
                "tls.peers_call_over_tls: false)",
                calling_ae,
                address,
                peer.name,
                self.settings.tls.port,
            )
            self._refused(calling_ae, address, f"plain DICOM from peer {peer.name}, a TLS peer")
            return REJECT_CALLING_AE
        return None

    def on_rejected(self, event: evt.Event) -> None:
        """Say why pynetdicom rejected an association (the node's own rejections in
        :meth:`on_requested` log themselves), and what would let the caller in."""
        assoc = event.assoc
        requestor = assoc.requestor
        calling_ae = str(requestor.ae_title).strip()
        if _health_probe(str(requestor.address), calling_ae, self.settings.node):
            log.debug("health probe answered")  # `dicomnode health`, every 30 s in Docker
            return
        reject = _reject_reason(assoc)
        if reject == REJECT_CALLING_AE:
            log.warning(
                "association from AE %r at %s:%s rejected: not a registered peer. Register it "
                "with `dicomnode ae add NAME --ae-title %s --host %s --port PORT` "
                "or set node.allow_unknown_callers: true",
                calling_ae,
                requestor.address,
                requestor.port,
                shlex.quote(calling_ae),  # the caller chose it: quoted for a shell
                requestor.address,
            )
            self._refused(calling_ae, str(requestor.address), "calling AE title not recognised")
        elif reject == REJECT_CALLED_AE:
            log.warning(
                "association from AE %r at %s:%s rejected: it called AE %r, not this node's "
                "%r. Correct the called AE title on the sender, or set "
                "node.check_called_ae: false",
                calling_ae,
                requestor.address,
                requestor.port,
                str(getattr(requestor.primitive, "called_ae_title", "") or "").strip(),
                self.settings.node.ae_title,
            )
        elif reject == REJECT_BUSY:
            log.warning(
                "association from AE %r at %s:%s rejected (transient, local limit exceeded): "
                "the node holds node.max_associations (%d) already; the sender retries later",
                calling_ae,
                requestor.address,
                requestor.port,
                self.settings.node.max_associations,
            )
        else:
            log.warning(
                "association from AE %r at %s:%s rejected (result %s, source %s, reason %s)",
                calling_ae,
                requestor.address,
                requestor.port,
                *(reject or ("?", "?", "?")),
            )

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_N_EVENT_REPORT, self.on_event_report),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_DATA_RECV, self.on_data),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_REQUESTED, self.on_requested),
        ]


def _over_tls(assoc: Any) -> bool:
    """True when ``assoc`` came in on the TLS listener."""
    return isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)


def priority_of(routing: RoutingSettings, calling_ae: str, store_priority: object) -> Priority:
    """The priority of an image's analysis: HIGH from ``routing.urgent_callers``, LOW from
    ``routing.background_callers``, else the C-STORE request's Priority (with
    ``routing.store_priority``; an unknown value is MEDIUM)."""
    if calling_ae in routing.urgent_callers:
        return Priority.HIGH
    if calling_ae in routing.background_callers:
        return Priority.LOW
    if not routing.store_priority or not isinstance(store_priority, int):
        return Priority.MEDIUM
    return STORE_PRIORITY.get(store_priority, Priority.MEDIUM)


def _health_probe(address: str, calling_ae: str, node: NodeSettings) -> bool:
    """An association under the node's own AE title from the node's own address (the
    loopback, or the address it listens on): ``dicomnode health``."""
    ip = ip_of(address)
    own = ip is not None and (ip.is_loopback or ip == ip_of(node.host))
    return own and calling_ae.strip() == node.ae_title


def _reject_reason(assoc: Any) -> tuple[int, int, int] | None:
    """The (result, source, reason) of the A-ASSOCIATE-RJ sent on ``assoc``, if known."""
    primitive = assoc.acceptor.primitive
    try:
        return (int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))
    except (AttributeError, TypeError, ValueError):
        return None


REJECT_CALLING_AE = (0x01, 0x01, 0x03)
"""A-ASSOCIATE-RJ: rejected permanent, by the service user: calling AE title not recognised."""
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
"""A-ASSOCIATE-RJ: rejected permanent, by the service user: called AE title not recognised."""
REJECT_BUSY = (0x02, 0x03, 0x02)
"""A-ASSOCIATE-RJ: rejected transient, by the presentation service provider: local limit
exceeded (pynetdicom's answer over ``maximum_associations``)."""
REJECT_CONGESTED = (0x02, 0x03, 0x01)
"""A-ASSOCIATE-RJ: rejected transient, by the presentation service provider: temporary
congestion (the data folder below its free-space floor)."""


def receive_into(folder: Path) -> None:
    """Have pynetdicom write incoming datasets straight to files in ``folder``.

    The bytes go to disk as the P-DATA fragments arrive (no in-memory copy,
    no re-encoding); the C-STORE handler then only reads the header, fsyncs
    and renames. ``folder`` must be on the same volume as the data folder.
    Files left there by a crash are removed at start-up: none was acknowledged.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(INCOMING_PREFIX + "*"):
        leftover.unlink(missing_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment,attr-defined]
        tempfile.NamedTemporaryFile, dir=folder, prefix=INCOMING_PREFIX
    )


def remove_stale_incoming(folder: Path, older_than_seconds: float) -> int:
    """Remove partial files of associations that ended without a C-STORE response.

    An association aborted mid-transfer (a cancelled send, a dropped network)
    leaves the file pynetdicom was writing. None of them was acknowledged; a
    file not written to for ``older_than_seconds`` belongs to no live transfer.
    Returns how many were removed.
    """
    cutoff = time.time() - older_than_seconds
    removed = 0
    for leftover in folder.glob(INCOMING_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
                removed += 1
    return removed


def build_ae(settings: Settings, db: Database) -> NodeAE:
    """The node's AE with its supported contexts and time-outs."""
    ae = NodeAE(settings, db)
    ae.maximum_pdu_size = settings.node.max_pdu or DEFAULT_MAX_PDU
    ae.network_timeout = settings.node.network_timeout
    ae.maximum_associations = settings.node.max_associations
    ae.require_called_aet = settings.node.check_called_ae
    ae.add_supported_context(Verification)
    # a peer reporting its storage commitment acts as the SOP class' SCP: either role is taken
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
    return ae


def receiver_name(settings: Settings) -> str:
    """This receiving node among those sharing a database: ``host:port`` of its SCP (its
    TLS port on a node that listens for DICOM TLS only)."""
    return f"{os.uname().nodename}:{settings.scp_port}"


def start_scp(
    settings: Settings,
    db: Database,
    handlers: StoreHandlers | None = None,
    tls: ssl.SSLContext | None = None,
) -> ThreadedAssociationServer:
    """Start listening (non-blocking) on ``node.port``, or with ``tls`` (the context of
    :func:`dicomnode.tls.server_context`) on ``tls.port``; raises :class:`OSError` when the
    port is taken."""
    receive_into(Path(settings.storage.data_dir) / "incoming")
    ae = build_ae(settings, db)
    handlers = handlers or StoreHandlers(settings, db)
    ae.audit = handlers.audit
    port = settings.node.port if tls is None else settings.tls.port
    server = ae.start_server(
        (settings.node.host, port),
        block=False,
        evt_handlers=handlers.bindings(),
        ssl_context=tls,
    )
    assert server is not None
    log.info(
        "listening as %s on %s:%s%s",
        settings.node.ae_title,
        settings.node.host,
        port,
        "" if tls is None else " (DICOM TLS)",
    )
    return server
