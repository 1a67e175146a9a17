"""The training recipes in ``config/training/`` load, and each shipped card is its recipe's output.

A shipped model directory is what ``dicomnode train`` wrote for the recipe whose
``output_dir`` names it: the card must say the same thing as the recipe (so nobody edits
one without retraining or re-exporting from the other).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicomnode.models.card import ENSEMBLE, MEMBER_SEPARATOR, ModelCard, load_card
from dicomnode.training.config import TrainingConfig, load_config, recorded_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "config" / "training").rglob("*.yaml"))
SHIPPED = sorted(p.parent for p in (ROOT / "models").glob("*/model.yaml"))
# What knee-compare/lite0-finetune.yaml (knee-kl 2.1.0) changes in the shipped knee recipe: the
# loss, the test-time flip, where it writes, and the version. `imagenet` and `imagenet-lite0`
# name the same file for Lite0.
SHIPPED_TO_LITE0: dict[str, Any] = {
    key: True
    for key in (
        "smoothing_weights",
        "test_time_flip",
        "fold",
        "output_dir",
        "checkpoint_dir",
        "notes",
        "init_weights",
    )
} | {"model": {"version": True}}

# Training settings the card's ``recipe`` block records as they were trained.
TRAINED_WITH = (
    "data_dir",
    "mode",
    "init_weights",
    "epochs",
    "batch_size",
    "lr",
    "backbone_lr_factor",
    "weight_decay",
    "label_smoothing",
    "class_weights",
    "folds",
    "seed",
)


def _recipe_for(card: ModelCard) -> TrainingConfig:
    """The recipe that wrote ``card`` (or, for an ensemble of folds, its members)."""
    ensemble = card.architecture.name == ENSEMBLE
    for path in RECIPES:
        config = load_config(path)
        if config.model.name != card.name:
            continue
        if ensemble or config.output_dir == Path("models") / card.name:
            return config
    raise AssertionError(f"no recipe in config/training/ writes {card.name}")


def test_every_recipe_loads() -> None:
    assert len(RECIPES) >= 8
    names = {load_config(path).model.name for path in RECIPES}
    assert {"knee-kl", "hand-ra", "spine-abnormality"} <= names


def test_the_three_models_are_shipped() -> None:
    assert [d.name for d in SHIPPED] == ["hand-ra", "knee-kl", "spine-abnormality"]


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_shipped_card_matches_its_recipe(directory: Path) -> None:
    card = load_card(directory)
    config = _recipe_for(card)
    trained = card.recipe
    if card.architecture.name == ENSEMBLE:
        # An ensemble of folds of one cross-validation names their recipe: all of its
        # folds when the recipe runs them all, else some (trained one by one).
        trained = card.recipe["members_recipe"]
        folds = trained["folds_in_ensemble"]
        assert len(folds) >= 2 and set(folds) <= set(range(config.folds))
        if config.fold == "all":
            assert folds == list(range(config.folds))
        assert card.gradcam.target_layer == MEMBER_SEPARATOR.join(
            [config.cam_target_layer] * len(folds)
        )
    else:
        assert (card.name, card.version) == (config.model.name, config.model.version)
        assert card.architecture.name == config.architecture.name
        assert card.gradcam.target_layer == config.cam_target_layer
        assert trained["fold"] == config.model_dump(mode="json")["fold"]
    assert card.input == config.input
    # The knee localiser is attached after training (`dicomnode attach-localiser`): the
    # recipe trains on joint crops, the card finds the joints on whole radiographs first.
    assert card.preprocessing.resize == config.preprocessing.resize
    assert card.preprocessing.localiser in (config.preprocessing.localiser, "knee")
    assert card.synthetic_training_data == config.model.synthetic_training_data
    assert (card.gradcam.method, card.gradcam.shift) == (
        config.gradcam_method,
        config.gradcam_shift,
    )
    raw = config.model_dump(mode="json")
    assert {k: trained[k] for k in TRAINED_WITH} == {k: raw[k] for k in TRAINED_WITH}
    # Keys added since a card was written read as they were then (the loss: per-term
    # before 2026-12-04), so the recipe still names how the card's weights were trained.
    added = ("group_by", "smoothing_weights", "test_time_flip")
    then = recorded_recipe(trained, card.trained)
    assert {k: then[k] for k in added} == {k: recorded_recipe(raw, card.trained)[k] for k in added}


def test_compared_knee_recipes_share_the_shipped_recipes_folds() -> None:
    """Out-of-fold predictions can be fused (`ensemble-cv`) only over the same folds."""
    shipped = load_config(ROOT / "config" / "training" / "knee-kl.yaml")
    compared = sorted((ROOT / "config" / "training" / "knee-compare").glob("*.yaml"))
    architectures = set()
    for path in compared:
        config = load_config(path)
        same: tuple[str, ...] = ("data_dir", "group_pattern", "group_by", "folds", "seed")
        same += ("class_weights", "augment")
        assert {k: getattr(config, k) for k in same} == {k: getattr(shipped, k) for k in same}
        assert config.fold == "all" and config.mode == "finetune"
        assert config.init_weights == "imagenet" and config.output_dir.parts[0] == "var"
        assert config.smoothing_weights == "per_sample"  # the fixed loss, as 2.1.0
        architectures.add(config.architecture.name)
    assert architectures == {
        "xception",
        "resnet50",
        "inception_resnet_v2",
        "efficientnet_lite0",
        "efficientnet_lite2",
    }
    # Lite0 (the shipped network with the fixed loss) and Lite2 share the shipped input, so
    # their models can be served together as one ensemble.
    for name in ("lite0-finetune.yaml", "lite2-finetune.yaml"):
        config = load_config(ROOT / "config" / "training" / "knee-compare" / name)
        assert config.input == shipped.input and config.preprocessing == shipped.preprocessing
        assert config.test_time_flip
    lite0 = load_config(ROOT / "config" / "training" / "knee-compare" / "lite0-finetune.yaml")
    assert lite0.model_dump(exclude=SHIPPED_TO_LITE0) == shipped.model_dump(
        exclude=SHIPPED_TO_LITE0
    )


def test_the_site_knee_recipe_trains_label_exports_crops_from_the_shipped_weights() -> None:
    """``config/training/site/knee-kl-films.yaml``: the crops ``label-export --joints`` writes
    (its names' patient part), the shipped model's weights, input and grades."""
    from dicomnode.training.joint_crops import CROP_GROUP_PATTERN

    site = load_config(ROOT / "config" / "training" / "site" / "knee-kl-films.yaml")
    card = load_card(ROOT / "models" / "knee-kl")
    assert site.group_pattern == CROP_GROUP_PATTERN and site.group_by == "filename"
    assert site.group_copies  # a PACS export may hold one film twice
    assert (ROOT / site.init_weights) == ROOT / "models" / "knee-kl" / card.weights.file
    assert site.input == card.input and site.preprocessing.resize == card.preprocessing.resize
    assert site.preprocessing.localiser == "none"  # crops; the localiser is attached after
    assert [c.name for c in site.model.classes] == [c.name for c in card.classes]
    assert site.model.name != card.name and not site.model.synthetic_training_data
    assert site.test_time_flip and site.augment.horizontal_flip


def test_compared_hand_recipes_share_the_shipped_recipes_folds() -> None:
    base = load_config(ROOT / "config" / "training" / "hand-ra-base.yaml")
    compared = sorted((ROOT / "config" / "training" / "hand-compare").glob("*.yaml"))
    same = ("data_dir", "group_pattern", "group_by", "folds", "fold", "seed", "augment")
    architectures = set()
    for path in compared:
        config = load_config(path)
        assert {k: getattr(config, k) for k in same} == {k: getattr(base, k) for k in same}
        assert config.input.size == base.input.size and config.output_dir.parts[0] == "var"
        architectures.add(config.architecture.name)
    assert architectures == {"small_vgg", "resnet50"}


# The staged recipes' whole cross-validation (models/README.md, "How hand-ra was built" and "How
# spine-abnormality was built"): the last stage's recipe, where its fold K writes, the previous
# stage's fold-K model it starts from (name, version), and the threads the loop trains with.
STAGED = {
    "hand-ra": (
        "hand-ra.yaml", "1.4.1-cv", "var/models/hand-cv",
        "var/models/hand-ra-masks/fold-1/model.safetensors", "1.3.0-cv", None,
    ),
    "spine-abnormality": (
        "spine-abnormality-masks.yaml", "2.3.0-cv", "var/models/spine-masks-cv",
        "var/models/spine-abnormality-cv/fold-1/model.safetensors", "2.1.0", 1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STAGED))
def test_folds_of_a_staged_recipe_trained_now_join_the_shipped_card_in_record_cv(
    name: str,
) -> None:
    """The loops in models/README.md train the stages of folds 1-4 beside the shipped model
    and end with record-cv over them and the shipped card: a fold model they write today must
    count as a fold of the shipped card's recipe."""
    from dicomnode.training.config import InitialWeights
    from dicomnode.training.ensemble import Member, folds_recipe

    recipe_file, version, output, start, start_version, threads = STAGED[name]
    shipped_dir = ROOT / "models" / name
    shipped = load_card(shipped_dir, verify=False)

    def fold_model(start_fold: int) -> Member:
        config = load_config(
            ROOT / "config" / "training" / recipe_file,
            fold=1,
            version=version,
            output_dir=Path(output) / "fold-1",
            init_weights=start,
            threads=threads,
        )
        begun = InitialWeights(name=name, version=start_version, sha256="0" * 64, fold=start_fold)
        recipe = config.model_copy(update={"init_weights_from": begun}).model_dump(mode="json")
        metrics = {**shipped.metrics, "fold": 1}
        card = shipped.model_copy(update={"recipe": recipe, "metrics": metrics})
        return Member(Path(output) / "fold-1", card)

    common = folds_recipe([Member(shipped_dir, shipped), fold_model(1)])
    assert common is not None and common["folds_in_ensemble"] == [0, 1]
    assert common["init_weights_per_member"] == [shipped.recipe["init_weights"], start]
    # A fold 1 begun from a model that held out fold 0 is not a fold of the recipe.
    assert folds_recipe([Member(shipped_dir, shipped), fold_model(0)]) is None
