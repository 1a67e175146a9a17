"""A fold's checkpoints: what ``--resume`` continues from, at an epoch's end or within one.

A fold's folder (``<checkpoint_dir>/fold-<k>/``, or ``all-data/``) holds:

- ``last.pt``: after every epoch, the model, optimiser, schedule, loop state
  (:class:`~dicomnode.training.state.LoopState`), the random generators' states, and the
  images and folds it was trained on (:func:`folds_record`);
- ``best.pt``: the weights of the best epoch so far;
- ``partial.pt``: the epoch in progress, every ``checkpoint_minutes`` of it: the same as
  ``last.pt`` plus the steps done and their running sums (:class:`Midway`). An epoch of a
  large folder on a CPU takes hours; a run stopped in it (a machine shut down, a session
  ended) resumes at the step it had saved, not at the epoch's start. Removed once the
  epoch's ``last.pt`` is written;
- ``.lock``: held by the process training the fold (:func:`fold_lock`).

Resumed within an epoch, a seeded run goes on exactly as it would have: the epoch's image
order and augmentation are functions of the seed and epoch, and the generator state saved
after step *n* is restored once the data loader has drawn its own seed.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.errors import TrainingError
from dicomnode.training.config import SPLIT_KEYS, TrainingConfig
from dicomnode.training.state import LoopState, Prepared, Trainer

logger = logging.getLogger(__name__)

LAST_FILE = "last.pt"
BEST_FILE = "best.pt"
PARTIAL_FILE = "partial.pt"
LOCK_FILE = ".lock"
"""In a fold's checkpoint folder: held (``flock``) by the run training that fold."""

FOLDS_KEY = "folds"
"""The key of ``last.pt`` that holds :func:`folds_record` (absent from older checkpoints)."""


def fold_dir(config: TrainingConfig, fold: int | None) -> Path:
    """The checkpoint folder of ``fold`` (None: the run on every image)."""
    return config.checkpoints / ("all-data" if fold is None else f"fold-{fold}")


def has_checkpoint(directory: Path) -> bool:
    """Whether a run left something in ``directory`` to resume from (an epoch or part of one)."""
    return any((directory / name).is_file() for name in (LAST_FILE, PARTIAL_FILE))


def forget(directory: Path) -> None:
    """Remove a fold's checkpoints (a new run of the same recipe starts afresh)."""
    for stale in (LAST_FILE, BEST_FILE, PARTIAL_FILE):
        (directory / stale).unlink(missing_ok=True)


@contextmanager
def fold_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory`` (a fold's checkpoints) for this process while it trains there.

    Two runs on one fold's checkpoints (``--fold 4`` beside ``--fold final``, which resumes
    every fold first; the same command started twice) would overwrite each other's epochs;
    the second is refused instead, naming the first's process. The lock ends with the
    process, so a killed run leaves nothing to clean up.

    Raises
    ------
    TrainingError
        If another process holds it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_FILE).open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise TrainingError(
                f"{directory} is being trained by {holder}: wait for that run to end (a "
                "`--fold final` run resumes every fold, so start it after the folds' runs)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- images and folds


def folds_record(prepared: Prepared) -> dict[str, Any]:
    """The images and folds of a run: a sha256 of (relative path, fold) per image, sorted
    by path, with the image count and fold sizes to say what changed."""
    images = prepared.images
    rows = sorted(
        (path.relative_to(images.root).as_posix(), int(fold))
        for path, fold in zip(images.paths, prepared.assignment, strict=True)
    )
    digest = hashlib.sha256()
    for relative, fold in rows:
        digest.update(f"{relative}\0{fold}\n".encode())
    sizes = np.bincount(prepared.assignment, minlength=prepared.config.folds)
    return {"sha256": digest.hexdigest(), "images": len(rows), "fold_sizes": sizes.tolist()}


def check_same_folds(saved: Any, current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint trained on other images or folds; warn when it does not say.

    Raises
    ------
    TrainingError
        When ``saved`` (the checkpoint's :func:`folds_record`) differs from ``current``.
    """
    if not isinstance(saved, dict):
        logger.warning(
            "%s does not record its images and folds (written before checkpoints did): "
            "resuming without checking that they are this run's",
            path,
        )
        return
    if saved.get("sha256") == current["sha256"]:
        return
    raise TrainingError(
        f"{path} was trained on other images or folds than this run's: then "
        f"{_describe_folds(saved)}, now {_describe_folds(current)} (images added, removed or "
        f"renamed in data_dir, or {', '.join(SPLIT_KEYS[:-1])} or {SPLIT_KEYS[-1]} changed). "
        "Restore them to resume, or start a new run with a new model.version (and "
        "checkpoint_dir)"
    )


def _describe_folds(record: dict[str, Any]) -> str:
    sizes = "/".join(str(n) for n in record.get("fold_sizes", []))
    return f"{record.get('images', '?')} images in folds of {sizes or '?'}"


# ----------------------------------------------------------------------------- saving


@dataclass(frozen=True, eq=False)
class Midway:
    """Where a resumed epoch goes on: the steps done, their running sums (the epoch's mean
    loss counts them) and the random generators' states after the last of them."""

    step: int
    sums: dict[str, float]
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None = None

    def restore_rng(self) -> None:
        """Put the generators where they were after step :attr:`step`."""
        _restore_rng(self.rng, self.cuda_rng)


def _restore_rng(rng: torch.Tensor, cuda_rng: list[torch.Tensor] | None) -> None:
    torch.set_rng_state(rng.cpu())  # saved on the CPU; map_location may have moved it
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([saved.cpu() for saved in cuda_rng])


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, detached and on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _training_payload(
    trainer: Trainer, state: LoopState, folds: dict[str, Any] | None
) -> dict[str, Any]:
    payload = {
        "model": cpu_state(trainer.model),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "loop": state.__dict__,
        "rng": torch.get_rng_state(),
    }
    if folds is not None:
        payload[FOLDS_KEY] = folds
    if torch.cuda.is_available():  # dropout masks on the GPU draw from its own generator
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    return payload


def save_epoch(
    directory: Path,
    trainer: Trainer,
    state: LoopState,
    *,
    best: bool,
    folds: dict[str, Any] | None = None,
) -> None:
    """``best.pt`` when this epoch is the best so far, then ``last.pt`` (every epoch); the
    epoch's ``partial.pt`` is then of no more use.

    ``folds`` (:func:`folds_record`) is kept in ``last.pt`` for ``--resume`` to check.
    """
    if best:
        _atomic_save(
            {"model": cpu_state(trainer.model), "epoch": state.epoch}, directory / BEST_FILE
        )
    _atomic_save(_training_payload(trainer, state, folds), directory / LAST_FILE)
    (directory / PARTIAL_FILE).unlink(missing_ok=True)


def clock() -> float:
    """Seconds on a clock that only goes forward (what ``checkpoint_minutes`` counts)."""
    return time.monotonic()


@dataclass(eq=False)
class MidwaySaver:
    """Writes ``partial.pt`` after a step when ``every`` seconds have passed since the last
    checkpoint (None: never)."""

    directory: Path
    folds: dict[str, Any]
    batch_size: int
    every: float | None
    saved: float = field(default_factory=lambda: clock())

    def after_step(
        self, trainer: Trainer, state: LoopState, step: int, sums: dict[str, float]
    ) -> bool:
        """Save the epoch so far (``step`` steps done) if it is time; True when saved."""
        if self.every is None or clock() - self.saved < self.every:
            return False
        payload = _training_payload(trainer, state, self.folds)
        payload.update(
            step=step,
            sums=dict(sums),
            steps_per_epoch=trainer.steps_per_epoch,
            batch_size=self.batch_size,
        )
        _atomic_save(payload, self.directory / PARTIAL_FILE)
        self.saved = clock()
        return True

    def restart_clock(self) -> None:
        """Count from now: an epoch's checkpoint was written."""
        self.saved = clock()


def midway_saver(config: TrainingConfig, directory: Path, folds: dict[str, Any]) -> MidwaySaver:
    """The recipe's ``checkpoint_minutes`` for the fold in ``directory``."""
    minutes = config.checkpoint_minutes
    every = None if minutes is None else minutes * 60.0
    return MidwaySaver(directory, folds, config.batch_size, every)


# ----------------------------------------------------------------------------- resuming


def restore(
    directory: Path,
    trainer: Trainer,
    device: torch.device,
    folds: dict[str, Any],
    batch_size: int,
) -> tuple[LoopState, Midway | None]:
    """Load the latest checkpoint of ``directory`` into ``trainer``.

    That is ``partial.pt`` when it continues ``last.pt`` (the epoch after it, the same
    steps per epoch and batch size), else ``last.pt``; a fresh state when there is neither.
    The :class:`Midway` says where the epoch goes on (None: at its start).

    Raises
    ------
    TrainingError
        When the checkpoint was trained on other images or folds than ``folds``.
    """
    # Both files are first read lazily (their tensors mapped, not read), then the one
    # resumed from is read in full: the other's weights and optimiser state never are.
    last = _load(directory / LAST_FILE, folds)
    partial = _load(directory / PARTIAL_FILE, folds)
    chosen = LAST_FILE
    if partial is not None and _continues(partial, last, trainer, batch_size):
        chosen = PARTIAL_FILE
    elif last is None:
        logger.info("no checkpoint in %s: starting from epoch 1", directory)
        return LoopState(), None
    payload = _load(directory / chosen, folds, device)
    assert payload is not None  # it was there a moment ago: read above
    midway = _midway(payload) if chosen == PARTIAL_FILE else None
    recipe_lrs = [float(group["initial_lr"]) for group in trainer.optimizer.param_groups]
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.scheduler.load_state_dict(payload["scheduler"])
    follow_recipe_schedule(trainer.scheduler, recipe_lrs)
    _restore_rng(payload["rng"], payload.get("cuda_rng"))
    state = LoopState(**payload["loop"])
    if midway is None:
        logger.info(
            "resumed from %s after epoch %d; learning rates %s",
            directory / LAST_FILE,
            state.epoch,
            recipe_lrs,
        )
    else:
        logger.info(
            "resumed from %s within epoch %d, after step %d of %d; learning rates %s",
            directory / PARTIAL_FILE,
            state.epoch + 1,
            midway.step,
            trainer.steps_per_epoch,
            recipe_lrs,
        )
    return state, midway


def _load(
    path: Path, folds: dict[str, Any], device: torch.device | None = None
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None when there is none): read onto ``device``, or without
    ``device`` lazily (tensors memory-mapped on the CPU, read only when used)."""
    if not path.is_file():
        return None
    if device is None:
        payload: dict[str, Any] = torch.load(
            path, map_location="cpu", mmap=True, weights_only=False
        )
    else:
        payload = torch.load(path, map_location=device, weights_only=False)
    check_same_folds(payload.get(FOLDS_KEY), folds, path)
    return payload


def _continues(
    partial: dict[str, Any], last: dict[str, Any] | None, trainer: Trainer, batch_size: int
) -> bool:
    """Whether ``partial`` is the epoch after ``last``, cut into the same steps."""
    epochs_done = 0 if last is None else int(last["loop"]["epoch"])
    if int(partial["loop"]["epoch"]) != epochs_done:
        logger.warning("%s is of an earlier epoch than last.pt: not used", PARTIAL_FILE)
        return False
    same = (partial["steps_per_epoch"], partial["batch_size"]) == (
        trainer.steps_per_epoch,
        batch_size,
    )
    if not same:
        logger.warning(
            "%s was cut into %d steps of %d images, this recipe's epoch into %d of %d: the "
            "epoch starts again",
            PARTIAL_FILE,
            partial["steps_per_epoch"],
            partial["batch_size"],
            trainer.steps_per_epoch,
            batch_size,
        )
    return same


def _midway(payload: dict[str, Any]) -> Midway:
    return Midway(
        int(payload["step"]),
        {str(k): float(v) for k, v in payload["sums"].items()},
        payload["rng"],
        payload.get("cuda_rng"),
    )


def follow_recipe_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lrs: list[float]) -> None:
    """Continue with the recipe's current learning rates and epochs (they may have been changed).

    The scheduler's step count comes from the checkpoint; its base rates and
    the shape of the schedule come from the recipe being resumed.
    """
    scheduler.base_lrs = list(lrs)
    step = scheduler.last_epoch
    for group, lr, factor in zip(
        scheduler.optimizer.param_groups, lrs, scheduler.lr_lambdas, strict=True
    ):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # type: ignore[attr-defined]
