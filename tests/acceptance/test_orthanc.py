"""Acceptance: a real Orthanc routes a study to `dicomnode serve` and gets SC + SR back."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.testing.images import make_radiograph, make_rejection_note, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import NodeProcess, orthanc_and_node, stop_processes
from dicomnode.testing.peers import Orthanc, free_port, wait_for
from dicomnode.testing.validate import dciodvfy_errors, dsrdump

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not Orthanc.available(), reason="Debian package orthanc is not installed"),
]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    make_tiny_model(tmp_path / "models" / "tiny-knee", num_classes=5, input_size=(96, 96))
    return tmp_path / "models"


@pytest.fixture
def pacs_and_node(tmp_path: Path, models: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """Orthanc and a started node, its Prometheus metrics on (``metrics.port``)."""
    orthanc, node = orthanc_and_node(tmp_path, models, extra={"metrics": {"port": free_port()}})
    try:
        node.start()
        yield orthanc, node
    finally:  # also when the node fails to start: no Orthanc left running
        try:
            node.stop()
        finally:
            orthanc.stop()


def _classes(orthanc: Orthanc, study_id: str) -> list[str]:
    return [
        orthanc.instance_tags(i["ID"]).get("SOPClassUID", "")
        for i in orthanc.study_instances(study_id)
    ]


def _wait_for_results(orthanc: Orthanc, study_id: str, what: str) -> None:
    """Until Orthanc's study holds an SC and an SR (two minutes at most)."""
    wait_for(
        lambda: {SC_CLASS, SR_CLASS} <= set(_classes(orthanc, study_id)),
        120,
        interval=0.5,
        what=what,
    )


def _round_trip(orthanc: Orthanc, tmp_path: Path, what: str) -> str:
    """A knee radiograph uploaded to Orthanc and sent to the node, until its results are back;
    Orthanc's ID of the study."""
    source = write_dataset(make_radiograph(body_part="KNEE"), tmp_path / "knee.dcm")
    study_id: str = orthanc.upload(source)["ParentStudy"]
    orthanc.send_study("dicomnode", study_id)
    _wait_for_results(orthanc, study_id, what)
    return study_id


def _assert_presentation_state(orthanc: Orthanc, study_id: str, tmp_path: Path) -> None:
    """Orthanc's study holds one presentation state, referencing the study's radiograph."""
    instances = [
        orthanc.instance_tags(i["ID"]) | {"ID": i["ID"]} for i in orthanc.study_instances(study_id)
    ]
    (state,) = [t for t in instances if t.get("SOPClassUID") == GSPS_CLASS]
    (original,) = [t for t in instances if t.get("Modality") == "DX"]
    path = orthanc.download(state["ID"], tmp_path / "pr.dcm")
    pr = pydicom.dcmread(path)
    referenced = pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == original["SOPInstanceUID"]
    assert dciodvfy_errors(path) == []


def _infer_job(node: NodeProcess) -> tuple[str, int] | None:
    with sqlite3.connect(node.workdir / "dicomnode.db", timeout=30) as connection:
        row = connection.execute("SELECT state, attempts FROM jobs WHERE kind = 'infer'").fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_orthanc_study_gets_sc_and_sr_back(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    source = write_dataset(
        make_radiograph(body_part="KNEE", patient_name="Private^Person", patient_id="P-99321"),
        tmp_path / "knee.dcm",
    )
    study_id = orthanc.upload(source)["ParentStudy"]
    orthanc.send_study("dicomnode", study_id)
    _wait_for_results(orthanc, study_id, "SC and SR in Orthanc's study")
    for instance in orthanc.study_instances(study_id):
        tags = orthanc.instance_tags(instance["ID"])
        if tags["SOPClassUID"] not in (SC_CLASS, SR_CLASS):
            continue
        path = orthanc.download(instance["ID"], tmp_path / f"{tags['SOPInstanceUID']}.dcm")
        assert dciodvfy_errors(path) == []
        if tags["SOPClassUID"] == SR_CLASS:
            dump = dsrdump(path)
            assert dump.returncode == 0, dump.stderr
            assert "tiny-knee" in dump.stdout
        else:
            assert pydicom.dcmread(path).BurnedInAnnotation == "YES"
    log = node.log()
    assert "Private" not in log and "P-99321" not in log
    status = node.cli("status").stdout
    assert "done" in status
    _assert_private(node)
    _assert_metrics(node)
    _assert_a_labelled_export(orthanc, study_id, tmp_path, node)


def _assert_a_labelled_export(
    orthanc: Orthanc, study_id: str, tmp_path: Path, node: NodeProcess
) -> None:
    """Orthanc's export of the study (its ZIP), graded by accession number, makes a training
    folder of the radiograph alone: the node's own SC, presentation state and SR in the same
    study are left out."""
    export = orthanc.export_study(study_id, tmp_path / "export")
    sheet = tmp_path / "grades.csv"
    sheet.write_text("accession_number,label\nACC0001,3\n", encoding="utf-8")
    made = node.cli("label-export", str(export), str(sheet), "--out", str(tmp_path / "data"))
    assert "1 image linked into" in made.stdout
    assert "Secondary Capture Image Storage" in made.stdout
    assert "Comprehensive SR Storage" in made.stdout
    (taken,) = [p for p in (tmp_path / "data").glob("*/**/*") if p.is_file()]
    assert taken.relative_to(tmp_path / "data").parts[0] == "3"
    assert pydicom.dcmread(taken).Modality == "DX"


def test_a_rejection_note_forwarded_by_orthanc_withdraws_the_results(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    """IHE IOCM with a real PACS: the rejection note of an image, stored in Orthanc and sent
    on with its study, makes the node reject its overlay and SR; Orthanc takes the node's
    note, which validates."""
    orthanc, node = pacs_and_node
    image = make_radiograph(body_part="KNEE")
    study_id: str = orthanc.upload(write_dataset(image, tmp_path / "knee.dcm"))["ParentStudy"]
    orthanc.send_study("dicomnode", study_id)
    _wait_for_results(orthanc, study_id, "SC and SR in Orthanc's study")
    made = {
        orthanc.instance_tags(i["ID"])["SOPInstanceUID"]
        for i in orthanc.study_instances(study_id)
        if orthanc.instance_tags(i["ID"])["SOPClassUID"] in (SC_CLASS, SR_CLASS)
    }
    note = write_dataset(make_rejection_note([image], "113037"), tmp_path / "note.dcm")
    orthanc.upload(note)
    orthanc.send_study("dicomnode", study_id)  # the image and the results again, and the note

    def nodes_note() -> list[dict[str, object]]:
        return [
            {"ID": i["ID"]} | orthanc.instance_tags(i["ID"])
            for i in orthanc.study_instances(study_id)
            if orthanc.instance_tags(i["ID"]).get("SeriesNumber") == "9908"
        ]

    wait_for(lambda: len(nodes_note()) == 1, 120, interval=0.5, what="the node's note")
    (ko,) = nodes_note()
    path = orthanc.download(str(ko["ID"]), tmp_path / "ko.dcm")
    assert dciodvfy_errors(path) == []
    answer = pydicom.dcmread(path)
    assert answer.ConceptNameCodeSequence[0].CodeValue == "113037"
    listed = {
        str(item.ReferencedSOPInstanceUID)
        for series in answer.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert listed == made  # the overlay and the SR; the study has no image left to report
    assert _classes(orthanc, study_id).count(SR_CLASS) == 1
    shown = node.cli("study", str(image.StudyInstanceUID)).stdout
    assert "done, rejected" in shown and "rejects 1 instance(s), 1 of them held here" in shown


def _assert_metrics(node: NodeProcess) -> None:
    """``GET /metrics`` on ``metrics.port`` counts the round trip, without patient data."""
    url = f"http://127.0.0.1:{node.config['metrics']['port']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    figures = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert figures[("dicomnode_database_up", ())] == 1
    assert figures[("dicomnode_jobs", (("kind", "infer"), ("state", "done")))] == 1
    assert figures[("dicomnode_reports", (("model", "tiny-knee"), ("state", "done")))] == 1
    assert figures[("dicomnode_sends", (("peer", "PACS"), ("state", "done")))] == 2  # SC, SR
    assert figures[("dicomnode_turnaround_last_hour_rounds", ())] == 1
    assert 0 < figures[("dicomnode_turnaround_last_hour_seconds", (("quantile", "1"),))] < 120
    assert figures[("process_resident_memory_bytes", ())] > 0  # the node's own process
    assert "Private" not in text and "P-99321" not in text


def _assert_private(node: NodeProcess) -> None:
    """Received images, results, their folders and the database: nothing for other users
    (``storage.umask`` 027, the default)."""
    paths = [*(node.workdir / "data").rglob("*"), *node.workdir.glob("dicomnode.db*")]
    assert any(p.suffix == ".dcm" for p in paths) and (node.workdir / "dicomnode.db") in paths
    exposed = {str(p): oct(p.stat().st_mode & 0o777) for p in paths if p.stat().st_mode & 0o027}
    assert exposed == {}


def _running_worker(node: NodeProcess) -> int:
    """The pid of the worker holding the inference job (``host:pid``, queue.worker_id_of)."""
    with sqlite3.connect(node.workdir / "dicomnode.db", timeout=30) as connection:
        (worker,) = connection.execute("SELECT worker_id FROM jobs WHERE kind = 'infer'").fetchone()
    return int(str(worker).rsplit(":", 1)[1])


def test_worker_killed_mid_job_finishes_once_after_restart(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    wait_for(lambda: bool(node.worker_pids()), 60, what="the worker process")
    # A large image keeps the worker busy long enough to be killed mid-job.
    source = write_dataset(
        make_radiograph(body_part="KNEE", rows=3000, columns=2500), tmp_path / "k.dcm"
    )
    study_id = orthanc.upload(source)["ParentStudy"]
    orthanc.send_study("dicomnode", study_id)
    wait_for(
        lambda: _infer_job(node) == ("running", 1),
        60,
        interval=0.01,
        what="the inference job running",
    )
    first = _running_worker(node)  # the process that holds the job, by its queue id
    assert first in node.worker_pids()
    os.kill(first, signal.SIGKILL)
    _wait_for_results(orthanc, study_id, "results after the restart")
    classes = _classes(orthanc, study_id)
    assert classes.count(SC_CLASS) == 1 and classes.count(SR_CLASS) == 1
    assert _infer_job(node) == ("done", 2)  # ran again after the kill, and only once more
    assert first not in node.worker_pids()
    assert "restarting" in node.log()


def test_cli_manages_peers_and_echoes(pacs_and_node: tuple[Orthanc, NodeProcess]) -> None:
    _, node = pacs_and_node
    assert "status 0x0000" in node.cli("echo", "PACS").stdout
    node.cli("ae", "add", "ARCHIVE", "--ae-title", "ARCH", "--host", "127.0.0.1", "--port", "11999")
    listed = node.cli("ae", "list").stdout
    assert "ARCHIVE" in listed and "ARCH" in listed
    unknown = node.cli("echo", "NOPE", check=False)
    assert unknown.returncode == 2 and "unknown peer" in unknown.stderr
    node.cli("ae", "remove", "ARCHIVE")
    assert "ARCHIVE" not in node.cli("ae", "list").stdout


def test_port_in_use_is_a_clear_error(pacs_and_node: tuple[Orthanc, NodeProcess]) -> None:
    _, node = pacs_and_node
    result = node.cli("serve", check=False)
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and str(node.port) in result.stderr


def test_separate_worker_process_does_the_work(tmp_path: Path, models: Path) -> None:
    """`serve` with no workers receives; `dicomnode worker` (say, a GPU host) runs the jobs."""
    orthanc, node = orthanc_and_node(tmp_path, models, extra={"workers": {"count": 0}})
    worker: subprocess.Popen[bytes] | None = None
    try:
        node.start()
        source = write_dataset(make_radiograph(body_part="KNEE"), tmp_path / "knee.dcm")
        study_id = orthanc.upload(source)["ParentStudy"]
        orthanc.send_study("dicomnode", study_id)
        wait_for(lambda: _infer_job(node) == ("queued", 0), 60, what="a queued job with no worker")
        worker = node.start_worker(1)
        _wait_for_results(orthanc, study_id, "results produced by the separate worker")
    finally:
        try:
            stop_processes([] if worker is None else [worker])
            node.stop()
        finally:
            orthanc.stop()


def test_whole_node_killed_mid_job_resumes_after_restart(
    pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    source = write_dataset(
        make_radiograph(body_part="KNEE", rows=3000, columns=2500), tmp_path / "k.dcm"
    )
    study_id = orthanc.upload(source)["ParentStudy"]
    orthanc.send_study("dicomnode", study_id)
    wait_for(lambda: _infer_job(node) == ("running", 1), 60, interval=0.01, what="the job running")
    node.kill()
    node.start()
    wait_for(
        lambda: {SC_CLASS, SR_CLASS} <= set(_classes(orthanc, study_id)),
        60,
        interval=0.5,
        what="results after the node restarted",
    )
    assert _infer_job(node) == ("done", 2)
    assert "released 1 job(s) of stopped worker" in node.log()


def _open_in_this_process(path: Path) -> bool:
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fd) == str(path.resolve()) for fd in fds.iterdir())


def test_an_orthanc_that_fails_to_start_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its HTTP side came up, its DICOM port did not: start() stops it and raises."""
    from dicomnode.testing import peers

    orthanc = Orthanc(tmp_path / "orthanc")
    started: list[int] = []

    def port_never_opens(port: int, timeout: float = 30.0) -> None:
        assert orthanc.process is not None
        started.append(orthanc.process.pid)
        raise TimeoutError(f"timed out waiting for port {port}")

    monkeypatch.setattr(peers, "wait_for_port", port_never_opens)
    with pytest.raises(TimeoutError):
        orthanc.start()
    (pid,) = started
    assert orthanc.process is None
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(pid, 0)
    assert not _open_in_this_process(tmp_path / "orthanc" / "orthanc.log")


def test_a_stop_lets_an_open_association_end_and_refuses_new_ones(
    pacs_and_node: tuple[Orthanc, NodeProcess],
) -> None:
    """SIGTERM while a modality is mid-series: the series ends, both images are stored.
    (An association that sends nothing for 5 s is not waited for.)"""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    _, node = pacs_and_node
    assert node.process is not None
    node.wait_for_workers(1, timeout=60)
    first = make_radiograph(body_part="KNEE")
    second = make_radiograph(body_part="KNEE", study_uid=first.StudyInstanceUID)
    sender = AE(ae_title="ORTHANC")  # a registered peer
    sender.add_requested_context(first.SOPClassUID, ExplicitVRLittleEndian)
    assoc = sender.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_store(first).Status == 0
    node.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "open association(s) to end" in node.log(), 30, what="the node draining")
    late = sender.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert not late.is_established  # no new association once stopping
    assert assoc.send_c_store(second).Status == 0
    assoc.release()
    assert node.process.wait(60) == 0
    node.process = None
    with sqlite3.connect(node.workdir / "dicomnode.db", timeout=30) as connection:
        stored = {row[0] for row in connection.execute("SELECT sop_instance_uid FROM instances")}
    assert stored == {first.SOPInstanceUID, second.SOPInstanceUID}


def test_orthanc_and_the_node_speak_dicom_tls_both_ways(tmp_path: Path, models: Path) -> None:
    """Orthanc with DICOM TLS on (its SCP, and its SCU to the node's TLS port), the node with
    a TLS listener and Orthanc as a TLS peer: the study goes and the results come back over
    TLS, each side checking the other's certificate against the test CA."""
    from dicomnode.testing.peers import LOOPBACK, free_port
    from dicomnode.testing.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    node_port, node_tls_port = free_port(), free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.peer.certificate),
            "DicomTlsPrivateKey": str(pki.peer.private_key),
            "DicomTlsTrustedCertificates": str(pki.ca_certificate),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": {
                "dicomnode": {
                    "AET": "DICOMNODE",
                    "Host": LOOPBACK,
                    "Port": node_tls_port,
                    "UseDicomTls": True,
                }
            },
        },
    )
    orthanc.start()
    try:
        pacs = {"ae_title": "ORTHANC", "host": LOOPBACK, "port": orthanc.dicom_port, "tls": True}
        tls = {
            "port": node_tls_port,
            "certificate": str(pki.node.certificate),
            "private_key": str(pki.node.private_key),
            "ca_certificates": str(pki.ca_certificate),
        }
        node = NodeProcess.create(
            tmp_path / "node",
            models,
            peers={"PACS": ("ORTHANC", orthanc.dicom_port)},
            destinations=["PACS"],
            extra={"peers": {"PACS": pacs}, "tls": tls},
            port=node_port,
        )
        node.start()
        try:
            _round_trip(orthanc, tmp_path, "the results in Orthanc, over TLS")
            assert f"on 127.0.0.1:{node_tls_port} (DICOM TLS)" in node.log()
            assert "stored sop=" in node.log()
        finally:
            node.stop()
    finally:
        orthanc.stop()


def _commitment(node: NodeProcess) -> tuple[list[tuple[str, str]], list[str | None]]:
    """(state, last error) of the commit jobs, and each send's committed_at."""
    with sqlite3.connect(node.workdir / "dicomnode.db", timeout=30) as connection:
        commits = connection.execute(
            "SELECT state, last_error FROM jobs WHERE kind = 'commit'"
        ).fetchall()
        sends = connection.execute("SELECT committed_at FROM jobs WHERE kind = 'send'").fetchall()
    return [(str(s), str(e)) for s, e in commits], [c for (c,) in sends]


def test_orthanc_commits_to_the_results_it_received(tmp_path: Path, models: Path) -> None:
    """Storage commitment: with PACS marked `commitment`, the node asks Orthanc (N-ACTION) to
    commit to the SC, presentation state (``results.presentation_state``) and SR it
    delivered; Orthanc reports on an association of its own (N-EVENT-REPORT) to the node's
    SCP, and the three sends are marked committed. Orthanc files the presentation state
    with the original, which it references, and it validates."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"dicomnode": ("DICOMNODE", node_port)})
    orthanc.start()
    try:
        pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        node = NodeProcess.create(
            tmp_path / "node",
            models,
            peers={},
            destinations=["PACS"],
            extra={
                "peers": {"PACS": {**pacs, "commitment": True}},
                "results": {"presentation_state": True},
            },
            port=node_port,
        )
        node.start()
        try:
            study_id = _round_trip(orthanc, tmp_path, "SC and SR in Orthanc's study")
            wait_for(lambda: _commitment(node)[0] == [("done", "")], 60, what="commit job done")
            committed = _commitment(node)[1]
            assert len(committed) == 3 and all(committed), committed
            _assert_presentation_state(orthanc, study_id, tmp_path)
            assert "storage commitment report" in node.log()
            peers = node.cli("ae", "list").stdout
            assert "PACS" in peers and "yes" in peers
        finally:
            node.stop()
    finally:
        orthanc.stop()


@pytest.mark.skipif(
    not Orthanc.DICOMWEB_PLUGIN.exists(), reason="Debian package orthanc-dicomweb is not installed"
)
def test_orthanc_takes_the_results_by_stow_rs_with_basic_authentication(
    tmp_path: Path, models: Path
) -> None:
    """A PACS that takes results by DICOMweb: Orthanc with its DICOMweb plugin and HTTP basic
    authentication on. It sends the study by C-STORE; the node sends the SC and SR back by
    STOW-RS to /dicom-web/studies with the credentials of the peer's auth file, which no
    log line shows; both land in the study and validate. ``dicomnode echo`` checks the
    service with the token too, and says when Orthanc refuses a wrong one."""
    node_port = free_port()
    orthanc = Orthanc(
        tmp_path / "orthanc",
        modalities={"dicomnode": ("DICOMNODE", node_port)},
        dicomweb=True,
        user=("dicomnode", "stow-pass-7731"),
    )
    orthanc.start()
    try:
        auth = tmp_path / "orthanc.auth"
        auth.write_text(orthanc.authorization + "\n")
        auth.chmod(0o600)
        pacs = {
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
            "dicomweb": orthanc.dicomweb_url,
            "dicomweb_auth_file": str(auth),
        }
        node = NodeProcess.create(
            tmp_path / "node",
            models,
            peers={},
            destinations=["PACS"],
            extra={"peers": {"PACS": pacs}},
            port=node_port,
        )
        node.start()
        try:
            study_id = _round_trip(orthanc, tmp_path, "SC and SR in Orthanc, by STOW-RS")
            for instance in orthanc.study_instances(study_id):
                tags = orthanc.instance_tags(instance["ID"])
                if tags["SOPClassUID"] in (SC_CLASS, SR_CLASS):
                    # stored through the DICOMweb plugin, not by C-STORE ("DicomProtocol")
                    assert orthanc.metadata(instance["ID"], "Origin") == "Plugins"
                    path = orthanc.download(instance["ID"], tmp_path / "result.dcm")
                    assert dciodvfy_errors(path) == []
            log = node.log()
            assert "answered HTTP" not in log  # delivered at the first attempt
            assert "stow-pass-7731" not in log and orthanc.authorization not in log
            assert f"STOW-RS {orthanc.dicomweb_url}" in node.cli("ae", "list").stdout
            echoed = node.cli("echo", "PACS").stdout  # C-ECHO, and a QIDO-RS with the token
            assert f"DICOMweb {orthanc.dicomweb_url}/studies: HTTP 200" in echoed
            auth.write_text("Basic " + base64.b64encode(b"dicomnode:wrong").decode())
            refused = node.cli("echo", "PACS", check=False)
            assert refused.returncode == 1 and "HTTP 401" in refused.stderr
        finally:
            node.stop()
    finally:
        orthanc.stop()
