"""The node's transport under pynetdicom: bounded PDU reads, and TLS handshakes in each
connection's own thread.

pynetdicom reads a whole PDU into memory, as long as its header says (up to 4 GiB),
4 kB at a time and before anything checks who is calling; it shakes TLS hands in the
loop that accepts connections, so one client that says nothing holds every other off.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode.audit.events import caller_refused
from dicomnode.audit.trail import AuditTrail
from dicomnode.config import MAX_PDU_CEILING

log = logging.getLogger(__name__)

REQUEST_PDU_LIMIT = 1 << 20
"""Bytes an association request (its first PDU) may declare: a request proposing every
storage SOP class with a dozen transfer syntaxes each is under 100 kB."""

READ_CHUNK = 1 << 20
"""The most bytes one read asks the socket for: a PDU's buffer grows with what arrives,
not with what its header claims."""

REQUEST_READ_CHUNK = 1 << 16
"""The read size before an association is accepted: a stranger's header claiming a 1 MiB
request reserves 64 KiB, not 1 MiB, per connection."""

REQUEST_SECONDS = 10.0
"""How long a connection has, from its first byte read, to send its whole association
request. A sender sends it at once; one that trickles it a byte at a time would otherwise
hold a slot of ``node.max_associations`` for as long as it liked."""


class BoundedSocket(AssociationSocket):
    """An association's socket that refuses a PDU declared longer than the node reads and
    reads the others in large chunks.

    pynetdicom reads a whole PDU into memory, as long as its header says (up to 4 GiB),
    before anything checks who is calling, 4 kB at a time. Before the association is
    accepted a PDU may be :data:`REQUEST_PDU_LIMIT` long (or the node's advertised
    maximum, if larger), after it :data:`~dicomnode.config.MAX_PDU_CEILING`; a longer one
    closes the connection at its header.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        limit = self._limit()
        if nr_bytes > limit:
            log.warning(
                "connection from %s closed: it declared a PDU of %d bytes (at most %d read)",
                self.assoc.requestor.address,
                nr_bytes,
                limit,
            )
            raise OSError(f"a PDU of {nr_bytes} bytes is over the limit of {limit}")
        return self._read(nr_bytes)

    def _limit(self) -> int:
        if self.assoc.is_established:
            return MAX_PDU_CEILING
        advertised = int(self.assoc.acceptor.maximum_length or 0) + 6  # its header
        return max(REQUEST_PDU_LIMIT, advertised)

    def _read(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``recv``: ``nr_bytes`` read, or fewer when the connection broke."""
        assert self.socket is not None
        requesting = self.assoc.requestor.primitive is None  # the request not read yet
        received = bytearray()
        chunk = bytearray(min(nr_bytes, REQUEST_READ_CHUNK if requesting else READ_CHUNK))
        view = memoryview(chunk)
        try:
            while len(received) < nr_bytes:
                if requesting:
                    self._wait_until_request_deadline()
                try:
                    got = self.socket.recv_into(view, min(len(chunk), nr_bytes - len(received)))
                except TimeoutError:
                    if requesting:
                        self._request_too_slow()
                    raise
                if not got:  # the connection broke: what was read, as pynetdicom returns it
                    break
                received += view[:got]
        finally:
            view.release()
            if requesting:
                with contextlib.suppress(OSError):  # closed meanwhile
                    self.socket.settimeout(self.assoc.network_timeout)
        return received

    def _wait_until_request_deadline(self) -> None:
        """Wait for the association request's next bytes only until its deadline
        (:data:`REQUEST_SECONDS` from the first read); past it, close the connection."""
        assert self.socket is not None
        now = time.monotonic()
        deadline: float = self.__dict__.setdefault("_request_deadline", now + REQUEST_SECONDS)
        if now >= deadline:
            self._request_too_slow()
        self.socket.settimeout(min(deadline - now, self.assoc.network_timeout or REQUEST_SECONDS))

    def _request_too_slow(self) -> None:
        log.warning(
            "connection from %s closed: no whole association request within %.0f s",
            self.assoc.requestor.address,
            REQUEST_SECONDS,
        )
        raise TimeoutError(f"no association request within {REQUEST_SECONDS:.0f} s")


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler, its associations reading through :class:`BoundedSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        socket_ = assoc.dul.socket
        assert type(socket_) is AssociationSocket
        socket_.__class__ = BoundedSocket  # a subclass with no state of its own
        return assoc


HANDSHAKE_SECONDS = 10.0
"""How long a connection to the TLS port has to complete its handshake."""


WAITING_LOG_SECONDS = 60.0
"""One log line a minute, at most, per address whose connections are closed as waiting."""


def _closed(request: Any) -> bool:
    """The accepted connection's socket is closed (its association has ended)."""
    try:
        return bool(request.fileno() == -1)
    except (AttributeError, OSError, ValueError):
        return True


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of the accept loop,
    and a bound on the connections of one address that wait to send their request.

    pynetdicom wraps each accepted socket, handshake included, in the thread that
    accepts; one client that connects and sends nothing holds every other sender
    off the TLS port for as long as it stays. Here each connection's own thread
    shakes hands, with :data:`HANDSHAKE_SECONDS` to do it.

    pynetdicom counts a connection against ``node.max_associations`` from the moment it
    is accepted, before anything checks who is calling. A connection from an address
    that already has ``node.max_waiting_per_address`` connections waiting to send their
    association request is closed at once, so one host cannot take every slot.
    """

    _logged: dict[str, float]

    def verify_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> bool:
        address = str(client_address[0])
        limit = int(getattr(self.ae, "max_waiting_per_address", 0) or 0)
        if not limit:
            return True
        if self._waiting(address) < limit:
            accepted = self.__dict__.setdefault("_accepted", {})
            accepted[request] = address  # counted from its accept: a burst is bounded too
            return True
        logged = self.__dict__.setdefault("_logged", {})
        now = time.monotonic()
        if now - logged.get(address, -WAITING_LOG_SECONDS) >= WAITING_LOG_SECONDS:
            logged[address] = now
            log.warning(
                "connections from %s closed at once: %d of its connections are waiting to "
                "send their association request (node.max_waiting_per_address); said once "
                "a minute",
                address,
                limit,
            )
        return False

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        self.__dict__.setdefault("_accepted", {}).pop(request, None)
        super().shutdown_request(request)

    def _waiting(self, address: str) -> int:
        """Connections from ``address`` that are open and whose association request has not
        been read. Each is counted from its accept (:meth:`verify_request`, in the
        accepting thread, before its own thread has started); one whose socket is closed
        is forgotten (pynetdicom closes a finished association's socket itself, and calls
        :meth:`shutdown_request` only when the association's thread failed)."""
        accepted: dict[Any, str] = self.__dict__.setdefault("_accepted", {})
        for request in [r for r in list(accepted) if _closed(r)]:
            accepted.pop(request, None)
        requested = {
            id(assoc.dul.socket.socket)
            for assoc in list(self.active_associations)
            if assoc.requestor.primitive is not None and assoc.dul.socket is not None
        }
        return sum(
            1
            for request, owner in list(accepted.items())
            if owner == address and id(request) not in requested
        )

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.ae.network_timeout)  # a sender silent mid-PDU is let go
        if self.ssl_context is not None:
            client.settimeout(HANDSHAKE_SECONDS)
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:
                log.warning("TLS handshake from %s failed: %s", client_address, exc)
                self._audit_handshake(str(client_address[0]), exc)
                self.shutdown_request(request)
                return
            request.settimeout(self.ae.network_timeout)
        super().process_request_thread(request, client_address)

    def _audit_handshake(self, address: str, exc: Exception) -> None:
        """A Security Alert (Node Authentication) for a failed TLS handshake."""
        audit: AuditTrail | None = getattr(self.ae, "audit", None)
        if audit is not None:
            reason = f"TLS handshake failed: {exc}"
            audit.record(
                caller_refused(audit.ae_title, caller_ae="", caller_address=address, reason=reason)
            )
