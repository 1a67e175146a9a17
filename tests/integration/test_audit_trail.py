"""The node's audit trail (IHE ATNA) over a study's whole path: received, refused callers,
results sent, purged, forgotten, peers changed; patient IDs in the trail, never in the log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from dicomnode.audit.spool import spool_of
from dicomnode.audit.trail import AuditTrail
from dicomnode.config import load_settings
from dicomnode.db.schema import Job
from dicomnode.db.session import utcnow
from dicomnode.receive import statuses
from dicomnode.retention import purge_expired
from dicomnode.testing.audit import SyslogRecord, read_audit_file
from dicomnode.testing.images import make_radiograph
from dicomnode.testing.inprocess import SENDER, InProcessNode
from dicomnode.testing.peers import LOOPBACK, wait_for

DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _counts(records: list[SyslogRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        for uid, count in record.sop_classes().items():
            counts[uid] = counts.get(uid, 0) + count
    return counts


def _action(records: list[SyslogRecord], event_id: str, action: str) -> list[SyslogRecord]:
    return [
        r
        for r in records
        if r.event_id == event_id and r.identification.get("EventActionCode") == action
    ]


def test_a_studys_path_is_in_the_audit_trail_and_its_patient_id_not_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    audit_file = tmp_path / "audit.log"
    node = InProcessNode.start(tmp_path, audit_file=audit_file)
    try:
        image = make_radiograph(patient_id="PID-AUDIT-9", body_part="KNEE")
        study_uid = str(image.StudyInstanceUID)
        assert node.send(image) == [statuses.SUCCESS]
        wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="results")
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(DX, ExplicitVRLittleEndian)
        assoc = stranger.associate(LOOPBACK, node.settings.node.port, ae_title="DICOMNODE")
        assert assoc.is_rejected
        later = utcnow() + timedelta(days=node.settings.storage.retention_days + 1)
        assert purge_expired(
            node.db, node.settings.storage.retention_days, now=later, audit=node.worker.audit
        ).studies == (study_uid,)
    finally:
        node.close()  # writes what the trail holds
    records = read_audit_file(audit_file)

    (received,) = _action(records, "110104", "C")
    source, destination = received.participants()
    assert (source.get("UserID"), source.get("NetworkAccessPointID")) == (SENDER, LOOPBACK)
    assert destination.get("AlternativeUserID") == "AETITLES=DICOMNODE"
    assert received.study_uids == [study_uid] and received.patient_ids == ["PID-AUDIT-9"]
    assert _counts([received]) == {DX: 1}

    sent = _action(records, "110104", "R")
    assert sent and all(r.study_uids == [study_uid] for r in sent)
    assert all(r.patient_ids == ["PID-AUDIT-9"] for r in sent)
    assert all(r.participants()[1].get("UserID") == "PACS" for r in sent)
    assert _counts(sent) == {SC: 1, COMPREHENSIVE_SR: 1}

    (refused,) = [r for r in records if r.event_type == "110126"]
    assert refused.participants()[1].get("UserID") == "STRANGER"
    assert refused.identification.findtext("EventOutcomeDescription") == (
        "calling AE title not recognised"
    )

    (purged,) = _action(records, "110105", "D")
    assert purged.study_uids == [study_uid] and purged.patient_ids == ["PID-AUDIT-9"]
    assert _counts([purged]) == {DX: 1}
    assert "retention_days" in (purged.identification.findtext("EventOutcomeDescription") or "")

    assert "PID-AUDIT-9" not in caplog.text  # the trail names the patient, the log never


def _config(tmp_path: Path, audit_file: Path, patient_id: str) -> tuple[Path, str]:
    """The settings file of a node that holds one study of ``patient_id`` (its results
    delivered), auditing to ``audit_file``; and the study's UID."""
    node = InProcessNode.start(tmp_path)
    try:
        image = make_radiograph(patient_id=patient_id, body_part="KNEE")
        assert node.send(image) == [statuses.SUCCESS]
        wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="results")
    finally:
        node.close()
    config = tmp_path / "dicomnode.yaml"
    settings = node.settings
    config.write_text(
        yaml.safe_dump(
            {
                "database": {"url": settings.database.url},
                "storage": {"data_dir": str(settings.storage.data_dir)},
                "models": {"dir": str(settings.models.dir)},
                "audit": {"transport": "file", "file": str(audit_file)},
            }
        )
    )
    return config, str(image.StudyInstanceUID)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_admin_commands_write_their_changes_to_the_trail(tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.log"
    config, study_uid = _config(tmp_path, audit_file, "PID-FORGET-3")
    added = _cli(config, "ae", "add", "ARCHIVE", "--ae-title", "ARCH", "--host", LOOPBACK,
                 "--port", "11199")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert _cli(config, "ae", "remove", "ARCHIVE").returncode == 0
    forgot = _cli(config, "forget", study_uid, "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert "PID-FORGET-3" not in forgot.stdout + forgot.stderr
    records = read_audit_file(audit_file)
    changes = [r for r in records if r.event_type == "110128"]
    descriptions = [r.identification.findtext("EventOutcomeDescription") for r in changes]
    assert descriptions == [f"added peer ARCHIVE: ARCH@{LOOPBACK}:11199", "removed peer ARCHIVE"]
    operator = changes[0].participants()[0]
    assert operator.get("UserIsRequestor") == "true" and operator.get("UserID")
    (deleted,) = _action(records, "110105", "D")
    assert deleted.study_uids == [study_uid] and deleted.patient_ids == ["PID-FORGET-3"]
    # the image, its overlay and its SR, read before they were deleted
    assert _counts([deleted]) == {DX: 1, SC: 1, COMPREHENSIVE_SR: 1}
    person, node = deleted.participants()
    assert person.get("UserIsRequestor") == "true" and node.get("UserIsRequestor") == "false"
    assert not _cli(config, "forget", study_uid, "--yes").returncode  # nothing left: no message
    assert len(_action(read_audit_file(audit_file), "110105", "D")) == 1
    # `status` says where the trail goes and what waits in this host's spool
    spool = spool_of(load_settings(config, environ={}))
    assert json.loads(_cli(config, "status", "--json").stdout)["audit"] == {
        "destination": f"file {audit_file}",
        "waiting": 0,
        "oldest_waiting_since": None,
    }
    stamp = 1_765_000_000 * 10**9  # 2025-12-06 05:46:40 UTC; pid 1 lives: never adopted
    (spool.folder / f"{stamp:020d}-1-000000000.msg").write_bytes(b"<85>1 ...")
    status = _cli(config, "status")
    assert "Audit trail (IHE ATNA)" in status.stdout
    assert "1, the oldest since 2025-12-06 05:46:40 UTC" in status.stdout


def test_a_resend_is_audited_as_ordered_by_the_operator(tmp_path: Path) -> None:
    """`dicomnode resend`: Begin Transferring DICOM Instances, the operator its requestor,
    the peer its destination (the sends are audited by the worker as they happen)."""
    audit_file = tmp_path / "audit.log"
    config, study_uid = _config(tmp_path, audit_file, "PID-RESEND-4")
    dry = _cli(config, "resend", study_uid, "--to", "PACS", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not read_audit_file(audit_file)  # a dry run orders nothing
    resent = _cli(config, "resend", study_uid, "--to", "PACS")
    assert resent.returncode == 0, resent.stderr
    assert "queued 2 result object(s)" in resent.stdout
    (ordered,) = [r for r in read_audit_file(audit_file) if r.event_id == "110102"]
    person, node, peer = ordered.participants()
    assert person.get("UserIsRequestor") == "true"
    assert node.get("AlternativeUserID") == "AETITLES=DICOMNODE"
    assert (peer.get("UserID"), peer.get("NetworkAccessPointID")) == ("PACS", LOOPBACK)
    assert ordered.study_uids == [study_uid] and ordered.patient_ids == ["PID-RESEND-4"]
    assert ordered.sop_classes() == {SC: 1, COMPREHENSIVE_SR: 1}
    assert "PID-RESEND-4" not in resent.stdout + resent.stderr


def test_a_withdrawal_is_audited_as_the_operators_deletion_of_the_results(
    tmp_path: Path,
) -> None:
    """`dicomnode withdraw`: DICOM Instances Accessed, action Delete, the operator its
    requestor, the withdrawn overlay and SR counted, what and why in its description."""
    audit_file = tmp_path / "audit.log"
    config, study_uid = _config(tmp_path, audit_file, "PID-WITHDRAW-5")
    dry = _cli(config, "withdraw", study_uid, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not read_audit_file(audit_file)  # a dry run withdraws nothing
    done = _cli(config, "withdraw", study_uid, "--yes", "--reason", "child's knee")
    assert done.returncode == 0, done.stderr
    (withdrawn,) = _action(read_audit_file(audit_file), "110103", "D")
    person, node = withdrawn.participants()
    assert person.get("UserIsRequestor") == "true" and node.get("UserIsRequestor") == "false"
    assert node.get("AlternativeUserID") == "AETITLES=DICOMNODE"
    assert withdrawn.study_uids == [study_uid] and withdrawn.patient_ids == ["PID-WITHDRAW-5"]
    assert withdrawn.sop_classes() == {SC: 1, COMPREHENSIVE_SR: 1}
    said = withdrawn.identification.findtext("EventOutcomeDescription") or ""
    assert said.endswith("results withdrawn, Rejected for Quality Reasons: child's knee"), said
    assert "PID-WITHDRAW-5" not in done.stdout + done.stderr
    assert _cli(config, "withdraw", study_uid, "--yes").returncode == 1  # nothing left
    assert len(_action(read_audit_file(audit_file), "110103", "D")) == 1


def test_an_audit_trail_that_is_off_writes_nothing(tmp_path: Path) -> None:
    node = InProcessNode.start(tmp_path)
    try:
        assert not node.worker.audit.on
        assert node.send(make_radiograph(body_part="KNEE")) == [statuses.SUCCESS]
        wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="results")
    finally:
        node.close()
    assert not AuditTrail.off().on
    assert not list(tmp_path.rglob("audit*"))
