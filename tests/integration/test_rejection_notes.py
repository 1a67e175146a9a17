"""Rejection notes (IHE IOCM) through the in-process node: the PACS withdraws images with a
Key Object Selection, and the node leaves them out of its report and rejects what it made of
them, with a note of the same title, which an archive supporting IOCM hides as it hid the
images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicomnode.db.schema import Instance, Job, Rejection
from dicomnode.history import study_history
from dicomnode.receive import statuses
from dicomnode.send.resend import resend_study
from dicomnode.studies import schedule_ready
from dicomnode.testing.images import make_radiograph, make_rejection_note
from dicomnode.testing.inprocess import InProcessNode as Node
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.peers import wait_for
from dicomnode.testing.validate import dciodvfy_errors, dsrdump
from dicomnode.withdraw import WithdrawError, targets, withdraw

SC, SR, KO = "OT", "SR", "KO"


def _received(node: Node, modality: str) -> list[Dataset]:
    return [d for d in node.collector.received if d.Modality == modality]


def _listed(note: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def _valid(dataset: Dataset, tmp_path: Path) -> bool:
    """dciodvfy finds no error in it, and dcmtk reads its document tree, titled as it is."""
    path = tmp_path / f"{dataset.SOPInstanceUID}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    dump = dsrdump(path)
    title = str(dataset.ConceptNameCodeSequence[0].CodeMeaning)
    return dciodvfy_errors(path) == [] and dump.returncode == 0 and title in dump.stdout


def _versions(sr: Dataset) -> set[str]:
    """The Algorithm Version (TID 4019, DCM 111003) of every item of the SR's content tree."""
    found, items = set(), list(sr.ContentSequence)
    while items:
        item = items.pop()
        items += list(item.get("ContentSequence", []))
        if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == (
            "111003"
        ):
            found.add(str(item.TextValue))
    return found


def _study(count: int) -> list[Dataset]:
    first = make_radiograph(body_part="KNEE", seed=1)
    return [first] + [
        make_radiograph(body_part="KNEE", seed=1 + i, study_uid=first.StudyInstanceUID)
        for i in range(1, count)
    ]


def test_a_rejected_image_leaves_the_report_and_its_results_are_rejected_in_turn(
    node: Node, tmp_path: Path
) -> None:
    kept, wrong = _study(2)
    assert node.send(kept, wrong) == [statuses.SUCCESS] * 2
    wait_for(lambda: len(node.collector.received) >= 3, 60, what="two overlays and the SR")
    (first_sr,) = _received(node, SR)
    overlay_of = {
        str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID): sc for sc in _received(node, SC)
    }

    # the technologist rejects the image of the wrong patient
    note = make_rejection_note([wrong], "113037")
    assert node.send(note) == [statuses.SUCCESS]
    wait_for(lambda: len(node.collector.received) >= 5, 60, what="the node's note and a new SR")
    (ko,) = _received(node, KO)
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113037"  # the title it was given
    assert _listed(ko) == {overlay_of[wrong.SOPInstanceUID].SOPInstanceUID, first_sr.SOPInstanceUID}
    assert ko.SeriesDescription.startswith("AI rejection note tiny-knee")
    assert _valid(ko, tmp_path)
    second_sr = _received(node, SR)[-1]
    assert str(kept.SOPInstanceUID) in str(second_sr)
    assert str(wrong.SOPInstanceUID) not in str(second_sr)
    predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert [d.Modality for d in node.collector.received][-2:] == [KO, SR]  # the note first
    stored_note = node.instance(note.SOPInstanceUID)
    assert stored_note.state == "skipped"
    assert "Rejected for Patient Safety Reasons" in stored_note.reason
    assert "rejects 1 instance(s), 1 of them held here; 1 report(s) made again" in (
        stored_note.reason
    )

    # the last image is rejected too: its results go, and no empty SR is made
    assert node.send(make_rejection_note([kept], "113001")) == [statuses.SUCCESS]
    wait_for(lambda: len(_received(node, KO)) == 2, 60, what="the second note")
    last = _received(node, KO)[-1]
    assert last.ConceptNameCodeSequence[0].CodeValue == "113001" and _valid(last, tmp_path)
    assert _listed(last) == {
        overlay_of[kept.SOPInstanceUID].SOPInstanceUID,
        second_sr.SOPInstanceUID,
    }
    wait_for(lambda: node.count(Job, kind="send", state="done") == 6, 30, what="sends done")
    assert len(_received(node, SR)) == 2
    assert node.count(Rejection) == 2
    assert node.count(Job, kind="infer") == 2  # nothing analysed again
    with node.db.session() as session:  # a resend sends what stands: the node's two notes
        again = resend_study(
            session, str(kept.StudyInstanceUID), "PACS", max_attempts=3, dry_run=True
        )
        history = study_history(session, str(kept.StudyInstanceUID))  # `dicomnode study`
    assert sorted(pydicom.dcmread(p).Modality for p in again.paths) == [KO, KO]
    assert history is not None
    shown = {i.sop_instance_uid: (i.state, i.reason) for i in history.images}
    assert shown[wrong.SOPInstanceUID] == ("done, rejected", "Rejected for Patient Safety Reasons")
    assert shown[kept.SOPInstanceUID] == ("done, rejected", "Rejected for Quality Reasons")


def test_an_image_rejected_before_it_arrives_is_not_analysed(node: Node) -> None:
    kept, wrong = _study(2)
    note = make_rejection_note([wrong], "113001")
    assert node.send(note) == [statuses.SUCCESS]
    wait_for(lambda: node.count(Instance, state="skipped") == 1, 30, what="the note carried out")
    said = node.instance(note.SOPInstanceUID).reason
    assert "rejects 1 instance(s), 0 of them held here; 0 report(s) made again" in said
    assert node.count(Rejection) == 1  # recorded, though the node holds none of it yet
    assert node.send(kept, wrong) == [statuses.SUCCESS] * 2
    wait_for(lambda: len(_received(node, SR)) == 1, 60, what="the SR")
    (sr,) = _received(node, SR)
    assert str(wrong.SOPInstanceUID) not in str(sr)
    assert "came before it" in node.instance(wrong.SOPInstanceUID).reason
    assert node.count(Job, kind="infer") == 1
    assert _received(node, KO) == []


def test_a_key_object_selection_of_another_title_changes_nothing(node: Node) -> None:
    (image,) = _study(1)
    node.send(image)
    wait_for(lambda: len(node.collector.received) >= 2, 60, what="overlay and SR")
    key_images = make_rejection_note([image], "113000")  # "Of Interest": a radiologist's pick
    assert node.send(key_images) == [statuses.SUCCESS]
    wait_for(lambda: node.instance(key_images.SOPInstanceUID).state == "skipped", 30, what="routed")
    assert "not a radiograph SOP class" in node.instance(key_images.SOPInstanceUID).reason
    assert node.count(Rejection) == 0 and node.count(Job, kind="report") == 1


def test_an_image_that_failed_and_is_then_rejected_leaves_the_partial_report(
    node: Node, tmp_path: Path
) -> None:
    """The SR listed the image as "Not assessed" (its analysis died): once it is rejected, a
    new SR without it, COMPLETE, and the first SR rejected."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    from pynetdicom import AE

    (kept,) = _study(1)
    broken = make_radiograph(
        body_part="KNEE", rows=64, columns=64, bits_stored=8, study_uid=kept.StudyInstanceUID
    )
    broken.BitsAllocated, broken.BitsStored, broken.HighBit = 8, 8, 7
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xe0not a jpeg\xff\xd9"])
    broken["PixelData"].VR = "OB"
    broken.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(broken.SOPClassUID, JPEGBaseline8Bit)
    ae.add_requested_context(kept.SOPClassUID)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="DICOMNODE")
    assert [int(assoc.send_c_store(d).Status) for d in (kept, broken)] == [statuses.SUCCESS] * 2
    assoc.release()
    wait_for(lambda: len(_received(node, SR)) == 1, 60, what="the PARTIAL SR")
    (partial,) = _received(node, SR)
    assert partial.CompletionFlag == "PARTIAL"
    assert node.send(make_rejection_note([broken], "113001")) == [statuses.SUCCESS]
    wait_for(lambda: len(_received(node, SR)) == 2, 60, what="the SR made again")
    (ko,) = _received(node, KO)
    assert _listed(ko) == {partial.SOPInstanceUID} and _valid(ko, tmp_path)
    complete = _received(node, SR)[-1]
    assert complete.CompletionFlag == "COMPLETE"
    assert str(broken.SOPInstanceUID) not in str(complete)


def test_a_study_is_reported_again_by_the_version_that_reported_it_after_an_update(
    node: Node, tmp_path: Path
) -> None:
    """The model is updated between the report and the rejection note: the study is reported
    again by the version that reported it, whose card the node kept, not left unanswered."""
    kept, wrong = _study(2)
    assert node.send(kept, wrong) == [statuses.SUCCESS] * 2
    wait_for(lambda: len(node.collector.received) >= 3, 60, what="two overlays and the SR")
    (first_sr,) = _received(node, SR)
    assert _versions(first_sr) == {"0.0.1"}
    models = Path(node.settings.models.dir)
    shutil.rmtree(models / "tiny-knee")  # 0.0.1 leaves models/, 0.0.2 takes its place
    make_tiny_model(models / "tiny-knee-2", version="0.0.2", num_classes=5, seed=3)
    node.reload_models()

    assert node.send(make_rejection_note([wrong], "113037")) == [statuses.SUCCESS]
    wait_for(lambda: len(_received(node, SR)) == 2, 60, what="the SR made again")
    (ko,) = _received(node, KO)
    assert ko.SeriesDescription.startswith("AI rejection note tiny-knee 0.0.1")
    assert first_sr.SOPInstanceUID in _listed(ko) and _valid(ko, tmp_path)
    second_sr = _received(node, SR)[-1]
    assert _versions(second_sr) == {"0.0.1"}  # as the SR it supersedes
    assert str(wrong.SOPInstanceUID) not in str(second_sr)
    assert node.count(Job, kind="report", state="dead") == 0

    late = make_radiograph(body_part="KNEE", seed=9, study_uid=kept.StudyInstanceUID)
    assert node.send(late) == [statuses.SUCCESS]  # a new image: the version installed now
    wait_for(lambda: len(_received(node, SR)) == 3, 60, what="the new version's SR")
    assert _versions(_received(node, SR)[-1]) == {"0.0.2"}


def test_an_administrator_withdraws_a_studys_results_and_later_images_report_afresh(
    node: Node, tmp_path: Path
) -> None:
    """`dicomnode withdraw`: a rejection note of everything sent, no SR; a later image of the
    study gets an SR of its own, which supersedes nothing withdrawn."""
    first, second = _study(2)
    assert node.send(first, second) == [statuses.SUCCESS] * 2
    wait_for(lambda: len(node.collector.received) >= 3, 60, what="two overlays and the SR")
    sent = {str(d.SOPInstanceUID) for d in node.collector.received}
    study_uid = str(first.StudyInstanceUID)
    with node.db.session() as session:
        (target,) = targets(session, [study_uid])
        assert (target.model_version, target.sent, target.busy) == ("0.0.1", 3, False)
        withdraw(session, [target], "113001", "outside the intended use", node.settings)

    wait_for(lambda: len(_received(node, KO)) == 1, 60, what="the node's rejection note")
    (ko,) = _received(node, KO)
    assert ko.ConceptNameCodeSequence[0].CodeValue == "113001" and _listed(ko) == sent
    (said,) = [
        str(i.TextValue)
        for i in ko.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "113012"  # Key Object Description
    ]
    assert said.endswith("withdrawn by dicomnode: at the site's request: outside the intended use")
    assert _valid(ko, tmp_path)
    wait_for(lambda: node.count(Job, kind="report", state="done") == 2, 30, what="reported")
    assert len(_received(node, SR)) == 1  # no SR of what was withdrawn
    with node.db.session() as session:
        history = study_history(session, study_uid)
        again = resend_study(session, study_uid, "PACS", max_attempts=3, dry_run=True)
        assert targets(session, [study_uid]) == []  # nothing left to withdraw
    assert history is not None
    assert history.rounds[-1].withdrawal == "Rejected for Quality Reasons"
    assert [pydicom.dcmread(p).Modality for p in again.paths] == [KO]

    late = make_radiograph(body_part="KNEE", seed=11, study_uid=first.StudyInstanceUID)
    assert node.send(late) == [statuses.SUCCESS]
    wait_for(lambda: len(_received(node, SR)) == 2, 60, what="the later image's SR")
    fresh = _received(node, SR)[-1]
    assert str(late.SOPInstanceUID) in str(fresh)
    assert str(first.SOPInstanceUID) not in str(fresh)
    assert "PredecessorDocumentsSequence" not in fresh  # what it would supersede is withdrawn


def test_a_study_being_analysed_is_not_withdrawn(node: Node) -> None:
    (image,) = _study(1)
    node.pause()  # the scheduler and worker stop: the study stays in its open round
    assert node.send(image) == [statuses.SUCCESS]
    schedule_ready(node.db, node.settings, node.registry)
    with node.db.session() as session:
        (target,) = targets(session, [str(image.StudyInstanceUID)])
        assert target.busy and target.sent == 0
        with pytest.raises(WithdrawError, match="being analysed"):
            withdraw(session, [target], "113001", "", node.settings)
