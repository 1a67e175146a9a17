"""Reading the audit trail back: RFC 5424 messages parsed, and an audit record repository
(syslog over TCP, TLS or UDP) that keeps what it receives."""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import socketserver
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.audit.syslog import BOM
from dicomnode.testing.peers import LOOPBACK, wait_for

HEADER = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) - ")


@dataclass(frozen=True)
class SyslogRecord:
    priority: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    message: ET.Element

    @property
    def event_id(self) -> str:
        return self._code("EventIdentification/EventID")

    @property
    def event_type(self) -> str:
        return self._code("EventIdentification/EventTypeCode")

    @property
    def identification(self) -> ET.Element:
        element = self.message.find("EventIdentification")
        assert element is not None
        return element

    def _code(self, path: str) -> str:
        element = self.message.find(path)
        return "" if element is None else element.get("csd-code", "")

    def participants(self) -> list[ET.Element]:
        return self.message.findall("ActiveParticipant")

    def objects(self, type_code: str) -> list[ET.Element]:
        return [
            o
            for o in self.message.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == type_code
        ]

    def sop_classes(self) -> dict[str, int]:
        """Instances per SOP Class UID over the message's studies."""
        counts: dict[str, int] = {}
        for study in self.objects("2"):
            for sop_class in study.findall("ParticipantObjectDescription/SOPClass"):
                uid = sop_class.get("UID", "")
                counts[uid] = counts.get(uid, 0) + int(sop_class.get("NumberOfInstances", "0"))
        return counts

    @property
    def patient_ids(self) -> list[str]:
        return [o.get("ParticipantObjectID", "") for o in self.objects("1")]

    @property
    def study_uids(self) -> list[str]:
        return [o.get("ParticipantObjectID", "") for o in self.objects("2")]


SCHEMA = Path(__file__).with_name("dicom-audit-message.rnc")


@functools.cache
def _schema() -> Any:
    import lxml.etree
    import rnc2rng

    rng = rnc2rng.dumps(rnc2rng.loads(SCHEMA.read_text()))
    return lxml.etree.RelaxNG(lxml.etree.fromstring(rng.encode()))


def schema_errors(xml: bytes) -> list[str]:
    """Where ``xml`` breaks the DICOM audit message schema (:data:`SCHEMA`, PS3.15 A.5.1)."""
    import lxml.etree

    schema = _schema()
    if schema.validate(lxml.etree.fromstring(xml)):
        return []
    return [str(error) for error in schema.error_log]


def _message(xml: bytes) -> ET.Element:
    """The parsed message, which must validate against the schema."""
    errors = schema_errors(xml)
    assert not errors, f"the audit message breaks the DICOM schema: {errors}"
    return ET.fromstring(xml)


def parse_syslog(data: bytes) -> SyslogRecord:
    """One RFC 5424 message of the node's audit trail, its XML valid by the DICOM audit
    message schema; AssertionError when it is not one."""
    match = HEADER.match(data)
    assert match, f"not an RFC 5424 message: {data[:80]!r}"
    body = data[match.end() :]
    assert body.startswith(BOM), "the message does not start with the UTF-8 BOM"
    priority, timestamp, hostname, app_name, procid, msgid = (
        g.decode("ascii") for g in match.groups()
    )
    message = _message(body[len(BOM) :])
    return SyslogRecord(int(priority), timestamp, hostname, app_name, procid, msgid, message)


def read_audit_file(path: Path) -> list[SyslogRecord]:
    if not path.exists():
        return []
    return [parse_syslog(line) for line in path.read_bytes().splitlines() if line]


class _Collecting(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext | None, port: int) -> None:
        super().__init__((LOOPBACK, port), _FrameHandler)
        self.context = context
        self.records: list[SyslogRecord] = []
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True)
        return sock, address


class _FrameHandler(socketserver.StreamRequestHandler):
    """RFC 5425/6587 octet counting: ``LENGTH SP MESSAGE`` after one another."""

    def handle(self) -> None:
        server: _Collecting = self.server  # type: ignore[assignment]
        with server.lock:
            server.connections.append(self.connection)
        while True:
            length = b""
            while not length.endswith(b" "):
                byte = self.rfile.read(1)
                if not byte:
                    return
                length += byte
            record = parse_syslog(self.rfile.read(int(length)))
            with server.lock:
                server.records.append(record)


class SyslogRepository:
    """An audit record repository on the loopback: TCP, or TLS with ``context``; on
    ``port`` (a free one when 0)."""

    def __init__(self, context: ssl.SSLContext | None = None, port: int = 0) -> None:
        self._server = _Collecting(context, port)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> SyslogRepository:
        self._thread.start()
        return self

    @property
    def records(self) -> list[SyslogRecord]:
        with self._server.lock:
            return list(self._server.records)

    def stop(self) -> None:
        """Stop listening and close every connection (as a repository that goes down)."""
        self._server.shutdown()
        self._server.server_close()
        with self._server.lock:
            for connection in self._server.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()


def receive_udp(sock: socket.socket, count: int, timeout: float = 10.0) -> list[SyslogRecord]:
    """``count`` datagrams from ``sock``, each one message."""
    sock.settimeout(timeout)
    return [parse_syslog(sock.recv(65535)) for _ in range(count)]


RSYSLOGD = "/usr/sbin/rsyslogd"
RSYSLOG_FIELDS = (
    "%syslogfacility%|%syslogseverity%|%timestamp:::date-rfc3339%|%hostname%|%app-name%|"
    "%procid%|%msgid%|%msg%\\n"
)


class Rsyslog:
    """A real syslog server (Debian's rsyslog) as the audit record repository: TCP on the
    loopback, each message parsed as RFC 5424 by rsyslog and written out field by field."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.output = workdir / "messages.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(RSYSLOGD).is_file()

    def start(self) -> Rsyslog:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "rsyslog.conf"
        config.write_text(
            f'global(workDirectory="{self.workdir}")\n'
            'module(load="imtcp")\n'
            f'template(name="fields" type="string" string="{RSYSLOG_FIELDS}")\n'
            'ruleset(name="audit") {\n'
            f'  action(type="omfile" file="{self.output}" template="fields")\n'
            "}\n"
            f'input(type="imtcp" port="{self.port}" address="{LOOPBACK}" ruleset="audit")\n'
        )
        command = [RSYSLOGD, "-n", "-f", str(config), "-i", str(self.workdir / "rsyslogd.pid")]
        log = (self.workdir / "rsyslogd.out").open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._listening, 30, what="rsyslogd listening")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError((self.workdir / "rsyslogd.out").read_text())
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), 1):
            return True
        return False

    def records(self) -> list[SyslogRecord]:
        if not self.output.exists():
            return []
        records = []
        for line in self.output.read_bytes().splitlines():
            facility, severity, timestamp, hostname, app, procid, msgid, message = line.split(
                b"|", 7
            )
            xml = message[len(BOM) :] if message.startswith(BOM) else message
            records.append(
                SyslogRecord(
                    priority=int(facility) * 8 + int(severity),
                    timestamp=timestamp.decode("ascii"),
                    hostname=hostname.decode("ascii"),
                    app_name=app.decode("ascii"),
                    procid=procid.decode("ascii"),
                    msgid=msgid.decode("ascii"),
                    message=_message(xml),
                )
            )
        return records

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None
