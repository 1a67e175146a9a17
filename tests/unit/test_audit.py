"""The audit trail: DICOM audit messages, their syslog carriage, and a repository that is down."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicomnode.audit.events import (
    application_activity,
    caller_refused,
    instances_received,
    instances_sent,
    peers_changed,
    study_deleted,
)
from dicomnode.audit.messages import AuditSource, StudyObject, to_xml
from dicomnode.audit.objects import record_sent, studies_in
from dicomnode.audit.spool import spool_of
from dicomnode.audit.syslog import StreamTransport, UdpTransport, syslog_message
from dicomnode.audit.trail import AuditTrail
from dicomnode.config import load_settings
from dicomnode.errors import AuditError, ConfigError
from dicomnode.testing.audit import (
    SyslogRecord,
    SyslogRepository,
    parse_syslog,
    read_audit_file,
    receive_udp,
)
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.node import make_settings
from dicomnode.testing.peers import LOOPBACK, free_port, wait_for
from dicomnode.testing.tls import OPENSSL, make_pki

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
STUDY = StudyObject("1.2.3.4", {DX: 2, CR: 1})
WHEN = datetime(2026, 12, 6, 17, 0, 0, 123000, tzinfo=UTC)


def _record(event: object, failed: bool = False) -> SyslogRecord:
    xml = to_xml(event, AuditSource("DICOMNODE", "HOSPITAL"), WHEN)  # type: ignore[arg-type]
    return parse_syslog(syslog_message(xml, when=WHEN, hostname="node-1", failed=failed))


def _trail(tmp_path: Path, **audit: object) -> AuditTrail:
    return AuditTrail.from_settings(make_settings(tmp_path, audit=dict(audit)))


def test_a_received_study_is_a_dicom_instances_transferred_message_naming_both_sides() -> None:
    event = instances_received(
        "DICOMNODE",
        caller_ae="MODALITY",
        caller_address="10.1.2.3",
        study=STUDY,
        patient_id="PID-1",
    )
    record = _record(event)
    assert (record.priority, record.app_name, record.msgid) == (85, "dicomnode", "IHE+RFC-3881")
    assert record.timestamp == "2026-12-06T17:00:00.123Z" and record.hostname == "node-1"
    ident = record.identification
    assert record.event_id == "110104"
    assert ident.get("EventActionCode") == "C" and ident.get("EventOutcomeIndicator") == "0"
    source, destination = record.participants()
    assert source.get("UserID") == "MODALITY" and source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointID") == "10.1.2.3"
    assert source.get("NetworkAccessPointTypeCode") == "2"  # an IP address
    assert source.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert destination.get("AlternativeUserID") == "AETITLES=DICOMNODE"
    assert destination.get("NetworkAccessPointTypeCode") == "1"  # the node's host name
    assert destination.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    audit_source = record.message.find("AuditSourceIdentification")
    assert audit_source is not None and audit_source.get("AuditSourceID") == "DICOMNODE"
    assert audit_source.get("AuditEnterpriseSiteID") == "HOSPITAL"
    type_code = audit_source.find("AuditSourceTypeCode")
    assert type_code is not None and type_code.attrib == {"csd-code": "4"}
    (study,) = record.objects("2")
    assert study.get("ParticipantObjectID") == "1.2.3.4"
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
    assert record.sop_classes() == {DX: 2, CR: 1}
    assert record.patient_ids == ["PID-1"]
    (patient,) = record.objects("1")
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    # the schema's order: event, participants, source, objects
    tags = [child.tag for child in record.message]
    assert tags == [
        "EventIdentification",
        "ActiveParticipant",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
        "ParticipantObjectIdentification",
    ]


def test_a_failure_is_a_warning_with_its_reason_on_one_line() -> None:
    event = instances_sent(
        "DICOMNODE",
        peer_ae="PACS",
        peer_host="pacs.example.org",
        study=STUDY,
        patient_id="PID-1",
        failure="1 not delivered:\nrefused (0xA700)",
    )
    record = _record(event, failed=event.failed)
    assert record.priority == 84  # facility 10, severity warning
    ident = record.identification
    assert ident.get("EventActionCode") == "R" and ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "1 not delivered: refused (0xA700)"
    source, destination = record.participants()
    assert source.get("UserIsRequestor") == "true"
    assert source.get("AlternativeUserID") == "AETITLES=DICOMNODE"
    assert destination.get("UserID") == "PACS"
    assert destination.get("NetworkAccessPointTypeCode") == "1"


def test_the_other_events_carry_their_codes() -> None:
    start = _record(application_activity("DICOMNODE", started=True))
    stop = _record(application_activity("DICOMNODE", started=False))
    assert (start.event_id, start.event_type, stop.event_type) == ("110100", "110120", "110121")
    roles = {p.find("RoleIDCode").get("csd-code") for p in start.participants()}  # type: ignore[union-attr]
    assert roles == {"110150", "110151"}  # the application and who launched it
    assert start.patient_ids == []

    refused = _record(
        caller_refused("DICOMNODE", caller_ae="EVIL", caller_address="10.9.9.9", reason="x")
    )
    assert (refused.event_id, refused.event_type) == ("110113", "110126")
    assert refused.identification.get("EventOutcomeIndicator") == "4"
    assert [p.get("UserID") for p in refused.participants()][1] == "EVIL"

    changed = _record(peers_changed("DICOMNODE", change="added peer PACS"))
    assert (changed.event_id, changed.event_type) == ("110113", "110128")
    assert changed.identification.findtext("EventOutcomeDescription") == "added peer PACS"

    deleted = _record(
        study_deleted("DICOMNODE", study=STUDY, patient_id="P", by_operator=True, reason="r")
    )
    assert deleted.event_id == "110105" and deleted.identification.get("EventActionCode") == "D"
    operator, node = deleted.participants()
    assert operator.get("UserIsRequestor") == "true" and node.get("UserIsRequestor") == "false"
    assert deleted.study_uids == ["1.2.3.4"] and deleted.patient_ids == ["P"]
    by_node = _record(
        study_deleted("DICOMNODE", study=STUDY, patient_id="P", by_operator=False, reason="r")
    )
    (only,) = by_node.participants()
    assert only.get("UserIsRequestor") == "true" and only.get("AlternativeUserID")


def test_sent_files_are_counted_per_study_and_failures_said(tmp_path: Path) -> None:
    knee = make_radiograph(patient_id="PID-A", body_part="KNEE")
    other = make_radiograph(patient_id="PID-B", body_part="KNEE")
    same_study = make_radiograph(study_uid=str(knee.StudyInstanceUID), patient_id="PID-A")
    paths = [
        write_dataset(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate((knee, other, same_study))
    ]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    found = {f.study.study_uid: f for f in studies_in([*paths, broken])}
    assert set(found) == {knee.StudyInstanceUID, other.StudyInstanceUID}
    assert found[knee.StudyInstanceUID].patient_id == "PID-A"
    assert sum(found[knee.StudyInstanceUID].study.sop_classes.values()) == 2

    audit_file = tmp_path / "audit.log"
    trail = _trail(tmp_path, transport="file", file=str(audit_file))
    record_sent(trail, "PACS", "127.0.0.1", {paths[0]: "", paths[1]: "refused", paths[2]: ""})
    assert trail.close()
    records = {r.study_uids[0]: r for r in read_audit_file(audit_file)}
    assert records[knee.StudyInstanceUID].identification.get("EventOutcomeIndicator") == "0"
    failed = records[other.StudyInstanceUID].identification
    assert failed.get("EventOutcomeIndicator") == "4"
    assert failed.findtext("EventOutcomeDescription") == "1 not delivered: refused"
    assert records[other.StudyInstanceUID].patient_ids == ["PID-B"]
    assert audit_file.stat().st_mode & 0o777 == 0o640


def test_the_trail_writes_over_tcp_in_order_and_holds_messages_while_the_repository_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = SyslogRepository().start()
    port = repository.port
    trail = _trail(tmp_path, transport="tcp", host=LOOPBACK, port=port)
    for stop in (False, True):
        trail.record(application_activity("DICOMNODE", started=not stop))
    wait_for(lambda: len(repository.records) == 2, 10, what="two messages")
    assert [r.event_type for r in repository.records] == ["110120", "110121"]
    repository.stop()
    caplog.set_level(logging.WARNING)
    trail.record(peers_changed("DICOMNODE", change="while down"))  # on the dead connection
    deadline = time.monotonic() + 10
    while "cannot be reached" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cannot be reached" in caplog.text and "while down" not in caplog.text
    trail.record(peers_changed("DICOMNODE", change="second"))
    # the repository is back on the same port: both messages arrive, in order
    back = _repository_on(port)
    try:
        assert trail.close(timeout=10)
        wait_for(lambda: len(back.records) == 2, 10, what="the held messages")
        changes = [r.identification.findtext("EventOutcomeDescription") for r in back.records]
        assert changes == ["while down", "second"]
        assert "takes messages again" in caplog.text
    finally:
        back.stop()


def _repository_on(port: int) -> SyslogRepository:
    """A repository back on ``port`` (its old socket may take a moment to be free)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return SyslogRepository(port=port).start()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_full_queue_drops_the_oldest_and_says_how_many(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    trail = _trail(tmp_path, transport="tcp", host=LOOPBACK, port=free_port(), queue_size=10)
    for index in range(15):
        trail.record(peers_changed("DICOMNODE", change=f"change {index}"))
    assert not trail.close(timeout=1.5)
    assert "could not be written before the stop" in caplog.text
    wait_for(lambda: not trail.writing, 5, what="the writer to give up")
    dropped = re.findall(r"(\d+) message\(s\) dropped", caplog.text)  # said as they go
    assert sum(int(count) for count in dropped) == 5


def test_udp_sends_one_message_a_datagram(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((LOOPBACK, 0))
        trail = _trail(tmp_path, transport="udp", host=LOOPBACK, port=server.getsockname()[1])
        trail.record(application_activity("DICOMNODE", started=True))
        trail.record(application_activity("DICOMNODE", started=False))
        assert trail.close()
        records = receive_udp(server, 2)
    assert [r.event_type for r in records] == ["110120", "110121"]


def test_transports_raise_audit_errors() -> None:
    with pytest.raises(AuditError, match=re.escape("tcp://127.0.0.1")):
        StreamTransport(LOOPBACK, free_port(), None, timeout=2).send(b"x")
    with pytest.raises(AuditError, match=re.escape("udp://")):
        UdpTransport("no-such-host.invalid", 514).send(b"x")


@pytest.mark.skipif(not Path(OPENSSL).is_file(), reason="openssl is not installed")
def test_tls_shows_the_node_certificate_and_verifies_the_repository(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca_certificate))
    context.load_cert_chain(str(pki.peer.certificate), str(pki.peer.private_key))
    context.verify_mode = ssl.CERT_REQUIRED  # mutual authentication, as ATNA asks
    repository = SyslogRepository(context).start()
    tls = {
        "certificate": str(pki.node.certificate),
        "private_key": str(pki.node.private_key),
        "ca_certificates": str(pki.ca_certificate),
    }
    settings = make_settings(
        tmp_path, tls=tls, audit={"transport": "tls", "host": LOOPBACK, "port": repository.port}
    )
    trail = AuditTrail.from_settings(settings)
    try:
        trail.record(application_activity("DICOMNODE", started=True))
        assert trail.close(timeout=10)
        wait_for(lambda: bool(repository.records), 10, what="the message at the repository")
        assert [r.event_type for r in repository.records] == ["110120"]
    finally:
        repository.stop()
    stranger = make_pki(tmp_path / "stranger", "stranger")
    untrusted = {**tls, "ca_certificates": str(stranger.ca_certificate)}
    other = SyslogRepository(context).start()
    try:
        audit = {"transport": "tls", "host": LOOPBACK, "port": other.port}
        refused = AuditTrail.from_settings(make_settings(tmp_path, tls=untrusted, audit=audit))
        refused.record(application_activity("DICOMNODE", started=True))
        assert not refused.close(timeout=1.5)  # the repository's certificate is not trusted
        assert other.records == []
    finally:
        other.stop()


def test_settings_name_what_a_transport_needs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("audit.file")):
        make_settings(tmp_path, audit={"transport": "file"})
    with pytest.raises(ConfigError, match=re.escape("audit.host")):
        make_settings(tmp_path, audit={"transport": "tcp"})
    with pytest.raises(ConfigError, match=re.escape("audit.transport tls needs tls.certificate")):
        make_settings(tmp_path, audit={"transport": "tls", "host": LOOPBACK})
    assert (
        make_settings(
            tmp_path, audit={"transport": "tls", "host": "h"}, tls=_fake_tls(tmp_path)
        ).audit.repository_port
        == 6514
    )
    assert (
        make_settings(tmp_path, audit={"transport": "udp", "host": "h"}).audit.repository_port
        == 514
    )
    assert not AuditTrail.from_settings(make_settings(tmp_path)).on  # off by default
    config = tmp_path / "unquoted.yaml"
    config.write_text("audit: {transport: off}\n")  # YAML reads an unquoted off as false
    assert load_settings(config, environ={}).audit.transport == "off"


def _fake_tls(tmp_path: Path) -> dict[str, str]:
    files = {}
    for key in ("certificate", "private_key", "ca_certificates"):
        path = tmp_path / key
        path.write_text("x")
        files[key] = str(path)
    return files


def test_health_checks_the_audit_destination(tmp_path: Path) -> None:
    import subprocess

    from dicomnode.health import check_audit, run_checks

    repository = SyslogRepository().start()
    try:
        up = make_settings(
            tmp_path, audit={"transport": "tcp", "host": LOOPBACK, "port": repository.port}
        )
        check = check_audit(up)
        assert (
            check.ok and check.detail == f"tcp://{LOOPBACK}:{repository.port} accepts a connection"
        )
    finally:
        repository.stop()
    down = check_audit(up)
    assert not down.ok and "audit.queue_size" in down.detail
    # a stopped node's message in the spool stays for the node: health takes nothing
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    left = spool_of(up).folder / f"{time.time_ns():020d}-{dead_pid.pid}-000000000.msg"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"<85>1 ...")
    check_audit(up)
    assert left.exists()
    writable = make_settings(tmp_path, audit={"transport": "file", "file": str(tmp_path / "a.log")})
    assert check_audit(writable).ok
    nowhere = {"transport": "file", "file": str(tmp_path / "no-such-folder" / "a.log")}
    assert not check_audit(make_settings(tmp_path, audit=nowhere)).ok
    names = [c.name for c in run_checks(make_settings(tmp_path), scp=False)]
    assert "audit" not in names  # off: not checked
    assert "audit" in [c.name for c in run_checks(writable, scp=False)]


CRASHING = """
import sys, time
from pathlib import Path
from dicomnode.audit.events import peers_changed
from dicomnode.audit.trail import AuditTrail
from dicomnode.testing.node import make_settings

audit = {"transport": "tcp", "host": "127.0.0.1", "port": int(sys.argv[2])}
trail = AuditTrail.from_settings(make_settings(Path(sys.argv[1]), audit=audit))
for index in range(3):
    trail.record(peers_changed("DICOMNODE", change=f"before the crash {index}"))
print("recorded", flush=True)
time.sleep(600)
"""


def test_messages_of_a_process_that_crashed_while_the_repository_was_down_are_sent_later(
    tmp_path: Path,
) -> None:
    """The spool: a node killed (SIGKILL, power cut) while the repository is down loses no
    message; the next trail on the host sends them first, in order, then its own."""
    import subprocess
    import sys

    port = free_port()  # nothing listens: the repository is down
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING, str(tmp_path), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "recorded"
    finally:
        child.kill()
        child.wait()
    spool = tmp_path / "data" / "audit-spool" / socket.gethostname()
    assert len(list(spool.glob("*.msg"))) == 3
    repository = _repository_on(port)
    try:
        trail = _trail(tmp_path, transport="tcp", host=LOOPBACK, port=port)
        trail.record(peers_changed("DICOMNODE", change="after the restart"))
        assert trail.close(timeout=10)
        wait_for(lambda: len(repository.records) == 4, 10, what="four messages")
        changes = [r.identification.findtext("EventOutcomeDescription") for r in repository.records]
    finally:
        repository.stop()
    assert changes == [*(f"before the crash {i}" for i in range(3)), "after the restart"]
    assert list(spool.glob("*.msg")) == []  # each deleted once written
