"""Which images a model trained on, by their pixels: ``training-images.json`` beside its card.

:mod:`~dicomnode.training.lineage` knows a model's training folder by its path, so a copy
of the folder, a test folder that shares some images with it, or the same pictures
exported again under other names pass unnoticed, and a model scored on its own training
images looks better than it is. Each model directory that training writes therefore holds
the :data:`~dicomnode.training.data.PIXEL_DIGEST` of every image it trained on and of every
image it held out (:class:`TrainingImages`), and the :mod:`~dicomnode.training.near` hash
of every image it trained on with the folder's threshold, so that a lossy copy (a JPEG
export, a smaller one, another window) is known too; ``dicomnode evaluate`` hashes the
images it scores the same way and says how many the model trained on, or are near copies of
those (:class:`Overlap`), or leaves them out (``--unseen-only``).

What counts as trained on: the images of every fold but the held-out one (all of them
for ``fold: final`` and ``none``); for an ensemble, those of any member; for a model
fine-tuned from another model directory (``init_weights``), also its start's. The file
names the sha256 of the weights it describes: a list left behind by replaced weights is not
used. ``dicomnode fingerprint MODEL_DIR`` writes the file afresh for a model trained before it
existed, from the card's recipe, once the folder's split is checked against the card.

The same lists guard cross-validation by content (:func:`refuse_seen_folds`): a training run
refuses to start from weights that trained on an image of the fold it holds out (or a near
copy of one), and ``dicomnode ensemble --validate-on`` refuses a member that trained on one,
whatever folder held the image (the folder checks of :mod:`~dicomnode.training.lineage`
see only paths).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import ModelError, TrainingError
from dicomnode.models.card import ENSEMBLE, ModelCard, load_card
from dicomnode.training.config import DEFAULT_GROUP_PATTERN, TrainingConfig, recorded_recipe
from dicomnode.training.data import (
    PIXEL_DIGEST,
    Fingerprints,
    IntArray,
    image_fingerprints,
    scan_folder,
    split_groups,
    warn_of_repeated_images,
)
from dicomnode.training.folds import assign_folds, split
from dicomnode.training.lineage import trained_recipe, warn_if_trained_on
from dicomnode.training.near import (
    NEAR_COPY,
    NEAR_HASH,
    BoolArray,
    Signs,
    near_copies,
    near_threshold,
    signs,
)

logger = logging.getLogger(__name__)

TRAINING_IMAGES_FILE = "training-images.json"


@dataclass(frozen=True)
class TrainingImages:
    """The pixel digests of the images a model trained on and of those it held out, and the
    :mod:`~dicomnode.training.near` hashes of those it trained on with the threshold of its
    folder, all images counted (none, 0, in a list written before they were kept)."""

    trained_on: frozenset[str]
    held_out: frozenset[str]
    data_dir: str
    made: str
    near: frozenset[str] = frozenset()
    near_threshold: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": PIXEL_DIGEST,
            "data_dir": self.data_dir,
            "made": self.made,
            "trained_on": sorted(self.trained_on),
            "held_out": sorted(self.held_out - self.trained_on),
            "near_hash": NEAR_HASH,
            "near_threshold": self.near_threshold,
            "near_trained_on": sorted(self.near),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingImages:
        if data.get("digest") != PIXEL_DIGEST:
            kind = data.get("digest")
            raise ModelError(f"{TRAINING_IMAGES_FILE}: digests of another kind: {kind!r}")
        near = data.get("near_hash") == NEAR_HASH
        return cls(
            trained_on=frozenset(data["trained_on"]),
            held_out=frozenset(data["held_out"]),
            data_dir=str(data["data_dir"]),
            made=str(data["made"]),
            near=frozenset(data["near_trained_on"]) if near else frozenset(),
            near_threshold=int(data["near_threshold"]) if near else 0,
        )

    def joined(self, other: TrainingImages) -> TrainingImages:
        """What a model made of both has trained on (an image one trained on is not held out;
        the threshold is the joined folder's)."""
        trained = self.trained_on | other.trained_on
        folders = sorted({*self.data_dir.split("; "), *other.data_dir.split("; ")})
        held = (self.held_out | other.held_out) - trained
        known = bool(self.near) and bool(other.near)  # a list without hashes: none known
        near = self.near | other.near if known else frozenset()
        least = min(self.near_threshold, other.near_threshold)
        threshold = min(least, near_threshold(near)) if known else 0
        return TrainingImages(trained, held, "; ".join(folders), self.made, near, threshold)

    def recognised(self, found: Fingerprints) -> BoolArray:
        """Which images of ``found`` the model trained on: the same pixels, or a near copy."""
        same = np.fromiter((d in self.trained_on for d in found.digests), bool, len(found.digests))
        return same | near_copies(found.near, self._near_signs, self.near_threshold)

    @cached_property
    def _near_signs(self) -> Signs:
        """The :attr:`near` hashes' signs, made once (``evaluate`` asks per chunk)."""
        return signs(self.near)


def of_fold(
    found: Fingerprints, assignment: IntArray, fold: int | None, data_dir: Path, made: str
) -> TrainingImages:
    """The images a run that held out ``fold`` (``None``: none) trained on and held out
    (an image filed for two patients in two folds is among both: see
    :func:`~dicomnode.training.data.warn_of_repeated_images`)."""
    digests = found.digests
    if fold is None:
        train, held = np.arange(len(digests)), np.zeros(0, dtype=np.int64)
    else:
        train, held = split(assignment, fold)
    return TrainingImages(
        frozenset(digests[i] for i in train),
        frozenset(digests[i] for i in held),
        str(data_dir),
        made,
        frozenset(found.near[i] for i in train),
        found.near_threshold,  # the whole folder's: no image held out is a near copy
    )


def at_training() -> str:
    return f"at training, {datetime.date.today().isoformat()}"


def write_training_images(directory: Path, images: TrainingImages, weights_sha256: str) -> Path:
    """Write the list of the weights whose sha256 is ``weights_sha256`` into ``directory``."""
    path = directory / TRAINING_IMAGES_FILE
    data = {"weights_sha256": weights_sha256, **images.to_json()}
    path.write_text(json.dumps(data, indent=0), encoding="utf-8")
    return path


def read_training_images(directory: Path) -> TrainingImages | None:
    """The :class:`TrainingImages` of the weights of the card in ``directory``, or ``None``
    when it has no list, or a list of other weights (warned about: the weights were
    replaced and the list was not).

    Raises
    ------
    ModelError
        When the file is there but cannot be read.
    """
    path = directory / TRAINING_IMAGES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        listed = TrainingImages.from_json(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: not a list of training images ({exc})") from exc
    weights = load_card(directory, verify=False).weights.sha256
    if data.get("weights_sha256") != weights:
        logger.warning(
            "%s lists the training images of other weights (sha256 %s, the card's %s): "
            "not used (dicomnode fingerprint %s lists those of the card's weights)",
            path, data.get("weights_sha256"), weights, directory,
        )  # fmt: skip
        return None
    return listed


def start_images(config: TrainingConfig) -> TrainingImages | None:
    """The list of the model directory a run starts from (``init_weights`` with the card
    that describes it: ``init_weights_from``), or ``None``."""
    if config.init_weights_from is None:
        return None
    return read_training_images(Path(config.init_weights).parent)


def joined(parts: Iterable[TrainingImages | None]) -> TrainingImages | None:
    """Every part joined, or ``None`` when any is unknown (an ensemble's members)."""
    known = list(parts)
    if not known or any(part is None for part in known):
        return None
    first, *rest = [part for part in known if part is not None]
    for part in rest:
        first = first.joined(part)
    return first


@dataclass(frozen=True)
class Overlap:
    """How many of the images scored a model trained on (by their pixels), are near copies of
    those (:mod:`~dicomnode.training.near`), or it held out."""

    images: int
    trained_on: int
    held_out: int
    left_out: bool = False
    near_copies: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "trained_on": self.trained_on,
            "near_copies": self.near_copies,
            "held_out": self.held_out,
            "trained_on_left_out": self.left_out,
        }

    def sentence(self, card: ModelCard) -> str:
        """A warning when the model trained on images scored, else ""."""
        seen = self.trained_on + self.near_copies
        if not seen:
            return ""
        who = f"{card.name} {card.version}"
        if not self.near_copies:
            what = f"have the same pixels as images {who} trained on"
        elif not self.trained_on:
            what = f"are near copies of images {who} trained on ({NEAR_COPY})"
        else:
            what = (
                f"are images {who} trained on ({self.trained_on} with the same pixels, "
                f"{self.near_copies} near copies: {NEAR_COPY})"
            )
        others = self.images - seen
        if self.left_out:
            return (
                f"{seen} of the {self.images} images {what} and were left out (--unseen-only): "
                f"the figures are on the other {others}"
            )
        rest = f"--unseen-only scores the other {others}" if others else "every one of them"
        return (
            f"{seen} of the {self.images} images scored {what}: figures on them are optimistic "
            f"({rest})"
        )


def none_seen(figures: dict[str, Any]) -> str:
    """The sentence for an evaluation whose ``training_overlap`` (:meth:`Overlap.to_json`)
    found no image the model trained on, else ""."""
    seen = figures.get("trained_on"), figures.get("near_copies", 0)
    if seen != (0, 0) or figures.get("trained_on_left_out"):
        return ""
    held = figures.get("held_out", 0)
    kept = f"; {held} of them it held out in validation" if held else ""
    return (
        f"None of the {figures['images']} images scored is one the model trained on "
        f"(compared by their decoded pixels with its training-images.json){kept}"
    )


def overlap(model: TrainingImages, found: Fingerprints) -> Overlap:
    digests = found.digests
    trained = sum(digest in model.trained_on for digest in digests)
    held = sum(digest in model.held_out and digest not in model.trained_on for digest in digests)
    near = int(model.recognised(found).sum()) - trained
    return Overlap(len(digests), trained, held, near_copies=near)


@dataclass(frozen=True)
class Seen:
    """Which images to score (``kept``, indices), the warning ("" when none) and the overlap
    with the model's training images (``None`` when its directory does not list them)."""

    kept: tuple[int, ...]
    warning: str
    overlap: Overlap | None


def training_images_of(model_dir: Path, *, needed: bool = False) -> TrainingImages | None:
    """The images the weights in ``model_dir`` trained on (None: not listed).

    Raises
    ------
    TrainingError
        When they are ``needed`` and the directory has no list of its weights' images.
    """
    listed = read_training_images(model_dir)
    if listed is None and needed:
        raise TrainingError(
            f"{model_dir} has no {TRAINING_IMAGES_FILE}: the images it trained on are not "
            f"known (dicomnode fingerprint {model_dir} lists them from its card's recipe)"
        )
    return listed


def against_training_images(
    listed: TrainingImages | None,
    card: ModelCard,
    data_dir: Path,
    fingerprints: Callable[[], Fingerprints],
    *,
    unseen_only: bool = False,
) -> Seen:
    """What the model of ``card`` has seen of the images of ``data_dir``, warned about: by
    their pixels and near copies (``fingerprints``, computed only then) when its directory
    ``listed`` its training images (:func:`training_images_of`), else by the folder's path
    (:func:`~dicomnode.training.lineage.trained_on_folder`). With ``unseen_only`` the images
    it trained on, and their near copies, are left out.

    Raises
    ------
    TrainingError
        With ``unseen_only``, when nothing is left.
    """
    if listed is None:
        return Seen((), warn_if_trained_on(card, data_dir), None)
    hashed = fingerprints()
    found = replace(overlap(listed, hashed), left_out=unseen_only)
    seen = listed.recognised(hashed) if unseen_only else np.zeros(len(hashed.digests), bool)
    kept = tuple(int(i) for i in np.flatnonzero(~seen))
    if not kept and hashed.digests:
        raise TrainingError(
            f"{card.name} {card.version} trained on every one of the {len(hashed.digests)} "
            f"images of {data_dir} (the same pixels, or near copies): nothing is left to score"
        )
    warning = found.sentence(card)
    if warning:
        logger.warning("%s", warning)
    return Seen(kept, warning, found)


def fingerprint_model(model_dir: Path, data_dir: Path | None = None) -> TrainingImages:
    """Write ``training-images.json`` for a model trained before training wrote it; return
    what it lists.

    The card's recipe (an ensemble's ``members_recipe``) names the folder (``data_dir``
    replaces it: a copy elsewhere) and its split; the held-out folds are the card's
    (``metrics.fold``, or each member's in ``per_fold``; none for ``fold: final`` and
    ``none``). The split is first checked against the card: each held-out fold's images
    per class must be the row sums of its recorded confusion matrix (a ``fold: none`` card
    has none: the folder is then taken as it is, with a warning). The images of a model
    it started from (``init_weights``) are not added (training adds them).

    Raises
    ------
    TrainingError
        When the card does not say how it was trained, or the folder's split is not the
        one the card recorded.
    """
    card = load_card(model_dir, verify=False)
    recipe = trained_recipe(card.recipe)
    if not recipe.get("data_dir"):
        raise TrainingError(f"{model_dir}: its card does not say which recipe trained it")
    recorded = recorded_recipe(recipe, card.trained)
    folder = data_dir or Path(str(recorded["data_dir"]))
    images = scan_folder(
        folder,
        card.num_classes,
        str(recorded.get("group_pattern", DEFAULT_GROUP_PATTERN)),
        str(recorded["group_by"]),
    )
    # The split needs the hashes only when it joins copies: otherwise a wrong folder is
    # refused before any image of it is decoded.
    early = image_fingerprints(images) if recorded["group_copies"] else None
    groups = images.groups if early is None else split_groups(images, early, True)
    assignment = assign_folds(images.labels, groups, int(recorded["folds"]), int(recorded["seed"]))
    expected = _checked_split(card, recorded, images.labels, assignment, folder)
    found = early if early is not None else image_fingerprints(images)
    warn_of_repeated_images(images, found, assignment)
    when = datetime.date.today().isoformat()
    made = (
        f"afterwards, {when}, by dicomnode fingerprint from {folder} with the card's recipe "
        "(its split checked against the card's confusion matrices)"
    )
    held_out: list[int | None] = [k for k in expected if k is not None] or [None]
    parts = [of_fold(found, assignment, k, folder, made) for k in held_out]
    listed = parts[0]
    for part in parts[1:]:
        listed = listed.joined(part)
    write_training_images(model_dir, listed, card.weights.sha256)
    logger.info(
        "%s: %d images trained on, %d held out", model_dir, len(listed.trained_on),
        len(listed.held_out - listed.trained_on),
    )  # fmt: skip
    return listed


def _checked_split(
    card: ModelCard,
    recorded: Mapping[str, Any],
    labels: IntArray,
    assignment: IntArray,
    folder: Path,
) -> dict[int | None, list[int]]:
    """Images per class of each fold the card held out (:func:`_held_out_counts`), checked
    against ``folder``'s split; none for a ``fold: none`` model, whose card holds no figures
    to check the folder against (warned: every image of it is taken as trained on)."""
    if str(recorded.get("fold")) == "none":
        logger.warning(
            "%s %s trained on every image of its folder (fold: none) and its card records no "
            "figures to check %s against: the list takes every image of it as trained on",
            card.name,
            card.version,
            folder,
        )
        return {}
    expected = _held_out_counts(card)
    _check_split(labels, assignment, expected, card.num_classes, folder)
    return expected


def _held_out_counts(card: ModelCard) -> dict[int | None, list[int]]:
    """Images per class of each held-out fold, from the card's confusion matrices (key
    ``None``: every image, the pooled out-of-fold figures of ``fold: final``)."""
    metrics = card.metrics
    entries = metrics.get("per_fold") if card.architecture.name == ENSEMBLE else None
    if entries is None:
        fold = metrics.get("fold")
        entries = [{**metrics, "fold": fold if isinstance(fold, int) else None}]
    counts = {
        entry.get("fold"): [int(sum(row)) for row in entry["confusion_matrix"]]
        for entry in entries
        if isinstance(entry, dict) and "confusion_matrix" in entry
    }
    if not counts:
        raise TrainingError(
            f"{card.name} {card.version}: its card records no confusion matrix to check the "
            "folder's split against"
        )
    return counts


def _check_split(
    labels: IntArray,
    assignment: IntArray,
    expected: dict[int | None, list[int]],
    num_classes: int,
    folder: Path,
) -> None:
    for fold, counts in expected.items():
        chosen = labels if fold is None else labels[assignment == fold]
        found = np.bincount(chosen, minlength=num_classes).tolist()
        if found != counts:
            which = "the folder" if fold is None else f"fold {fold}"
            raise TrainingError(
                f"{folder} is not the folder the card was trained on: {which} holds {found} "
                f"images per class, the card's confusion matrix {counts}"
            )


def refuse_seen_folds(
    listed: TrainingImages,
    found: Fingerprints,
    assignment: IntArray,
    folds: Sequence[int],
    whose: str,
) -> None:
    """Refuse weights (``whose``) that trained on an image of a fold a run holds out, by
    the images' pixels or as near copies (``found``, the run's folder): a copy of the folder,
    a lossy export of it, or a chain of stages, that the folder check of
    :mod:`~dicomnode.training.lineage` cannot see.

    Raises
    ------
    TrainingError
        Naming the weights, the fold and how many of its images they trained on.
    """
    recognised = listed.recognised(found)
    for fold in folds:
        held = assignment == fold
        seen = int((recognised & held).sum())
        if seen:
            raise TrainingError(
                f"{whose} trained on {seen} of the {int(held.sum())} images of fold {fold} "
                f"(the same pixels or near copies, from {listed.data_dir}): its figures on that "
                "fold would be optimistic; start from weights that held those images out"
            )


def fold_fingerprints(config: TrainingConfig) -> tuple[Fingerprints, IntArray]:
    """The fingerprints of ``config``'s folder and the fold of each image in its split."""
    images = scan_folder(config.data_dir, config.num_classes, config.group_pattern, config.group_by)
    found = image_fingerprints(images, config.cache_dir)
    groups = split_groups(images, found, config.group_copies)
    return found, assign_folds(images.labels, groups, config.folds, config.seed)
