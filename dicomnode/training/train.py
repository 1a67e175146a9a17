"""The training loop: one model per fold, checkpointed every epoch.

:func:`train_from_config` reads a :class:`~dicomnode.training.config.TrainingConfig`,
trains one model per requested fold (AdamW, linear warm-up then cosine decay,
class-weighted cross-entropy (:mod:`dicomnode.training.loss`), early stopping on
validation balanced accuracy), checkpoints after every epoch so ``resume=True``
continues an interrupted run, and hands the kept weights to
:mod:`dicomnode.training.output`, which writes ``output_dir`` with
``model.safetensors``, ``model.yaml`` (a card the node loads) and
``metrics.json``. The network and its initial weights come from
:mod:`dicomnode.training.network`.

:func:`export_from_checkpoints` writes that directory from the best epoch
saved so far, so a long run can be stopped and shipped at any epoch.

Checkpoints live in ``<checkpoints>/fold-<k>/`` (:mod:`dicomnode.training.checkpoints`):
after every epoch, and every ``checkpoint_minutes`` within one. ``--resume`` refuses a
checkpoint whose images or folds differ from the run's.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dicomnode.errors import ModelError, TrainingError
from dicomnode.inference import check_cam_layers
from dicomnode.models.architectures import build_model, place, scorer
from dicomnode.models.card import CARD_FILE
from dicomnode.training.attention import CamSupervision, MaskLoss
from dicomnode.training.checkpoints import (
    BEST_FILE,
    FOLDS_KEY,
    LAST_FILE,
    Midway,
    MidwaySaver,
    check_same_folds,
    fold_dir,
    fold_lock,
    folds_record,
    forget,
    has_checkpoint,
    midway_saver,
    restore,
    save_epoch,
)
from dicomnode.training.config import RecipeChanges, TrainingConfig, load_config
from dicomnode.training.data import (
    ImageDataset,
    IntArray,
    MaskedView,
    PixelCache,
    image_fingerprints,
    scan_folder,
    split_groups,
    warn_if_each_file_is_a_patient,
    warn_if_one_patient_dominates,
    warn_of_repeated_images,
)
from dicomnode.training.fingerprint import TRAINING_IMAGES_FILE, refuse_seen_folds, start_images
from dicomnode.training.folds import assign_folds, split
from dicomnode.training.lineage import checked_start, validated_folds
from dicomnode.training.loss import make_loss
from dicomnode.training.masks import LesionMasks
from dicomnode.training.metrics import (
    Float64Array,
    classification_metrics,
    median_epoch,
    softmax,
)
from dicomnode.training.network import classifier_head, new_model
from dicomnode.training.output import write_final_directory, write_model_directory
from dicomnode.training.pretrained import checked_initial_weights
from dicomnode.training.state import FoldResult, LoopState, Prepared, Trainer

logger = logging.getLogger(__name__)

EVAL_BATCH = 64

PROGRESS_LOG_SECONDS = 120.0
"""Where no progress bar is drawn (output to a file, a container's log), a training step's
progress is logged at most this often instead."""


# ----------------------------------------------------------------------------- public


def train_from_config(
    config_path: Path, *, resume: bool = False, **changes: Unpack[RecipeChanges]
) -> Path:
    """Train as ``config_path`` says, with the run's
    :class:`~dicomnode.training.config.RecipeChanges`; return the model directory.

    Raises
    ------
    TrainingError
        Among others, when ``init_weights`` trained on a fold this run holds out
        (:func:`~dicomnode.training.lineage.checked_start`).
    """
    every_fold = changes.copy()
    every_fold["fold"] = None  # the recipe's own folds, for the run's checks
    recipe = load_config(config_path, **every_fold)
    config = _one_fold_of_the_recipe(recipe, load_config(config_path, **changes))
    config = checked_start(config)
    if not (resume and _has_checkpoints(config)):
        written = _written_by(recipe, config)
        if changes.get("output_dir") is not None:  # elsewhere, perhaps the recipe's model again
            written.append(load_config(config_path).output_dir)
        refuse_to_replace(config, written)
    with torch_settings(config):
        prepared = prepare(config)
        check_start_images(prepared)
        results = [train_fold(prepared, fold, resume=resume) for fold in _folds_to_run(config)]
        if config.fold == "final":
            final = train_fold(final_run(prepared, results), None, resume=resume)
            return write_final_directory(prepared, results, final)
        return write_model_directory(prepared, results)


def check_start_images(prepared: Prepared) -> None:
    """Refuse a start (``init_weights``) whose model directory lists, among the images it
    trained on, an image of a fold this run holds out (by its pixels: a copy of the folder,
    or an earlier stage, that :func:`~dicomnode.training.lineage.checked_start` cannot see).

    Raises
    ------
    TrainingError
        See :func:`~dicomnode.training.fingerprint.refuse_seen_folds`.
    """
    config = prepared.config
    start = config.init_weights_from
    listed = start_images(config)
    if start is None:
        return
    if listed is None:
        directory = Path(config.init_weights).parent
        logger.warning(
            "%s lists no images it trained on (%s): they are not checked against this run's "
            "held-out folds by their pixels, and this run's list holds its own images only "
            "(`dicomnode fingerprint %s` writes the start's, then train again)",
            directory, TRAINING_IMAGES_FILE, directory,
        )  # fmt: skip
        return
    whose = f"init_weights {config.init_weights} ({start.name} {start.version})"
    found, folds = prepared.fingerprints, validated_folds(config)
    refuse_seen_folds(listed, found, prepared.assignment, folds, whose)


def _has_checkpoints(config: TrainingConfig) -> bool:
    """Whether a run of ``config`` has left a checkpoint to resume from."""
    runs = [*_folds_to_run(config), None] if config.fold == "final" else _folds_to_run(config)
    return any(has_checkpoint(fold_dir(config, fold)) for fold in runs)


def _written_by(recipe: TrainingConfig, config: TrainingConfig) -> list[Path]:
    """The model directories a run of ``config`` (``recipe``, perhaps one fold of it) writes."""
    directories = [recipe.output_dir, config.output_dir]
    if not isinstance(config.fold, int):
        directories += [config.output_dir / f"fold-{k}" for k in range(config.folds)]
    return list(dict.fromkeys(directories))


def refuse_to_replace(config: TrainingConfig, directories: Sequence[Path]) -> None:
    """Refuse a new run when one of ``directories`` holds this model's version already.

    A model's name and version identify its weights in every SR it signs; a new
    run (other code, other data) writing under the same version would make two
    models one name. ``--resume`` continues the run that wrote it and may, when
    that run left checkpoints (else it is a new run).

    Raises
    ------
    TrainingError
        If a ``model.yaml`` there is a card of ``model.name`` at ``model.version``.
    """
    ours = (config.model.name, config.model.version)
    for directory in directories:
        try:
            written = yaml.safe_load((directory / CARD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue  # nothing (readable) there: nothing to replace
        if not isinstance(written, dict):
            continue
        if (str(written.get("name")), str(written.get("version"))) == ours:
            raise TrainingError(
                f"{directory} holds {ours[0]} {ours[1]} already: give the new run a new "
                "model.version (in the recipe, or `dicomnode train RECIPE --version V`), or "
                "another output_dir, or remove the directory"
            )


def _one_fold_of_the_recipe(recipe: TrainingConfig, config: TrainingConfig) -> TrainingConfig:
    """``--fold K`` on a recipe that runs other folds writes ``output_dir/fold-K``.

    So folds run as parallel processes do not write one directory in turn, and
    the recipe's own directory is written only by the run the recipe describes
    (continued with ``--resume``).
    """
    if not isinstance(config.fold, int) or recipe.fold == config.fold:
        return config
    return config.model_copy(update={"output_dir": config.output_dir / f"fold-{config.fold}"})


def export_from_checkpoints(config_path: Path) -> Path:
    """Write the model directory from the best epoch saved so far of each fold (no training)."""
    config = load_config(config_path)
    config = checked_start(config)
    with torch_settings(config):
        prepared = prepare(config)
        results = [_result_from_checkpoint(prepared, fold) for fold in _folds_to_run(config)]
        if config.fold == "final":
            final = _result_from_checkpoint(final_run(prepared, results), None)
            return write_final_directory(prepared, results, final)
        return write_model_directory(prepared, results)


@contextmanager
def torch_settings(config: TrainingConfig) -> Iterator[None]:
    """``num_threads`` and deterministic algorithms for the run; the previous settings after it.

    Before CUDA is first used it also sets ``CUBLAS_WORKSPACE_CONFIG`` (unless already set),
    which cuBLAS needs for reproducible matrix products: a seeded run is bit-exact on the
    CPU, and close to but not bit-exact on CUDA (some CUDA kernels have no deterministic form).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def prepare(config: TrainingConfig) -> Prepared:
    """Seed, check the Grad-CAM layer, scan the data, open the pixel cache, assign folds."""
    _seed_everything(config.seed)
    checked_initial_weights(config.init_weights, config.architecture.name)
    if config.gradcam_layer is not None:
        arch = config.architecture
        network = build_model(arch.name, config.input.channels, config.num_classes, arch.params)
        try:
            check_cam_layers(network, config.gradcam_layer)
        except ModelError as exc:
            raise TrainingError(f"gradcam_layer: {exc}") from exc
    images = scan_folder(config.data_dir, config.num_classes, config.group_pattern, config.group_by)
    warn_if_each_file_is_a_patient(images, config.group_by)
    warn_if_one_patient_dominates(images, config.folds)
    cache = PixelCache.build(
        images, config.cache_dir, config.input.size, config.preprocessing.resize
    )
    found = image_fingerprints(images, config.cache_dir)  # kept with the cache it was built with
    groups = split_groups(images, found, config.group_copies)
    assignment = assign_folds(images.labels, groups, config.folds, config.seed)
    warn_of_repeated_images(images, found, assignment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    masks = None
    if config.mask_supervision is not None:
        masks = LesionMasks.of_folder(config.data_dir, tuple(p.stem for p in images.paths))
        logger.info("mask supervision: %d images have a lesion mask", len(masks.paths))
    logger.info(
        "prepared %d images, %d patients, device %s, training in %s",
        len(images),
        len(set(images.groups)),
        device,
        "bfloat16" if uses_bfloat16(config, device) else "float32",
    )
    return Prepared(config, images, cache, assignment, found, device, masks)


# ----------------------------------------------------------------------------- setup


def _folds_to_run(config: TrainingConfig) -> list[int | None]:
    if config.fold == "none":
        return [None]
    if isinstance(config.fold, int):
        return [config.fold]
    return list(range(config.folds))


def final_epochs(config: TrainingConfig, results: list[FoldResult]) -> int:
    """Epochs of the all-data run: ``final_epochs``, else the folds' median kept epoch."""
    if config.final_epochs is not None:
        return config.final_epochs
    return median_epoch([max(r.kept_epoch, 1) for r in results])


def final_run(prepared: Prepared, results: list[FoldResult]) -> Prepared:
    """``prepared`` for the all-data run of ``fold: final`` (its epoch count fixed)."""
    epochs = final_epochs(prepared.config, results)
    logger.info("final run on every image for %d epochs", epochs)
    return replace(prepared, config=prepared.config.model_copy(update={"epochs": epochs}))


def loader_workers(config: TrainingConfig, device: torch.device) -> int:
    """Data-loading processes: the recipe's, else 0 on CPU and up to 8 on CUDA."""
    if config.loader_workers is not None:
        return config.loader_workers
    if device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fold_indices(prepared: Prepared, fold: int | None) -> tuple[IntArray, IntArray]:
    if fold is None:
        return np.arange(len(prepared.images), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return split(prepared.assignment, fold)


def fold_dataset(prepared: Prepared, indices: IntArray, *, augment: bool) -> ImageDataset:
    config = prepared.config
    return ImageDataset(
        prepared.cache,
        prepared.images.labels,
        indices.tolist(),
        config.input,
        config.preprocessing,
        config.augment if augment else None,
        config.seed,
        prepared.masks if augment else None,
    )


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW: head at ``lr``; backbone at ``lr`` x factor (finetune) or frozen (feature)."""
    head_name, head = classifier_head(model)
    head_ids = {id(p) for p in head.parameters()}
    backbone_lr = config.lr * (config.backbone_lr_factor if config.mode == "finetune" else 1.0)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        is_head = id(parameter) in head_ids
        if config.mode == "feature" and not is_head:
            parameter.requires_grad_(False)
            continue
        groups.setdefault((is_head, parameter.dim() > 1), []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": config.lr if is_head else backbone_lr,
            "weight_decay": config.weight_decay if decays else 0.0,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]
    logger.debug("head %s; %d parameter groups", head_name, len(param_groups))
    return torch.optim.AdamW(param_groups)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to zero at the last step."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(config: TrainingConfig, labels: IntArray, epoch: int) -> list[int]:
    """The items of an epoch's training set (:class:`ImageDataset`), seeded by the seed and epoch.

    ``shuffle``: each position once; ``balanced``: as many draws with replacement, every
    class (present in ``labels``) equally likely, the ``k``-th repeat of position ``p``
    being item ``p + k * len(labels)`` so that each repeat is augmented afresh.
    """
    generator = torch.Generator().manual_seed(config.seed * 7919 + epoch)
    if config.sampling == "shuffle":
        return torch.randperm(len(labels), generator=generator).tolist()
    counts = np.bincount(labels, minlength=config.num_classes)
    weights = torch.tensor(1.0 / counts[labels], dtype=torch.float64)
    drawn = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    seen: dict[int, int] = {}
    order = []
    for position in drawn.tolist():
        repeat = seen.get(position, 0)
        seen[position] = repeat + 1
        order.append(position + repeat * len(labels))
    return order


def class_weights(config: TrainingConfig, labels: IntArray) -> torch.Tensor | None:
    """``balanced``: n / (k x n_c) over the training labels; ``none``: None; else as given."""
    if config.class_weights == "none":
        return None
    if config.class_weights == "balanced":
        counts = np.bincount(labels, minlength=config.num_classes).astype(np.float64)
        weights = len(labels) / (config.num_classes * np.maximum(counts, 1.0))
        return torch.tensor(weights, dtype=torch.float32)
    return torch.tensor(config.class_weights, dtype=torch.float32)


# ----------------------------------------------------------------------------- one fold


def _make_trainer(prepared: Prepared, train_idx: IntArray) -> Trainer:
    config = prepared.config
    model = place(new_model(config), prepared.device)  # channels-last on the CPU: faster
    optimizer = make_optimizer(model, config)
    batches = len(train_idx) // config.batch_size if len(train_idx) > config.batch_size else 1
    steps = min(batches, config.max_steps_per_epoch or batches)
    scheduler = make_scheduler(optimizer, config, steps)
    weights = class_weights(config, prepared.images.labels[train_idx])
    loss = make_loss(
        None if weights is None else weights.to(prepared.device),
        config.label_smoothing,
        config.smoothing_weights,
    )
    supervision = None
    if config.mask_supervision is not None:
        supervision = CamSupervision(
            model,
            config.cam_target_layer,
            config.gradcam_method,
            config.mask_supervision.sharpness,
            config.mask_supervision.weight,
        )
    return Trainer(model, optimizer, scheduler, loss, steps, supervision)


def train_fold(prepared: Prepared, fold: int | None, *, resume: bool) -> FoldResult:
    """Train (or resume, or skip when finished) one fold and return its best weights."""
    config = prepared.config
    _seed_everything(config.seed + (fold or 0))
    train_idx, valid_idx = fold_indices(prepared, fold)
    trainer = _make_trainer(prepared, train_idx)
    directory = fold_dir(config, fold)
    folds = folds_record(prepared)
    with fold_lock(directory):
        state, midway = LoopState(), None
        if resume:
            state, midway = restore(directory, trainer, prepared.device, folds, config.batch_size)
        if resume and state.epoch:
            # A recipe resumed with more epochs or patience goes on from where it stopped.
            state.finished = _stops(state, config)
        if not resume:
            forget(directory)
        train_set = fold_dataset(prepared, train_idx, augment=True)
        valid_set = fold_dataset(prepared, valid_idx, augment=False)
        _log_fold_start(fold, train_idx, valid_idx, state)
        saver = midway_saver(config, directory, folds)
        with _progress() as progress, trainer.supervision or nullcontext():
            while not state.finished:
                epoch = _Epoch(state, progress, saver, midway)
                improved = _run_epoch(prepared, trainer, train_set, valid_set, epoch)
                save_epoch(directory, trainer, state, best=improved, folds=folds)
                saver.restart_clock()
                midway = None
    return _result_from_checkpoint(prepared, fold)


def _log_fold_start(
    fold: int | None, train_idx: IntArray, valid_idx: IntArray, state: LoopState
) -> None:
    logger.info(
        "fold %s: %d training, %d validation images; starting at epoch %d",
        "none" if fold is None else fold,
        len(train_idx),
        len(valid_idx),
        state.epoch + 1,
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )


def _batches(
    dataset: Dataset[Any],
    batch_size: int,
    order: list[int],
    steps: tuple[int, int],
    workers: int,
) -> Iterator[list[torch.Tensor]]:
    """Batches ``steps[0]`` to ``steps[1]`` (exclusive) of an epoch of ``order``.

    The loader starts here, not at the first batch: it draws its seed from torch's
    generator now, so that a resumed epoch can put the generator back after it.
    """
    skip, limit = steps
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order[skip * batch_size :],
        num_workers=workers,
        pin_memory=workers > 0 and torch.cuda.is_available(),
        drop_last=len(order) > batch_size,
    )
    return itertools.islice(iter(loader), max(limit - skip, 0))


@dataclass(frozen=True, eq=False)
class _Epoch:
    """An epoch's loop state, progress display, within-epoch checkpoints, and where it
    resumes (None: at its start)."""

    state: LoopState
    progress: Progress
    saver: MidwaySaver
    midway: Midway | None

    @property
    def first_step(self) -> int:
        return 0 if self.midway is None else self.midway.step


def _run_epoch(
    prepared: Prepared,
    trainer: Trainer,
    train_set: ImageDataset,
    valid_set: ImageDataset,
    epoch: _Epoch,
) -> bool:
    """One epoch of training then validation; True when it is the best so far."""
    config, state, progress = prepared.config, epoch.state, epoch.progress
    train_set.set_epoch(state.epoch)
    order = epoch_order(config, train_set.labels[list(train_set.indices)], state.epoch)
    task = progress.add_task(
        f"epoch {state.epoch + 1}/{config.epochs}",
        total=trainer.steps_per_epoch,
        completed=epoch.first_step,
        status="",
    )
    started = datetime.datetime.now(datetime.UTC)
    record: dict[str, Any] = {
        "epoch": state.epoch + 1,
        **_train_steps(prepared, trainer, train_set, order, epoch, task),
    }
    if len(valid_set):
        logits, labels = predict_logits(
            trainer.model,
            valid_set,
            prepared.device,
            loader_workers(config, prepared.device),
            test_time_flip=config.test_time_flip,
        )
        figures = classification_metrics(labels, softmax(logits))
        record.update(
            {k: figures[k] for k in ("balanced_accuracy", "quadratic_weighted_kappa", "accuracy")}
        )
        record["recall"] = figures["per_class"]["recall"]
    record["seconds"] = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    improved = _advance_state(state, record, config)
    progress.update(task, status=_status_text(record))
    logger.info("epoch %s", json.dumps(record))
    return improved


def _status_text(record: dict[str, Any]) -> str:
    text = f"loss {record['train_loss']:.4f}"
    if "balanced_accuracy" in record:
        text += f" val bacc {record['balanced_accuracy']:.3f}"
        text += f" qwk {record['quadratic_weighted_kappa']:.3f}"
    return text


def _train_steps(
    prepared: Prepared,
    trainer: Trainer,
    dataset: ImageDataset,
    order: list[int],
    epoch: _Epoch,
    task: Any,
) -> dict[str, float]:
    """One epoch's steps (from where it stopped, when resumed within it); the mean loss (and,
    with mask supervision, its term and hit share)."""
    model, device, progress = trainer.model, prepared.device, epoch.progress
    model.train()
    if prepared.config.mode == "feature" or prepared.config.freeze_batchnorm:
        _freeze_batchnorm(model)
    tally = _Tally() if epoch.midway is None else _Tally.from_sums(epoch.midway.sums)
    log = _StepLog(
        next(t.description for t in progress.tasks if t.id == task),
        trainer.steps_per_epoch,
        prepared.config.batch_size,
        enabled=not progress.console.is_terminal,
        first=epoch.first_step,
    )
    workers = loader_workers(prepared.config, device)
    source: Dataset[Any] = dataset if trainer.supervision is None else MaskedView(dataset)
    batches = _batches(
        source,
        prepared.config.batch_size,
        order,
        (epoch.first_step, trainer.steps_per_epoch),
        workers,
    )
    if epoch.midway is not None:
        epoch.midway.restore_rng()  # as it was after the step saved, the loader's seed drawn
    for batch in batches:
        trainer.optimizer.zero_grad(set_to_none=True)
        inputs = batch[0].to(device, non_blocking=True)
        labels = batch[1].to(device, non_blocking=True)
        with training_autocast(prepared.config, device):
            outputs = model(inputs)
            loss = trainer.loss(outputs, labels)
            if trainer.supervision is not None:
                term = trainer.supervision.loss(outputs, labels, batch[2].to(device))
                loss = loss + trainer.supervision.weight * term.loss
                tally.add_mask(term)
        loss.backward()  # type: ignore[no-untyped-call]
        trainer.optimizer.step()
        trainer.scheduler.step()
        tally.add_loss(float(loss.item()))
        progress.update(task, advance=1, status=tally.status())
        log.step(tally.steps, tally.status())
        epoch.saver.after_step(trainer, epoch.state, tally.steps, tally.sums())
    return tally.figures()


@dataclass(eq=False)
class _StepLog:
    """The progress bar as log lines, for runs whose output is not a terminal."""

    description: str
    steps: int
    batch_size: int
    enabled: bool
    first: int = 0
    """The steps done before this process (a resumed epoch)."""
    logged: float = field(default_factory=time.monotonic)
    last: int = field(init=False)
    """The step of the last line (or :attr:`first`): the pace is the steps since then over
    the time since then, so a run paused a while (a machine shared with a test run) is
    timed at its pace again by the next line, not by the mean since the epoch began."""

    def __post_init__(self) -> None:
        self.last = self.first

    def step(self, done: int, status: str) -> None:
        """Log step ``done`` when ``PROGRESS_LOG_SECONDS`` have passed since the last line."""
        now = time.monotonic()
        if not self.enabled or now - self.logged < PROGRESS_LOG_SECONDS or done >= self.steps:
            return
        per_step = (now - self.logged) / max(done - self.last, 1)
        self.logged, self.last = now, done
        logger.info(
            "%s: step %d/%d, %s, %.3f s per image, about %.0f min to the epoch's validation",
            self.description,
            done,
            self.steps,
            status,
            per_step / self.batch_size,
            per_step * (self.steps - done) / 60.0,
        )


@dataclass(eq=False)
class _Tally:
    """Running sums of one epoch's training figures."""

    loss: float = 0.0
    steps: int = 0
    mask_loss: float = 0.0
    mask_steps: int = 0
    masked: int = 0
    hits: int = 0

    @classmethod
    def from_sums(cls, sums: dict[str, float]) -> _Tally:
        """The sums of :meth:`sums`, saved within an epoch."""
        tally = cls()
        for name, value in sums.items():
            kind = type(getattr(tally, name))
            setattr(tally, name, kind(value))
        return tally

    def sums(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.__dict__.items()}

    def add_loss(self, value: float) -> None:
        self.loss, self.steps = self.loss + value, self.steps + 1

    def add_mask(self, term: MaskLoss) -> None:
        if term.images:
            self.mask_loss += float(term.loss.item())
            self.mask_steps += 1
            self.masked, self.hits = self.masked + term.images, self.hits + term.hits

    def status(self) -> str:
        text = f"loss {self.loss / max(self.steps, 1):.4f}"
        if self.masked:
            text += f" peak in mask {self.hits / self.masked:.2f}"
        return text

    def figures(self) -> dict[str, float]:
        figures = {"train_loss": self.loss / max(self.steps, 1)}
        if self.masked:
            figures["train_mask_loss"] = self.mask_loss / self.mask_steps
            figures["train_peak_in_mask"] = self.hits / self.masked
        return figures


def _freeze_batchnorm(model: nn.Module) -> None:
    _, head = classifier_head(model)
    head_modules = set(head.modules())
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module not in head_modules:
            module.eval()


def training_autocast(config: TrainingConfig, device: torch.device) -> torch.autocast:
    """The recipe's ``precision`` for the training steps: bfloat16 autocast or full precision.

    ``auto`` is bfloat16 on CUDA and float32 on the CPU; ``bfloat16`` on a CPU
    with native bfloat16 (AVX512-BF16, AMX) trains about twice as fast.
    Validation and inference always run in float32.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bfloat16(config, device))


def uses_bfloat16(config: TrainingConfig, device: torch.device) -> bool:
    """Whether the training steps of ``config`` run under bfloat16 autocast on ``device``."""
    return config.precision == "bfloat16" or (config.precision == "auto" and device.type == "cuda")


IMPROVEMENT = 1e-9
"""How much a validation score must beat the best one by to count as better: more than float
rounding (one confusion matrix gives 0.5075 or 0.5075000000000001, summed in another order)."""


def _advance_state(state: LoopState, record: dict[str, Any], config: TrainingConfig) -> bool:
    """Count the epoch, track the best score and decide early stopping; True when improved."""
    state.history.append(record)
    state.epoch += 1
    score = record.get("balanced_accuracy")
    if score is None or score > state.best_score + IMPROVEMENT:
        state.best_score = -math.inf if score is None else float(score)
        state.best_epoch = state.epoch
        state.stale_epochs = 0
        record["best"] = True
    else:
        state.stale_epochs += 1
    state.finished = _stops(state, config)
    return bool(record.get("best", False))


def _stops(state: LoopState, config: TrainingConfig) -> bool:
    """The recipe's end: its last epoch, or ``patience`` epochs without improvement."""
    stale = config.keep == "best" and state.stale_epochs >= config.patience
    return state.epoch >= config.epochs or stale


def predict_logits(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device,
    workers: int = 0,
    *,
    test_time_flip: bool = False,
) -> tuple[Float64Array, IntArray]:
    """Logits (float64) and labels of every item of ``dataset``, in order.

    With ``test_time_flip`` each logit is the mean of the image's and its mirror's.
    """
    model = scorer(model, test_time_flip)
    model.eval()
    order = list(range(len(dataset)))
    outputs, labels = [], []
    with torch.inference_mode():
        loader = DataLoader(dataset, batch_size=EVAL_BATCH, sampler=order, num_workers=workers)
        for inputs, targets in loader:
            outputs.append(model(inputs.to(device)).float().cpu())
            labels.append(targets)
    logits: Float64Array = torch.cat(outputs).double().numpy()
    return logits, torch.cat(labels).numpy().astype(np.int64)


def _result_from_checkpoint(prepared: Prepared, fold: int | None) -> FoldResult:
    """The kept weights of ``fold`` (best or last) with their validation logits, afresh."""
    directory = fold_dir(prepared.config, fold)
    best, last = directory / BEST_FILE, directory / LAST_FILE
    if not best.is_file() or not last.is_file():
        raise TrainingError(f"no finished epoch in {directory}: nothing to export")
    kept = last if prepared.config.keep == "last" else best
    state = torch.load(kept, map_location="cpu", weights_only=False)["model"]
    payload = torch.load(last, map_location="cpu", weights_only=False)
    if FOLDS_KEY in payload:  # figures of other images than the checkpoint's would be wrong
        check_same_folds(payload[FOLDS_KEY], folds_record(prepared), last)
    loop = LoopState(**payload["loop"])
    _, valid_idx = fold_indices(prepared, fold)
    if not len(valid_idx):
        return FoldResult(fold, state, None, None, loop, _kept_epoch(prepared.config, loop))
    model = build_model(
        prepared.config.architecture.name,
        prepared.config.input.channels,
        prepared.config.num_classes,
        prepared.config.architecture.params,
    )
    model.load_state_dict(state)
    logits, labels = predict_logits(
        place(model, prepared.device),
        fold_dataset(prepared, valid_idx, augment=False),
        prepared.device,
        loader_workers(prepared.config, prepared.device),
        test_time_flip=prepared.config.test_time_flip,
    )
    return FoldResult(fold, state, logits, labels, loop, _kept_epoch(prepared.config, loop))


def _kept_epoch(config: TrainingConfig, loop: LoopState) -> int:
    return loop.epoch if config.keep == "last" else loop.best_epoch
