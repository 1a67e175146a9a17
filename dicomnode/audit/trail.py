"""The audit trail: events recorded at once, written by a thread of their own.

A repository that is down never holds up the node: :meth:`AuditTrail.record` only queues.
The thread writes the queue in order, and while the repository cannot be reached it tries
again (1 s, doubling up to a minute), holding up to ``audit.queue_size`` messages; beyond
that the oldest is dropped and the log says how many. The log names the repository and
the error, never the message (it names a patient).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from dicomnode.audit.messages import AuditEvent, AuditSource, to_xml
from dicomnode.audit.spool import Spool, spool_of
from dicomnode.audit.syslog import (
    FileTransport,
    StreamTransport,
    Transport,
    UdpTransport,
    syslog_message,
)
from dicomnode.config import Settings
from dicomnode.errors import AuditError

log = logging.getLogger(__name__)

FIRST_PAUSE = 1.0
LONGEST_PAUSE = 60.0
CLOSING_PAUSE = 0.2


class AuditTrail:
    """Records :class:`AuditEvent` values; :meth:`off` records nothing."""

    def __init__(
        self,
        transport: Transport | None,
        source: AuditSource,
        ae_title: str,
        capacity: int,
        spool: Spool | None = None,
    ) -> None:
        self.transport = transport
        self.source = source
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        self.spool = spool
        self._queue: deque[tuple[bytes, Path | None]] = deque()
        self._capacity = capacity
        self._dropped = 0
        self._busy = False
        self._closing = False
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        """Set by :meth:`close`: pauses after a failure are short, until ``_give_up_at``."""
        self._give_up_at = float("inf")
        self._thread: threading.Thread | None = None
        if spool is not None and transport is not None:
            left = spool.adopt()
            if left:
                with self._wake:
                    self._queue.extend((message, path) for path, message in left)
                    self._start_writer()

    @classmethod
    def off(cls) -> AuditTrail:
        return cls(None, AuditSource("-"), "-", 1)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditTrail:
        audit = settings.audit
        source = AuditSource(audit.source_id or settings.node.ae_title, audit.enterprise_site_id)
        transport = transport_of(settings)
        spool = spool_of(settings) if transport is not None else None
        return cls(transport, source, settings.node.ae_title, audit.queue_size, spool)

    @property
    def on(self) -> bool:
        return self.transport is not None

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs (it ends once closed and the queue is written, or
        the close's time-out passed)."""
        return self._thread is not None and self._thread.is_alive()

    def record(self, event: AuditEvent) -> None:
        """Queue ``event``, stamped with the time now, and keep it in the spool until it is
        written; never waits for the repository."""
        if self.transport is None:
            return
        when = datetime.now(UTC).astimezone()
        xml = to_xml(event, self.source, when)
        message = syslog_message(xml, when=when, hostname=self.hostname, failed=event.failed)
        path = self.spool.keep(message) if self.spool is not None else None
        with self._wake:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()  # its spool file stays: written by the next start
                self._dropped += 1
            self._queue.append((message, path))
            self._start_writer()
            self._wake.notify()

    def _start_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_all, name="audit-trail", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued (up to ``timeout`` seconds), then stop; True when all was
        written. The log says how many messages were left unwritten."""
        if self.transport is None:
            return True
        self._give_up_at = time.monotonic() + timeout
        self._stopping.set()
        with self._wake:
            self._closing = True
            self._wake.notify()
            written = self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)
            left = len(self._queue)
        if not written:
            log.error("audit trail: %d message(s) could not be written before the stop", left)
        self.transport.close()
        return written

    def _write_all(self) -> None:
        assert self.transport is not None
        pause = FIRST_PAUSE
        failing = False
        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return
                message, path = self._queue[0]
                self._busy = True
                self._say_dropped()
            try:
                self.transport.send(message)
            except AuditError as exc:
                if not failing:
                    log.error(
                        "audit trail: the repository cannot be reached (%s); "
                        "messages are held and sent again",
                        exc,
                    )
                failing = True
                with self._wake:
                    self._busy = False
                    self._wake.notify_all()
                if self._stopping.wait(pause):  # closing: try again shortly, until its time-out
                    if time.monotonic() > self._give_up_at:
                        with self._wake:
                            self._say_dropped()  # the last count too
                        return
                    time.sleep(CLOSING_PAUSE)
                pause = min(pause * 2, LONGEST_PAUSE)
                continue
            if failing:
                log.warning("audit trail: the repository takes messages again")
            failing, pause = False, FIRST_PAUSE
            if path is not None and self.spool is not None:
                self.spool.done(path)
            with self._wake:
                if self._queue and self._queue[0][0] is message:
                    self._queue.popleft()
                self._busy = False
                self._wake.notify_all()

    def _say_dropped(self) -> None:
        if self._dropped:
            log.error(
                "audit trail: %d message(s) dropped from memory, the oldest first: more than "
                "audit.queue_size (%d) waited for the repository (those in the spool are sent "
                "by the next start)",
                self._dropped,
                self._capacity,
            )
            self._dropped = 0


def transport_of(settings: Settings) -> Transport | None:
    """The transport ``audit.*`` names (``None``: off); nothing is connected yet."""
    audit = settings.audit
    if audit.transport == "off":
        return None
    if audit.transport == "file":
        assert audit.file is not None
        return FileTransport(audit.file)
    if audit.transport == "udp":
        return UdpTransport(audit.host, audit.repository_port)
    context = None
    if audit.transport == "tls":
        from dicomnode.tls import client_context

        context = client_context(settings.tls)
    return StreamTransport(audit.host, audit.repository_port, context)
