"""``dicomnode predict`` on files: which rows are failures and which are skips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from dicomnode import pipeline
from dicomnode.config import ModelSettings, Settings
from dicomnode.errors import InferenceError
from dicomnode.inference import Predictor
from dicomnode.offline import predict_files
from dicomnode.testing.images import make_radiograph, write_dataset
from dicomnode.testing.models import make_tiny_model


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
    failed, skipped = predict_files(settings, [hand, chest], tmp_path / "out")
    assert failed.failed and failed.outcome == "failed: the network's outputs are not finite"
    assert not skipped.failed and skipped.outcome.startswith("skipped: unknown body part")
    assert not list((tmp_path / "out").iterdir())
