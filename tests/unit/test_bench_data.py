"""The benchmark's knee films show a knee the shipped localiser finds, so the bench measures
the classifier (on a film without a joint the node grades nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.bench import data
from dicomnode.imaging.pixels import prepare_dataset
from dicomnode.inference import Predictor
from dicomnode.models.card import load_card

ROOT = Path(__file__).resolve().parents[2]
KNEE = ROOT / "models" / "knee-kl"


@pytest.mark.skipif(not data.knee_pictures_available(), reason="no knee crops beside the project")
def test_bench_knee_films_show_one_joint_the_localiser_finds(tmp_path: Path) -> None:
    predictor = Predictor.load(KNEE, load_card(KNEE), "cpu")
    assert predictor.localiser is not None
    studies = data.make_studies(tmp_path, 2, 1, sizes=((1250, 1024, 12), (600, 600, 16)))
    for file in data.all_files(studies):
        image = prepare_dataset(pydicom.dcmread(file))
        joints = predictor.localiser.locate(image)
        assert len(joints) == 1 and not joints[0].uncertain
    picture = data.knee_picture(300, 200, seed=0)
    assert picture.shape == (300, 200) and picture.dtype == np.float32
    assert 0.0 <= float(picture.min()) < float(picture.max()) <= 1.0


def test_without_crops_the_bench_says_its_films_may_not_be_graded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dicomnode.bench.main import _pictures

    monkeypatch.setenv(data.KNEE_CROPS_VARIABLE, str(tmp_path / "none"))
    assert not data.knee_pictures_available()
    assert _pictures().startswith("WARNING: no knee crops")
