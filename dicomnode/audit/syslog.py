"""Syslog (RFC 5424) carriage of audit messages: UDP (RFC 5426), TCP and TLS (RFC 5425,
octet counting), or lines appended to a file. ATNA (ITI-20) fixes the facility (10,
security/authorization), the MSGID and the UTF-8 BOM before the XML."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
from datetime import datetime
from pathlib import Path
from typing import Protocol

from dicomnode.errors import AuditError

FACILITY = 10
NOTICE = 5
WARNING = 4
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
APP_NAME = "dicomnode"


def syslog_message(xml: bytes, *, when: datetime, hostname: str, failed: bool) -> bytes:
    """One RFC 5424 message carrying ``xml`` (severity warning for a failure, else notice)."""
    priority = FACILITY * 8 + (WARNING if failed else NOTICE)
    timestamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (
        f"<{priority}>1 {timestamp} {_printable(hostname, 255)} {APP_NAME} {os.getpid()} {MSGID} - "
    )
    return header.encode("ascii") + BOM + xml


def _printable(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, ``-`` when empty (RFC 5424 6.2)."""
    kept = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


class Transport(Protocol):
    """Where messages go; ``send`` raises :class:`AuditError` when it cannot."""

    def send(self, message: bytes) -> None: ...

    def probe(self) -> str:
        """Whether messages could be written now: what was found, or AuditError."""
        ...

    def close(self) -> None: ...


class UdpTransport:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"udp://{self.address[0]}:{self.address[1]}"

    def send(self, message: bytes) -> None:
        try:
            if self._socket is None:
                info = socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)[0]
                self._socket = socket.socket(info[0], socket.SOCK_DGRAM)
                self._socket.connect(info[4])
            self._socket.send(message)
        except OSError as exc:
            self.close()
            raise AuditError(f"{self.url}: {exc}") from exc

    def probe(self) -> str:
        """Only the address can be checked: nothing answers a datagram."""
        try:
            socket.getaddrinfo(*self.address, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise AuditError(f"{self.url}: {exc}") from exc
        return f"{self.url} resolves (UDP has no answer to check)"

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class StreamTransport:
    """TCP, or TLS with ``context``: one connection kept open, made again after a failure."""

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext | None, timeout: float = 10.0
    ) -> None:
        self.host, self.port, self.context, self.timeout = host, port, context, timeout
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.context else 'tcp'}://{self.host}:{self.port}"

    def send(self, message: bytes) -> None:
        try:
            if self._socket is not None and _closed_by_peer(self._socket):
                self.close()  # a repository restarted: write to the new one, not into the void
            if self._socket is None:
                self._socket = self._connect()
            self._socket.sendall(b"%d " % len(message) + message)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise AuditError(f"{self.url}: {exc}") from exc

    def probe(self) -> str:
        """Connect (and shake hands over TLS), then close."""
        try:
            self._connect().close()
        except (OSError, ssl.SSLError) as exc:
            raise AuditError(f"{self.url}: {exc}") from exc
        return f"{self.url} accepts a connection" + (" (TLS)" if self.context else "")

    def _connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self.context is None:
            return raw
        try:
            return self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the repository closed the connection. It never writes to it, so a readable
    socket is one at its end (or one with a TLS record to read, such as a session ticket)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return not sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


class FileTransport:
    """One message per line, appended (mode 0640: the file names patients)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, message: bytes) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, message + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuditError(f"audit file {self.path}: {exc}") from exc

    def probe(self) -> str:
        folder = self.path.parent
        writable = (
            os.access(self.path, os.W_OK) if self.path.exists() else os.access(folder, os.W_OK)
        )
        if not writable:
            raise AuditError(f"audit file {self.path} cannot be written")
        return f"{self.path} can be written"

    def close(self) -> None:
        pass
