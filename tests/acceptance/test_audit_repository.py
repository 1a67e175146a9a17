"""Acceptance: `dicomnode serve` writes its audit trail to a real syslog server (rsyslog)
while a real Orthanc routes a study through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.testing.audit import Rsyslog, SyslogRecord
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import orthanc_and_node
from dicomnode.testing.peers import LOOPBACK, Orthanc, free_port, wait_for

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not Orthanc.available(), reason="Debian package orthanc is not installed"),
    pytest.mark.skipif(not Rsyslog.available(), reason="Debian package rsyslog is not installed"),
]

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def _sent_classes(records: list[SyslogRecord]) -> set[str]:
    return {
        uid
        for record in records
        if record.event_id == "110104" and record.identification.get("EventActionCode") == "R"
        for uid in record.sop_classes()
    }


def test_serve_audits_its_start_a_study_in_and_its_results_out_and_its_stop(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    make_tiny_model(models / "tiny-knee", num_classes=5, input_size=(96, 96))
    repository = Rsyslog(tmp_path / "rsyslog", free_port()).start()
    try:
        audit = {"transport": "tcp", "host": LOOPBACK, "port": repository.port}
        orthanc, node = orthanc_and_node(tmp_path, models, extra={"audit": audit})
        try:
            node.start()
            wait_for(lambda: bool(repository.records()), 30, what="Application Start")
            source = write_dataset(
                make_radiograph(body_part="KNEE", patient_id="P-AUDIT-5"), tmp_path / "knee.dcm"
            )
            study_id = orthanc.upload(source)["ParentStudy"]
            orthanc.send_study("dicomnode", study_id)
            wait_for(
                lambda: _sent_classes(repository.records()) >= {SC_CLASS, SR_CLASS},
                120,
                interval=0.5,
                what="the results' transfers in the audit trail",
            )
            node.stop()
        finally:
            node.stop()
            orthanc.stop()
        wait_for(
            lambda: any(r.event_type == "110121" for r in repository.records()),
            30,
            what="Application Stop",
        )
        records = repository.records()
    finally:
        repository.stop()
    # rsyslog read each as RFC 5424: facility 10 (security), notice, app and message id
    assert {(r.priority, r.app_name, r.msgid) for r in records} == {
        (85, "dicomnode", "IHE+RFC-3881")
    }
    starts = [r for r in records if r.event_type == "110120"]
    assert starts and records.index(starts[0]) == 0
    received = [
        r
        for r in records
        if r.event_id == "110104" and r.identification.get("EventActionCode") == "C"
    ]
    assert received and all(r.patient_ids == ["P-AUDIT-5"] for r in received)
    assert {r.participants()[0].get("UserID") for r in received} == {"ORTHANC"}
    assert records[-1].event_type == "110121"  # the stop, last
    assert "P-AUDIT-5" not in node.log()
