"""The cards of the model versions that reported here: kept from their first round, read
back by a report of a version no longer installed, and listed by ``dicomnode models``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cards import (
    card_for_report,
    changed_weights,
    keep_card,
    kept_class_names,
    model_versions,
)
from dicomnode.cli import app
from dicomnode.config import Settings
from dicomnode.db.schema import ModelCardRecord, Report
from dicomnode.db.session import Database, utcnow
from dicomnode.errors import ModelError
from dicomnode.models.card import identity
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.testing.models import make_tiny_model

pytestmark = pytest.mark.both_databases


def _card(tmp_path: Path, version: str, seed: int = 0) -> LoadedCard:
    directory = tmp_path / f"tiny-knee-{version}-{seed}"
    return LoadedCard(directory, make_tiny_model(directory, version=version, seed=seed))


def _round(db: Database, version: str, study: str = "1.2") -> None:
    with db.session() as s:
        s.add(
            Report(
                study_instance_uid=study,
                model_name="tiny-knee",
                model_version=version,
                sequence=1,
                calling_ae="X",
                state="done",
                created_at=utcnow(),
            )
        )


def test_the_first_card_of_a_version_is_kept_and_read_back_when_it_is_gone(
    db: Database, tmp_path: Path
) -> None:
    old, changed = _card(tmp_path, "1.0.0", seed=0), _card(tmp_path, "1.0.0", seed=1)
    assert old.card.weights.sha256 != changed.card.weights.sha256
    with db.session() as s:
        keep_card(s, old.card)
        keep_card(s, old.card)  # every round keeps it: once is recorded
    with db.session() as s:
        keep_card(s, changed.card)  # the same version with other weights: the first stays
    with db.session() as s:
        assert s.query(ModelCardRecord).count() == 1
        gone = card_for_report(s, ModelRegistry(), "tiny-knee", "1.0.0")
    assert gone == old.card
    assert identity(gone).sha256 == old.card.weights.sha256  # what its outputs said
    assert gone.coded_classes() == old.card.coded_classes()
    with db.session() as s:  # the version installed again with other weights is named
        (line,) = changed_weights(s, ModelRegistry([changed]))
        assert "tiny-knee version 1.0.0" in line and old.card.weights.sha256[:12] in line
        assert changed_weights(s, ModelRegistry([old])) == []


def test_an_installed_card_comes_first_and_an_unknown_version_is_a_clear_error(
    db: Database, tmp_path: Path
) -> None:
    kept, installed = _card(tmp_path, "1.0.0", seed=0), _card(tmp_path, "1.0.0", seed=1)
    with db.session() as s:
        keep_card(s, kept.card)
    with db.session() as s:
        found = card_for_report(s, ModelRegistry([installed]), "tiny-knee", "1.0.0")
        assert found == installed.card
        with pytest.raises(ModelError, match=r"tiny-knee version 0\.9 is no longer installed"):
            card_for_report(s, ModelRegistry([installed]), "tiny-knee", "0.9")


def test_a_kept_card_that_no_longer_validates_is_a_model_error(
    db: Database, tmp_path: Path
) -> None:
    old = _card(tmp_path, "1.0.0")
    with db.session() as s:
        keep_card(s, old.card)
    with db.session() as s:
        record = s.get(ModelCardRecord, ("tiny-knee", "1.0.0"))
        assert record is not None
        record.card = json.dumps({**json.loads(record.card), "classes": []})
    with db.session() as s, pytest.raises(ModelError, match=r"kept card of model tiny-knee"):
        card_for_report(s, ModelRegistry(), "tiny-knee", "1.0.0")


def test_model_versions_lists_the_installed_and_the_kept_with_their_rounds(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    old = _card(tmp_path, "1.0.0")
    installed = make_tiny_model(Path(settings.models.dir) / "tiny-knee", version="2.0.0")
    with db.session() as s:
        keep_card(s, old.card)
    _round(db, "1.0.0", "1.2")
    _round(db, "1.0.0", "1.3")
    registry = ModelRegistry.load(Path(settings.models.dir))
    with db.session() as s:
        listed = {v.version: v for v in model_versions(s, registry)}
        names = kept_class_names(s)
    assert listed.keys() == {"1.0.0", "2.0.0"}
    assert (listed["1.0.0"].installed, listed["1.0.0"].rounds) == ("", 2)
    assert listed["1.0.0"].last_round is not None and listed["1.0.0"].body_parts == ("KNEE",)
    assert listed["2.0.0"].installed.endswith("tiny-knee") and listed["2.0.0"].rounds == 0
    assert listed["2.0.0"].sha256 == installed.weights.sha256
    assert names == {"tiny-knee 1.0.0": tuple(c.name for c in old.card.classes)}

    config = tmp_path / "node.yaml"
    config.write_text(
        json.dumps(
            {
                "storage": {"data_dir": str(settings.storage.data_dir)},
                "database": {"url": settings.database.url},
                "models": {"dir": str(settings.models.dir)},
            }
        ),
        encoding="utf-8",
    )
    shown = CliRunner().invoke(app, ["models", "--config", str(config), "--json"])
    assert shown.exit_code == 0, shown.output
    rows = {row["version"]: row for row in json.loads(shown.stdout)}
    assert rows["1.0.0"]["installed"] == "" and rows["1.0.0"]["rounds"] == 2
    assert rows["2.0.0"]["synthetic_training_data"] is True
    table = CliRunner().invoke(app, ["models", "--config", str(config)])
    assert table.exit_code == 0 and "no (card kept)" in table.output
