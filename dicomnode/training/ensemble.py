"""Ensembles of trained model directories: one model directory the node runs.

``dicomnode ensemble OUT MEMBER_DIR... --method average|accuracy|f1`` combines
members that share classes and preprocessing (and localiser, if any); their inputs
may differ (size, channels, normalisation: :func:`ensemble_input`):

* ``average``: every member weighs the same for every class;
* ``accuracy``: member ``m`` weighs ``acc[m, c]`` for class ``c``, its
  cross-validated accuracy on the images of class ``c`` (per-class recall);
* ``f1``: member ``m`` weighs ``f1[m, c]``, its cross-validated F1 of class ``c``.

The figures come from each member card's ``metrics`` (the mean over folds when
the member ran full cross-validation, else its held-out fold). Each class's
weights are then divided by their sum, so they sum to 1 over the members (a
class where every member scored 0 falls back to equal weights). The node fuses
``q_c = sum_m w[m, c] * softmax(z_m / T_m)[c]``, normalised over the classes
(:class:`~dicomnode.models.architectures.EnsembleNet`), and its Grad-CAM map is
the members' maps for the ensemble's class weighted by each member's share of
``q_c`` (:func:`~dicomnode.explain.gradcam.ensemble_grad_cam`).

The output holds every member's weights in one safetensors file (keys
``members.<m>.*`` plus ``class_weights`` and ``temperatures``), the card and,
with ``validate_on``, the ensemble's figures on the held-out fold of a training
recipe (the same fold the members' figures come from: optimistic, and said so).
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file

from dicomnode.errors import TrainingError
from dicomnode.models.architectures import build_model, fuse_probabilities, place
from dicomnode.models.card import (
    ENSEMBLE,
    MEMBER_INPUT,
    MEMBER_SEPARATOR,
    RAW_GREY_MEAN,
    RAW_GREY_STD,
    READER_NOTE_MAX,
    ArchitectureSpec,
    GradCamSpec,
    InputSpec,
    ModelCard,
    WeightsSpec,
    load_card,
    sha256_of,
    write_card,
)
from dicomnode.training.config import TrainingConfig, load_config, recorded_recipe
from dicomnode.training.fingerprint import (
    TRAINING_IMAGES_FILE,
    fold_fingerprints,
    joined,
    read_training_images,
    refuse_seen_folds,
    write_training_images,
)
from dicomnode.training.lineage import is_weights_file, saw_fold
from dicomnode.training.metrics import (
    Float64Array,
    classification_metrics,
    softmax,
    summarise_folds,
)
from dicomnode.training.output import OOF_FILE, WEIGHTS_FILE, write_weights
from dicomnode.training.train import (
    fold_dataset,
    fold_indices,
    predict_logits,
    prepare,
    torch_settings,
)

logger = logging.getLogger(__name__)

Method = Literal["average", "accuracy", "f1"]
METHODS: tuple[Method, ...] = ("average", "accuracy", "f1")


@dataclass(frozen=True)
class Member:
    """A member model directory and its validated card."""

    directory: Path
    card: ModelCard


def per_class_figure(card: ModelCard, method: Method) -> list[float]:
    """The figure ``method`` weighs a member by, one per class (see the module doc)."""
    if method == "average":
        return [1.0] * card.num_classes
    key = "recall" if method == "accuracy" else "f1"
    cross = card.metrics.get("cross_validation", {})
    values = cross.get(f"{key}_per_class_mean") or card.metrics.get("per_class", {}).get(key)
    if not values or len(values) != card.num_classes:
        raise TrainingError(
            f"member {card.name} {card.version} has no per-class {key} in its card's metrics: "
            f"method {method!r} needs validation figures"
        )
    return [float(v) for v in values]


def ensemble_weights(cards: list[ModelCard], method: Method) -> Float64Array:
    """Weights (members, classes): each class's column sums to 1."""
    raw = np.asarray([per_class_figure(card, method) for card in cards], dtype=np.float64)
    raw = np.clip(np.nan_to_num(raw, nan=0.0), 0.0, None)
    sums = raw.sum(axis=0, keepdims=True)
    uniform = np.full_like(raw, 1.0 / len(cards))
    weights: Float64Array = np.where(sums > 0, raw / np.where(sums > 0, sums, 1.0), uniform)
    return weights


def load_members(directories: list[Path]) -> list[Member]:
    """Load and check the members: two or more, same classes, input and preprocessing."""
    if len(directories) < 2:
        raise TrainingError("an ensemble needs two or more member model directories")
    members = [Member(d, load_card(d)) for d in directories]
    first = members[0].card
    for member in members[1:]:
        card = member.card
        for what in ("classes", "preprocessing", "body_parts", "localiser", "test_time_flip"):
            if getattr(card, what) != getattr(first, what):
                raise TrainingError(
                    f"member {member.directory} differs from {members[0].directory} in {what}: "
                    "ensemble members must share classes, preprocessing, body parts, "
                    "localiser and test-time flip"
                )
        if first.preprocessing.resize == "letterbox" and not _same_shape(card.input, first.input):
            raise TrainingError(
                f"member {member.directory} takes {_size(card.input)} input, "
                f"{members[0].directory} {_size(first.input)}: letterboxed members of "
                "different input sizes must share the aspect ratio (their images would "
                "be padded differently)"
            )
        if (card.gradcam.method, card.gradcam.shift) != (first.gradcam.method, first.gradcam.shift):
            raise TrainingError(
                f"member {member.directory} explains with {card.gradcam.description}, "
                f"{members[0].directory} with {first.gradcam.description}: ensemble members "
                "must share one class activation map method and shift"
            )
        if card.architecture.name == ENSEMBLE:
            raise TrainingError(f"member {member.directory} is itself an ensemble")
    return members


def _size(spec: InputSpec) -> str:
    return f"{spec.size[0]}x{spec.size[1]}"


def _same_shape(a: InputSpec, b: InputSpec) -> bool:
    return a.size[0] * b.size[1] == a.size[1] * b.size[0]


def ensemble_input(cards: list[ModelCard]) -> tuple[InputSpec, tuple[InputSpec, ...] | None]:
    """The ensemble's input, and each member's own when they differ (else ``None``).

    Members that share one input take it as it is. Otherwise the ensemble's
    input is the grey image in [0, 1] (one channel, mean 0, std 1) at the
    largest height and width among the members, and each member resizes and
    normalises it as its card says (:class:`~dicomnode.models.architectures.MemberInput`).
    """
    inputs = tuple(card.input for card in cards)
    if all(spec == inputs[0] for spec in inputs[1:]):
        return inputs[0], None
    size = (max(s.size[0] for s in inputs), max(s.size[1] for s in inputs))
    shared = InputSpec(size=size, channels=1, mean=RAW_GREY_MEAN, std=RAW_GREY_STD)
    return shared, inputs


def ensemble_architecture(cards: list[ModelCard]) -> tuple[ArchitectureSpec, InputSpec]:
    """The ensemble card's ``architecture`` (its members, with their own inputs when these
    differ) and ``input``."""
    shared, own = ensemble_input(cards)
    members: list[dict[str, Any]] = []
    for index, card in enumerate(cards):
        entry: dict[str, Any] = {
            "name": card.architecture.name,
            "params": dict(card.architecture.params),
        }
        if own is not None:
            entry[MEMBER_INPUT] = own[index].model_dump(mode="json")
        members.append(entry)
    return ArchitectureSpec(name=ENSEMBLE, params={"members": members}), shared


def _say_how_inputs_are_shared(cards: list[ModelCard], shared: InputSpec) -> None:
    if all(card.input == shared for card in cards):
        return
    sizes = sorted({_size(card.input) for card in cards})
    if len(sizes) == 1:
        logger.warning(
            "the members take %s inputs, differently normalised: the ensemble takes the grey "
            "image and each member normalises it as its card says",
            sizes[0],
        )
        return
    logger.warning(
        "the members take %s inputs: the ensemble takes the grey image at %s and each member "
        "resizes and normalises it as its card says (a smaller member sees the image resized "
        "twice); score the ensemble as it is served (--validate-on, or dicomnode evaluate)",
        " and ".join(sizes),
        _size(shared),
    )


def ensemble_state(
    members: list[Member], weights: Float64Array, *, half: bool = False
) -> dict[str, torch.Tensor]:
    """One state dict: ``members.<m>.<key>`` for every member, plus the fusion buffers.

    ``half`` stores the members' floating-point tensors as float16 (half the
    file; the node casts them back to float32 when it loads them).
    """
    state: dict[str, torch.Tensor] = {}
    for index, member in enumerate(members):
        for key, tensor in load_file(str(member.directory / member.card.weights.file)).items():
            state[f"members.{index}.{key}"] = _half(tensor, key) if half else tensor
    state["class_weights"] = torch.tensor(weights, dtype=torch.float32)
    state["temperatures"] = torch.tensor([m.card.temperature for m in members], dtype=torch.float32)
    return state


def _half(tensor: torch.Tensor, key: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    halved = tensor.to(torch.float16)
    if not torch.isfinite(halved).all():
        raise TrainingError(f"member tensor {key} does not fit float16; build without --half")
    return halved


def build_ensemble(
    directories: list[Path],
    output_dir: Path,
    *,
    method: Method,
    name: str,
    version: str,
    validate_on: Path | None = None,
    validate_fold: int | None = None,
    half: bool = False,
) -> Path:
    """Write the ensemble model directory ``output_dir`` and return it.

    ``half``: store the member weights as float16 (see :func:`ensemble_state`).
    """
    if method not in METHODS:
        raise TrainingError(f"unknown ensemble method {method!r}; use {', '.join(METHODS)}")
    members = load_members(directories)
    cards = [m.card for m in members]
    note = reader_note(cards)
    weights = ensemble_weights(cards, method)
    architecture, shared_input = ensemble_architecture(cards)
    _say_how_inputs_are_shared(cards, shared_input)
    recipe = folds_recipe(members)
    if validate_on is not None:  # refused before anything is written
        check_held_out(members, recipe, load_config(validate_on, fold=validate_fold))
    state = ensemble_state(members, weights, half=half)
    first = cards[0]
    model = build_model(ENSEMBLE, shared_input.channels, first.num_classes, architecture.params)
    model.load_state_dict(state, strict=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = write_weights(output_dir / WEIGHTS_FILE, state, f"{name} {version}")
    metrics = _metrics(members, weights, method, "float16" if half else "float32")
    if recipe is not None:
        metrics.update(_folds_metrics(members))
    if validate_on is not None:
        metrics["held_out"] = validate_ensemble(
            model,
            validate_on,
            validate_fold,
            test_time_flip=first.test_time_flip,
            input_spec=shared_input,
        )
    _copy_localiser(members[0], output_dir)
    card = _card(
        members,
        name,
        version,
        architecture,
        sha256_of(weights_path),
        metrics,
        method,
        recipe,
        note,
        shared_input,
    )
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _write_training_images(members, output_dir, card.weights.sha256)
    write_card(output_dir, card)
    logger.info("wrote ensemble %s of %d members", output_dir, len(members))
    return output_dir


def _metrics(
    members: list[Member], weights: Float64Array, method: Method, stored_as: str
) -> dict[str, Any]:
    return {
        "ensemble": {
            "method": method,
            "member_weights_stored_as": stored_as,
            "members": [
                {
                    "directory": m.directory.name,
                    "name": m.card.name,
                    "version": m.card.version,
                    "sha256": m.card.weights.sha256,
                    "temperature": m.card.temperature,
                    "class_weights": weights[i].tolist(),
                    "balanced_accuracy": m.card.metrics.get("balanced_accuracy"),
                }
                for i, m in enumerate(members)
            ],
        }
    }


PER_MEMBER = ("notes", "precision")
"""Recipe keys in which the folds of one recipe may differ: free text, and the arithmetic of
the training steps (a fold trained on a GPU and one on a CPU, both in bfloat16 autocast)."""

RUN_KEYS = (
    "fold",
    "output_dir",
    "checkpoint_dir",
    "checkpoint_minutes",
    "cache_dir",
    "num_threads",
    "loader_workers",
)
"""Recipe keys that set up a run, not what it trains: left out when fold models are compared
(with the model's version: a fold trained later beside a shipped model has a version of its
own)."""


def folds_recipe(members: list[Member]) -> dict[str, Any] | None:
    """The members' common recipe when they are the folds of one cross-validation, else None.

    That is: every member card records a recipe, the recipes agree apart from
    :data:`RUN_KEYS`, the model's version and :data:`PER_MEMBER`, and each member was
    validated on a different fold. A :data:`PER_MEMBER` key the members disagree on is
    recorded once per member (``notes_per_member``, ...). The folds of a staged recipe
    start from weights files of their own (``init_weights_per_member``): each from a model
    that held out its fold, where the card records it (``init_weights_from``).
    """
    folds = [m.card.metrics.get("fold") for m in members]
    if any(not isinstance(f, int) for f in folds) or len(set(folds)) != len(folds):
        return None
    if any(not m.card.recipe for m in members):
        return None
    recorded = [recorded_recipe(m.card.recipe, m.card.trained) for m in members]
    per_member = [*PER_MEMBER, *_own_initial_weights(recorded, folds)]
    ignored = (*RUN_KEYS, *per_member)
    recipes = [{k: _unversioned(k, v) for k, v in r.items() if k not in ignored} for r in recorded]
    if any(r != recipes[0] for r in recipes[1:]):
        return None
    common: dict[str, Any] = {**recipes[0], "folds_in_ensemble": folds}
    for key in per_member:
        values = [r.get(key) for r in recorded]
        if all(v == values[0] for v in values):
            if values[0] is not None:
                common[key] = values[0]
        else:
            common[f"{key}_per_member"] = values
    return common


def _own_initial_weights(recorded: list[dict[str, Any]], folds: list[Any]) -> tuple[str, ...]:
    """``init_weights`` and ``init_weights_from`` as per-member keys, when each fold started
    from a weights file and none from a model that held out another fold; else nothing."""
    if not all(is_weights_file(str(r.get("init_weights", "none"))) for r in recorded):
        return ()
    for recipe, fold in zip(recorded, folds, strict=True):
        start = recipe.get("init_weights_from")
        if isinstance(start, dict) and start.get("fold") != fold:
            return ()  # compared as usual, so the recipes differ
    return ("init_weights", "init_weights_from")


def _unversioned(key: str, value: Any) -> Any:
    """The recipe's ``model`` without its version; any other value as it is."""
    if key == "model" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "version"}
    return value


def _folds_metrics(members: list[Member]) -> dict[str, Any]:
    """The recipe's cross-validation, read from the members' own held-out folds."""
    return folds_metrics(
        members,
        f"the members are the models of {len(members)} folds of one patient-grouped "
        "cross-validation of one recipe; per_fold and cross_validation (mean and sd) are "
        "their figures on their own held-out folds. The ensemble itself has seen every "
        "image: score it on an independent set (dicomnode evaluate)",
    )


def folds_metrics(members: list[Member], validation: str) -> dict[str, Any]:
    """``validation``, each fold model's figures on its own held-out fold, and their mean ± sd."""
    per_fold = [dict(m.card.metrics) for m in members]
    return {
        "validation": validation,
        "per_fold": [
            {k: v for k, v in f.items() if k not in ("history", "validation")} for f in per_fold
        ],
        "cross_validation": summarise_folds(per_fold),
    }


def check_held_out(
    members: list[Member], members_recipe: dict[str, Any] | None, config: TrainingConfig
) -> None:
    """Refuse to score an ensemble on a fold that one of its members trained on.

    The fold models of one cross-validation (``members_recipe``, see :func:`folds_recipe`)
    have no such fold. Otherwise a member trained on ``config``'s data folder must have
    held out that very fold of the same split (folds, seed, grouping); and no member whose
    directory lists its training images (:mod:`~dicomnode.training.fingerprint`) may have
    trained on an image of that fold, whatever folder held it. A recipe that names no fold
    is left to :func:`validate_ensemble` to refuse.

    Raises
    ------
    TrainingError
        Naming the member, the fold it held out and the fold asked for.
    """
    if members_recipe is not None:
        raise TrainingError(
            "the members are the fold models of one cross-validation: every fold trained "
            f"{len(members) - 1} of them, so no fold of {config.data_dir} is held out from the "
            "ensemble; score it on an independent folder with dicomnode evaluate"
        )
    if not isinstance(config.fold, int):
        return
    for member in members:
        why = saw_fold(member.card, config, config.fold)
        if why is not None:
            raise TrainingError(
                f"member {member.directory} {why}; score the ensemble on the fold its members "
                "held out, or evaluate it on an independent folder"
            )
    listed = [(m.directory, read_training_images(m.directory)) for m in members]
    if any(images is not None for _, images in listed):  # by the pixels too: copies, stages
        found, assignment = fold_fingerprints(config)
        for directory, images in listed:
            if images is not None:
                whose = f"member {directory}"
                refuse_seen_folds(images, found, assignment, [config.fold], whose)


def validate_ensemble(
    model: torch.nn.Module,
    recipe: Path,
    fold: int | None = None,
    *,
    test_time_flip: bool = False,
    input_spec: InputSpec | None = None,
) -> dict[str, Any]:
    """The ensemble's figures on held-out fold ``fold`` (default: the recipe's) of ``recipe``,
    each image and its mirror averaged when the ensemble flips at test time; ``input_spec``:
    the ensemble's input, when it is not the recipe's (members of several inputs)."""
    config = load_config(recipe, fold=fold)
    if input_spec is not None and input_spec != config.input:
        config = config.model_copy(update={"input": input_spec})
    if not isinstance(config.fold, int):
        raise TrainingError(
            f"recipe {recipe} has fold: {config.fold}; name the held-out fold (--validate-fold K)"
        )
    with torch_settings(config):
        prepared = prepare(config)
        _, valid_idx = fold_indices(prepared, config.fold)
        held_out = fold_dataset(prepared, valid_idx, augment=False)
        logits, labels = predict_logits(
            place(model, prepared.device), held_out, prepared.device, test_time_flip=test_time_flip
        )
    figures = classification_metrics(labels, softmax(logits))
    return {
        "validation": (
            f"fold {config.fold} of {config.folds} of {config.data_dir} (recipe {recipe.name}); "
            "the member weights come from the same fold, so these figures are optimistic"
        ),
        "n": len(labels),
        **figures,
    }


def reader_note(cards: list[ModelCard]) -> str:
    """The members' notes to readers, each once, in member order: what was said of a
    member holds for the ensemble that averages it.

    Raises
    ------
    TrainingError
        If together they exceed a card's limit (the notes are named, not cut).
    """
    notes = list(dict.fromkeys(card.reader_note for card in cards if card.reader_note))
    joined = " ".join(notes)
    if len(joined) > READER_NOTE_MAX:
        raise TrainingError(
            f"the members' reader notes together take {len(joined)} characters, more than a "
            f"card's {READER_NOTE_MAX}: shorten them in the members' model.yaml"
        )
    return joined


def _write_training_images(members: list[Member], output_dir: Path, sha256: str) -> None:
    """Every member's training images (:mod:`~dicomnode.training.fingerprint`), or none
    when a member's are unknown (the old file, if any, removed: it would be another
    model's)."""
    images = joined(read_training_images(m.directory) for m in members)
    if images is not None:
        write_training_images(output_dir, images, sha256)
        return
    (output_dir / TRAINING_IMAGES_FILE).unlink(missing_ok=True)
    logger.warning(
        "a member has no %s: the ensemble cannot list the images it trained on, so "
        "evaluate cannot recognise them by their pixels (dicomnode fingerprint MEMBER_DIR)",
        TRAINING_IMAGES_FILE,
    )


def _copy_localiser(first: Member, output_dir: Path) -> None:
    if first.card.localiser is not None:
        shutil.copyfile(
            first.directory / first.card.localiser.file, output_dir / first.card.localiser.file
        )


def _listed(members: list[Member], recipe: dict[str, Any] | None) -> str:
    """The members for the description: "the 5 fold models (0, ...) of x 2.1.0" or a list."""
    names = [f"{m.card.name} {m.card.version}" for m in members]
    if recipe is None or len(set(names)) > 1:
        return ", ".join(names)
    numbers = ", ".join(str(f) for f in recipe["folds_in_ensemble"])
    return f"the {len(members)} fold models ({numbers}) of {names[0]}"


def _card(
    members: list[Member],
    name: str,
    version: str,
    architecture: ArchitectureSpec,
    sha256: str,
    metrics: dict[str, Any],
    method: Method,
    members_recipe: dict[str, Any] | None,
    note: str,
    shared_input: InputSpec,
) -> ModelCard:
    """The ensemble's card; ``members_recipe``: see :func:`folds_recipe`; ``note``: see
    :func:`reader_note`; ``shared_input``: see :func:`ensemble_input`."""
    first = members[0].card
    listed = _listed(members, members_recipe)
    recipe: dict[str, Any] = {
        "ensemble": {"method": method, "members": [m.directory.name for m in members]}
    }
    if members_recipe is not None:
        recipe["members_recipe"] = members_recipe
    figures = metrics.get("held_out", {})
    headline = {k: figures[k] for k in ("balanced_accuracy", "auc_macro") if k in figures}
    return ModelCard(
        name=name,
        version=version,
        description=f"Ensemble ({method}-weighted) of {listed}. {first.description}".strip(),
        body_parts=first.body_parts,
        architecture=architecture,
        input=shared_input,
        preprocessing=first.preprocessing,
        classes=first.classes,
        gradcam=GradCamSpec(
            target_layer=MEMBER_SEPARATOR.join(m.card.gradcam.target_layer for m in members),
            method=first.gradcam.method,
            shift=first.gradcam.shift,
        ),
        weights=WeightsSpec(file=WEIGHTS_FILE, sha256=sha256),
        localiser=first.localiser,
        temperature=1.0,
        test_time_flip=first.test_time_flip,
        finding_class_minimum=first.finding_class_minimum,
        intended_use=first.intended_use,
        training_data=first.training_data,
        reader_note=note,
        metrics={**metrics, **headline},
        recipe=recipe,
        trained=datetime.date.today().isoformat(),
        synthetic_training_data=any(m.card.synthetic_training_data for m in members),
    )


# ----------------------------------------------------------------------------- out-of-fold scoring


@dataclass(frozen=True, eq=False)
class OutOfFold:
    """One member's out-of-fold table (``oof_predictions.csv``), rows sorted by path."""

    paths: tuple[str, ...]
    labels: np.ndarray[Any, np.dtype[np.int64]]
    folds: np.ndarray[Any, np.dtype[np.int64]]
    probabilities: Float64Array


def read_out_of_fold(path: Path) -> OutOfFold:
    """Read ``path,label,fold,predicted,p_0..`` rows (written by cross-validated training)."""
    if not path.is_file():
        raise TrainingError(
            f"no out-of-fold predictions at {path}: train the member with fold all or final"
        )
    with path.open(encoding="utf-8", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
    if not rows:
        raise TrainingError(f"{path} has no rows")
    classes = sum(1 for key in rows[0] if key.startswith("p_"))
    return OutOfFold(
        paths=tuple(row["path"] for row in rows),
        labels=np.asarray([int(row["label"]) for row in rows], dtype=np.int64),
        folds=np.asarray([int(row["fold"]) for row in rows], dtype=np.int64),
        probabilities=np.asarray(
            [[float(row[f"p_{k}"]) for k in range(classes)] for row in rows], dtype=np.float64
        ),
    )


def out_of_fold_path(member: Member) -> Path:
    """Where a member's training run left its out-of-fold table (its recipe's checkpoints)."""
    recipe = member.card.recipe or {}
    checkpoints = recipe.get("checkpoint_dir") or f"var/checkpoints/{member.card.name}"
    return Path(checkpoints) / OOF_FILE


def fuse(tables: list[OutOfFold], weights: Float64Array) -> Float64Array:
    """The members' out-of-fold probabilities fused by the node's own fusion."""
    member_probs = torch.from_numpy(np.stack([table.probabilities for table in tables]))
    fused: Float64Array = fuse_probabilities(torch.from_numpy(weights), member_probs).numpy()
    return fused


def score_out_of_fold(
    directories: list[Path], method: Method, tables: list[Path] | None = None
) -> dict[str, Any]:
    """Cross-validated figures of the ensemble of ``directories`` without training again.

    Each member's out-of-fold probabilities (its own folds' held-out images,
    already temperature-scaled) are fused with the weights ``method`` gives;
    the members must have run the same grouped folds on the same images.
    The weights come from the members' cross-validated figures over the same
    images, so the result is slightly optimistic (said in ``validation``).
    Members may differ in input size; the node's ensemble of such members only
    approximates these figures (a smaller member sees the image resized twice:
    :class:`~dicomnode.models.architectures.MemberInput`).
    """
    members = [Member(d, load_card(d)) for d in directories]
    if len(members) < 2:
        raise TrainingError("an ensemble needs two or more member model directories")
    paths = tables or [out_of_fold_path(m) for m in members]
    loaded = [read_out_of_fold(p) for p in paths]
    first = loaded[0]
    for path, table in zip(paths[1:], loaded[1:], strict=True):
        same = table.paths == first.paths and np.array_equal(table.folds, first.folds)
        if not same or not np.array_equal(table.labels, first.labels):
            raise TrainingError(f"{path} does not cover the same images and folds as {paths[0]}")
    weights = ensemble_weights([m.card for m in members], method)
    fused = fuse(loaded, weights)
    per_fold = [
        classification_metrics(first.labels[first.folds == k], fused[first.folds == k])
        for k in np.unique(first.folds)
    ]
    validation = (
        f"out-of-fold predictions of {len(np.unique(first.folds))} grouped folds, fused; "
        "weights from the members' figures on the same images (optimistic)"
    )
    sizes = {m.card.input.size for m in members}
    if len(sizes) > 1:
        validation += (
            "; the members take inputs of several sizes: the node's ensemble of them shows a "
            "smaller member the image resized twice, so it only approximates these figures "
            "(score it as served: dicomnode ensemble --validate-on, or dicomnode evaluate)"
        )
    return {
        "validation": validation,
        "method": method,
        "members": [f"{m.card.name} {m.card.version}" for m in members],
        "class_weights": weights.tolist(),
        **classification_metrics(first.labels, fused),
        "cross_validation": summarise_folds(per_fold),
    }
