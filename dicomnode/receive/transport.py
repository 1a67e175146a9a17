"""The node's transport under pynetdicom: bounded PDU reads, and TLS handshakes in each
connection's own thread.

pynetdicom reads a whole PDU into memory, as long as its header says (up to 4 GiB),
4 kB at a time and before anything checks who is calling; it shakes TLS hands in the
loop that accepts connections, so one client that says nothing holds every other off.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode.config import MAX_PDU_CEILING

log = logging.getLogger(__name__)

REQUEST_PDU_LIMIT = 1 << 20
"""Bytes an association request (its first PDU) may declare: a request proposing every
storage SOP class with a dozen transfer syntaxes each is under 100 kB."""

READ_CHUNK = 1 << 20
"""The most bytes one read asks the socket for: a PDU's buffer grows with what arrives,
not with what its header claims."""


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
        received = bytearray()
        chunk = bytearray(min(nr_bytes, READ_CHUNK))
        view = memoryview(chunk)
        try:
            while len(received) < nr_bytes:
                got = self.socket.recv_into(view, min(len(chunk), nr_bytes - len(received)))
                if not got:  # the connection broke: what was read, as pynetdicom returns it
                    break
                received += view[:got]
        finally:
            view.release()
        return received


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


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket, handshake included, in the thread that
    accepts; one client that connects and sends nothing holds every other sender
    off the TLS port for as long as it stays. Here each connection's own thread
    shakes hands, with :data:`HANDSHAKE_SECONDS` to do it.
    """

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
                self.shutdown_request(request)
                return
            request.settimeout(self.ae.network_timeout)
        super().process_request_thread(request, client_address)
