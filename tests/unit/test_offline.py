"""``dicomnode predict`` on files: which rows are failures and which are skips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest

from dicomnode import pipeline
from dicomnode.config import ModelSettings, Settings
from dicomnode.errors import InferenceError
from dicomnode.inference import Predictor
from dicomnode.offline import predict_files
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.validate import dciodvfy_errors, dsrdump


def test_a_model_error_fails_its_input_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(predictor: Predictor, prepared: Sequence[pipeline.Prepared]) -> None:
        raise InferenceError("the network's outputs are not finite")

    monkeypatch.setattr(pipeline, "analyse", failing)
    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    hand = write_dataset(make_radiograph(body_part="HAND"), tmp_path / "hand.dcm")
    chest = write_dataset(make_radiograph(body_part="CHEST"), tmp_path / "chest.dcm")
    settings = Settings(models=ModelSettings(dir=tmp_path / "models"))
    failed, skipped, report = predict_files(settings, [hand, chest], tmp_path / "out")
    assert failed.failed and failed.outcome == "failed: the network's outputs are not finite"
    assert not skipped.failed and skipped.outcome.startswith("skipped: unknown body part")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [Path(report.output).name]
    sr = pydicom.dcmread(report.output)  # as the node reports a dead analysis: no reader waits
    assert sr.CompletionFlag == "PARTIAL"
    assert pipeline.ANALYSIS_FAILED in _texts(sr) and "not finite" not in str(sr)
    assert dciodvfy_errors(Path(report.output)) == []


def test_an_image_whose_pixels_cannot_be_read_makes_its_studys_sr_partial(
    tmp_path: Path,
) -> None:
    """The SR of a study with one readable and one corrupt hand image named COMPLETE, as if
    the corrupt one had not been sent; it now lists that image and is PARTIAL."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    good = make_radiograph(body_part="HAND", seed=1)
    corrupt = make_radiograph(body_part="HAND", seed=2, study_uid=good.StudyInstanceUID)
    corrupt.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    corrupt.PixelData = encapsulate([b"\xff\xd8\xff\xe0not a jpeg\xff\xd9"])
    corrupt.BitsAllocated = corrupt.BitsStored = 8
    corrupt.HighBit = 7
    files = [
        write_dataset(good, tmp_path / "good.dcm"),
        write_dataset(corrupt, tmp_path / "bad.dcm"),
    ]
    settings = Settings(models=ModelSettings(dir=tmp_path / "models"))
    analysed, failed, report = predict_files(settings, files, tmp_path / "out")
    assert not analysed.failed and failed.failed and failed.outcome.startswith("failed: ")
    sr = pydicom.dcmread(report.output)
    assert sr.CompletionFlag == "PARTIAL"
    texts = _texts(sr)
    assert pipeline.ANALYSIS_FAILED in texts
    assert any(t.startswith("INCOMPLETE: 1 image of this study") for t in texts)
    assert corrupt.SOPInstanceUID in str(sr) and good.SOPInstanceUID in str(sr)
    assert dciodvfy_errors(Path(report.output)) == []
    assert dsrdump(Path(report.output)).returncode == 0


def test_an_image_the_model_cannot_read_is_in_the_sr_as_not_assessed(tmp_path: Path) -> None:
    """As in the node: a multi-frame hand image routed to the hand model is skipped, and the
    study's SR reports it "Not assessed" with the reason beside the other image's finding."""
    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    single = make_radiograph(body_part="HAND", seed=1)
    multi = make_radiograph(body_part="HAND", frames=2, seed=2, study_uid=single.StudyInstanceUID)
    files = [
        write_dataset(single, tmp_path / "single.dcm"),
        write_dataset(multi, tmp_path / "multi.dcm"),
    ]
    settings = Settings(models=ModelSettings(dir=tmp_path / "models"))
    analysed, skipped, report = predict_files(settings, files, tmp_path / "out")
    assert not analysed.failed and analysed.output.endswith(".dcm")
    reason = "multi-frame images are not supported (2 frames); send single frames"
    assert (skipped.failed, skipped.outcome, skipped.output) == (False, f"skipped: {reason}", "-")
    assert report.outcome == "structured report"
    sr = pydicom.dcmread(report.output)
    assert multi.SOPInstanceUID in str(sr) and single.SOPInstanceUID in str(sr)
    assert f"Not analysed: {reason}" in _texts(sr)
    assert len(list((tmp_path / "out").iterdir())) == 2  # one SC, one SR
    assert dciodvfy_errors(Path(report.output)) == []
    dumped = dsrdump(Path(report.output))
    assert dumped.returncode == 0 and "Not analysed" in dumped.stdout


def _texts(dataset: object) -> list[str]:
    """Every Text Value in an SR's content tree."""
    found: list[str] = []
    for item in getattr(dataset, "ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _texts(item)
    return found


def test_predict_writes_a_presentation_state_per_image_when_the_settings_ask(
    tmp_path: Path,
) -> None:
    """``results.presentation_state``: ``predict`` writes what the node would send, a GSPS
    per image beside its SC (a row of its own), and nothing of the kind without it."""
    from dicomnode.config import ResultsSettings

    make_tiny_model(tmp_path / "models" / "tiny-hand", name="tiny-hand", body_part="HAND")
    hand = make_radiograph(body_part="HAND", photometric="MONOCHROME1", seed=3)
    files = [write_dataset(hand, tmp_path / "hand.dcm")]
    models = ModelSettings(dir=tmp_path / "models")
    on = Settings(models=models, results=ResultsSettings(presentation_state=True))
    image, state, report = predict_files(on, files, tmp_path / "on")
    assert (image.input, state.input) == (str(files[0]), str(files[0]))
    assert state.outcome == "presentation state" and not state.failed
    pr = pydicom.dcmread(state.output)
    assert (pr.Modality, pr.PresentationLUTShape) == ("PR", "INVERSE")
    assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        hand.SOPInstanceUID
    )
    assert dciodvfy_errors(Path(state.output)) == []
    assert report.outcome == "structured report"
    run = dsrdump(Path(report.output), "+Pu")
    assert f'(GSPS,"{pr.SOPInstanceUID}")' in run.stdout  # the SR names it, as the node's
    off = predict_files(Settings(models=models), files, tmp_path / "off")
    assert [row.outcome for row in off][1:] == ["structured report"]
    assert not list((tmp_path / "off").glob("PR_*"))
