"""Train the knee-joint localiser on synthetic radiographs built from real joint crops.

No whole knee radiographs with joint boxes are available to the project, only
joint-centred crops (``../shared/data/knee-kl224-train``: 224 x 224, folder =
KL grade, file ``<patient><L|R>.webp``). :func:`compose` turns them into
whole-film-like pictures whose joint centres and box sides are known:

* a canvas of random aspect ratio and size: portrait for one knee, landscape
  for two (AP standing bilateral), sometimes none (a leg shaft or just film);
* each crop scaled to a random side and placed (two side by side with a gap,
  the patient's right on the viewer's left, one R and one L file of the same
  or of different patients) and, most of the time, **extended into a leg**:
  the mean of its top rows is replicated upward into a femur and the mean of
  its bottom rows downward into a tibia, each tapering with distance, inside
  a soft-tissue cylinder (thigh wider than the knee) whose edges the crop's
  sides are blended into; otherwise pasted bare;
* distractors: marker blocks with "R"/"L"/text, bright or black collimation
  borders;
* photometry: background level and gradient, exposure, gamma, blur, noise.

Targets (CenterNet): a Gaussian at each crop centre on the stride-4 grid
(``sigma = max(1, side / 12)`` cells, the nearest cell set to 1), and
``log(side / input size)`` of the pasted crop around each centre. Loss: the
penalty-reduced focal loss on the heatmap plus the heat-weighted L1 of the
log side. Patients for whom :func:`is_holdout` holds are never used, so tests
can compose images from crops the localiser has not seen.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from dicomnode.errors import TrainingError
from dicomnode.imaging.tensor import to_input
from dicomnode.models.localise import (
    DEFAULT_HEAD,
    DEFAULT_WIDTHS,
    INPUT_SIZE,
    STRIDE,
    LocaliserNet,
    localiser_input,
    save_localiser,
)
from dicomnode.training.data import IMAGE_SUFFIXES, read_labelled
from dicomnode.values import FloatArray

logger = logging.getLogger(__name__)

BANK_SIDE = 128
"""Crops are kept at this side; most joints are smaller in the 256-pixel input."""
HOLDOUT_MODULUS = 10
Rng = np.random.Generator
Array = npt.NDArray[np.floating[Any]]


def is_holdout(patient: str) -> bool:
    """Whether ``patient``'s crops are kept out of localiser training (about 1 in 10)."""
    digest = hashlib.sha256(patient.encode()).digest()
    return digest[0] % HOLDOUT_MODULUS == 0


@dataclass(frozen=True, eq=False)
class CropBank:
    """Joint crops (uint8, ``BANK_SIDE`` square) with their patient and side.

    Attributes
    ----------
    crops:
        (N, BANK_SIDE, BANK_SIDE) ``uint8``.
    patients, sides:
        Per crop: the patient id and ``"L"`` or ``"R"``.
    mates:
        Per crop: the index of the same patient's other knee, or -1.
    """

    crops: npt.NDArray[np.uint8]
    patients: tuple[str, ...]
    sides: tuple[str, ...]
    mates: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.patients)

    def pixels(self, index: int) -> FloatArray:
        """Crop ``index`` as ``float32`` in [0, 1]."""
        result: FloatArray = self.crops[index].astype(np.float32) / np.float32(255.0)
        return result

    def of_side(self, side: str) -> npt.NDArray[np.int64]:
        """Indices of the crops of one side."""
        return np.flatnonzero(np.asarray(self.sides) == side)


def crop_files(data_dir: Path, *, holdout: bool = False) -> list[Path]:
    """``<data_dir>/<class>/<patient><L|R>.<ext>``, training (or only held-out) patients."""
    if not data_dir.is_dir():
        raise TrainingError(f"localiser data {data_dir} is not a directory")
    files = sorted(
        p
        for p in data_dir.glob("*/*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.stem[-1:] in ("L", "R")
    )
    chosen = [p for p in files if p.suffix and is_holdout(p.stem[:-1]) == holdout]
    if not chosen:
        raise TrainingError(f"no <patient><L|R> crops under {data_dir}")
    return chosen


def load_bank(files: Sequence[Path], side: int = BANK_SIDE) -> CropBank:
    """Decode ``files`` once, each resized to ``side`` square."""
    crops = np.empty((len(files), side, side), dtype=np.uint8)
    for index, path in enumerate(files):
        crops[index] = np.rint(_resized(read_labelled(path).pixels, side) * 255.0)
    patients = tuple(p.stem[:-1] for p in files)
    sides = tuple(p.stem[-1] for p in files)
    where = {key: i for i, key in enumerate(zip(patients, sides, strict=True))}
    mates = tuple(
        where.get((patient, "L" if knee == "R" else "R"), -1)
        for patient, knee in zip(patients, sides, strict=True)
    )
    return CropBank(crops, patients, sides, mates)


def _resized(pixels: FloatArray, side: int) -> FloatArray:
    """``pixels`` stretched to ``side`` square, the way :func:`to_input` resizes."""
    tensor, _ = to_input(pixels, (side, side), 1, (0.0,), (1.0,), "stretch")
    result: FloatArray = np.clip(tensor[0].numpy(), 0.0, 1.0)
    return result


# --- synthetic radiographs ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Composite:
    """A synthetic radiograph and its joints.

    Attributes
    ----------
    pixels:
        (rows, columns) ``float32`` in [0, 1], bone bright.
    centres:
        (x, y) of each joint, continuous source coordinates, left to right.
    sides:
        The side of each pasted crop, in source pixels.
    """

    pixels: FloatArray
    centres: tuple[tuple[float, float], ...]
    sides: tuple[float, ...]


@dataclass(frozen=True)
class _Paste:
    """Crop ``index`` of the bank, scaled to ``side`` and pasted with its corner at (left, top)."""

    index: int
    left: int
    top: int
    side: int

    @classmethod
    def centred(cls, index: int, x: float, y: float, side: int) -> _Paste:
        return cls(index, round(x - side / 2), round(y - side / 2), side)

    @property
    def centre(self) -> tuple[float, float]:
        return self.left + self.side / 2, self.top + self.side / 2


def compose(bank: CropBank, rng: Rng, *, joints: int | None = None) -> Composite:
    """One synthetic knee radiograph with 0, 1 or 2 joints (random when ``joints`` is None)."""
    count = int(rng.choice(3, p=(0.06, 0.44, 0.5))) if joints is None else joints
    rows, columns = _canvas_shape(count, rng)
    canvas = _background(rows, columns, rng)
    pastes = _place(bank, count, rows, columns, rng)
    bare = rng.random() < 0.2
    for paste in pastes:
        crop = _resized(bank.pixels(paste.index), paste.side)
        if bare:
            _paste_bare(canvas, crop, paste, rng)
        else:
            _draw_leg(canvas, crop, paste, rng)
    if count == 0 and rng.random() < 0.7:
        _draw_shafts(canvas, bank, rng)
    _distract(canvas, rng)
    pixels = _photometry(canvas, rng)
    return Composite(
        pixels=pixels,
        centres=tuple(p.centre for p in pastes),
        sides=tuple(float(p.side) for p in pastes),
    )


def _canvas_shape(count: int, rng: Rng) -> tuple[int, int]:
    """(rows, columns): landscape for two knees, mostly portrait for one."""
    if count == 2:
        aspect = rng.uniform(0.95, 1.7)
    elif count == 1:
        aspect = rng.uniform(0.5, 1.05) if rng.random() < 0.8 else rng.uniform(1.0, 1.5)
    else:
        aspect = rng.uniform(0.5, 1.6)
    longest = int(rng.integers(256, 449))
    if aspect >= 1:
        return max(64, round(longest / aspect)), longest
    return longest, max(64, round(longest * aspect))


def _background(rows: int, columns: int, rng: Rng) -> FloatArray:
    level = rng.uniform(0.0, 0.2)
    slope = rng.uniform(-0.08, 0.08, size=2)
    ys, xs = np.mgrid[0:rows, 0:columns].astype(np.float32)
    result: FloatArray = (level + slope[0] * ys / rows + slope[1] * xs / columns).astype(np.float32)
    return np.clip(result, 0.0, 1.0)


def _place(bank: CropBank, count: int, rows: int, columns: int, rng: Rng) -> list[_Paste]:
    if count == 0:
        return []
    if count == 1:
        side = round(rng.uniform(0.25, 0.85) * min(rows, columns))
        x = rng.uniform(side / 2, columns - side / 2)
        y = rng.uniform(side / 2, rows - side / 2)
        return [_Paste.centred(int(rng.integers(len(bank))), x, y, side)]
    return _place_pair(bank, rows, columns, rng)


def _place_pair(bank: CropBank, rows: int, columns: int, rng: Rng) -> list[_Paste]:
    """Two crops side by side: an R file on the viewer's left, an L file on the right."""
    side = rng.uniform(0.15, 0.33) * columns
    gap = rng.uniform(0.05, 1.2) * side
    scale = min(1.0, 0.96 * columns / (2 * side + gap), 0.9 * rows / side)
    side, gap = side * scale, gap * scale
    spare = max(0.0, columns - 2 * side - gap - 0.04 * columns)
    left = 0.02 * columns + rng.uniform(0.0, spare)
    y = rng.uniform(side / 2 + 0.05 * rows, rows - side / 2 - 0.05 * rows)
    right_index, left_index = _pair_indices(bank, rng)
    pastes = []
    for k, index in enumerate((right_index, left_index)):
        own = round(side * rng.uniform(0.92, 1.08))
        x = left + side / 2 + k * (side + gap)
        own_y = float(np.clip(y + rng.uniform(-0.08, 0.08) * side, own / 2, rows - own / 2))
        own_x = float(np.clip(x, own / 2, columns - own / 2))
        pastes.append(_Paste.centred(index, own_x, own_y, own))
    return pastes


def _pair_indices(bank: CropBank, rng: Rng) -> tuple[int, int]:
    """An R and an L crop: of one patient half the time (when there is one), else of two."""
    right = int(rng.choice(bank.of_side("R")))
    mate = bank.mates[right]
    if mate >= 0 and rng.random() < 0.5:
        return right, mate
    return right, int(rng.choice(bank.of_side("L")))


def _paste_bare(canvas: FloatArray, crop: FloatArray, paste: _Paste, rng: Rng) -> None:
    """Paste ``crop`` with no leg around it, its edges feathered over 0 to 3 pixels."""
    top, left = paste.top, paste.left
    feather = int(rng.integers(0, 4))
    alpha = np.ones_like(crop)
    if feather:
        ramp = np.minimum(np.arange(paste.side) + 1, np.arange(paste.side)[::-1] + 1) / feather
        alpha = np.minimum(1.0, np.minimum(ramp[:, None], ramp[None, :])).astype(np.float32)
    window = canvas[top : top + paste.side, left : left + paste.side]
    window[...] = alpha * crop + (1 - alpha) * window


def _draw_leg(canvas: FloatArray, crop: FloatArray, paste: _Paste, rng: Rng) -> None:
    """Draw a leg through the joint crop: femur above, tibia below, soft tissue around."""
    side = paste.side
    rows, columns = canvas.shape
    top, left = paste.top, paste.left
    band = math.ceil(side * 1.35)
    x0, x1 = max(0, left + side // 2 - band), min(columns, left + side // 2 + band)
    ys = np.arange(rows, dtype=np.float32)[:, None]
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - (left + side / 2 - 0.5)
    half = _tissue_half_width(ys, top, side, rng)
    tissue = _tissue_level(crop, rng) * np.sqrt(np.clip(1 - (dx / half) ** 2, 0.0, 1.0))
    bone, bone_half = _bone(crop, ys, dx, top, rng)
    weight = np.clip((bone_half - np.abs(dx)) / max(2.0, 0.08 * side), 0.0, 1.0)
    weight = weight * weight * (3 - 2 * weight)
    leg = np.where(np.isnan(bone), tissue, weight * np.nan_to_num(bone) + (1 - weight) * tissue)
    alpha = np.clip(half - np.abs(dx), 0.0, 1.0)
    window = canvas[:, x0:x1]
    window[...] = np.maximum(window, alpha * leg)


def _tissue_half_width(ys: Array, top: int, side: int, rng: Rng) -> Array:
    """Half-width of the soft-tissue cylinder per row: wider up the thigh, a calf below."""
    knee = side * rng.uniform(0.55, 0.8)
    thigh, calf = rng.uniform(0.0, 0.5), rng.uniform(-0.1, 0.25)
    above = np.clip((top - ys) / side, 0.0, 2.0) / 2
    below = np.clip((ys - top - side) / side, 0.0, 2.0) / 2
    result: FloatArray = (knee * (1 + thigh * above + calf * below)).astype(np.float32)
    return result


def _tissue_level(crop: FloatArray, rng: Rng) -> float:
    """Soft-tissue brightness: a little below the darker side strip of the crop."""
    strip = max(2, crop.shape[1] // 16)
    sides = min(float(crop[:, :strip].mean()), float(crop[:, -strip:].mean()))
    return float(np.clip(sides * rng.uniform(0.6, 1.0), 0.08, 0.7))


def _bone(crop: FloatArray, ys: Array, dx: Array, top: int, rng: Rng) -> tuple[Array, Array]:
    """Per row of the band: the crop's row, or above / below it the mean of the crop's top /
    bottom rows, narrowed with distance (femur and tibia shafts) and drifting in brightness.

    Returns the bone brightness (NaN outside the bone) and its half-width per row.
    """
    side = crop.shape[0]
    count = max(2, side // 16)
    up = np.clip(top - ys[:, 0], 0.0, None)
    down = np.clip(ys[:, 0] - (top + side - 1), 0.0, None)
    factor = np.ones_like(up)
    factor -= rng.uniform(0.15, 0.45) * np.minimum(1.0, up / (0.7 * side))
    factor -= rng.uniform(0.1, 0.4) * np.minimum(1.0, down / (0.7 * side))
    on_crop = np.clip(ys[:, 0].astype(np.int64) - top, 0, side - 1)
    profile = crop[on_crop]
    profile[up > 0] = crop[:count].mean(0)
    profile[down > 0] = crop[-count:].mean(0)
    drift = np.where((up > 0) | (down > 0), _drift(len(up), rng), 1.0)
    bone = _sample_rows(profile, dx / factor[:, None] + side / 2 - 0.5) * drift[:, None]
    result: FloatArray = bone.astype(np.float32)
    half: FloatArray = (factor * side / 2).astype(np.float32)[:, None]
    return result, half


def _sample_rows(profile: Array, index: Array) -> Array:
    """Linear interpolation of row r of ``profile`` at ``index[r]`` (NaN outside the row)."""
    side = profile.shape[1]
    low = np.clip(np.floor(index), 0, side - 1).astype(np.int64)
    high = np.minimum(low + 1, side - 1)
    frac = np.clip(index - low, 0.0, 1.0)
    values = np.take_along_axis(profile, low, 1) * (1 - frac)
    values += np.take_along_axis(profile, high, 1) * frac
    result: FloatArray = np.where((index >= 0) & (index <= side - 1), values, np.nan)
    return result


def _drift(length: int, rng: Rng) -> FloatArray:
    """A slow multiplicative brightness drift along the shafts (about +-6 %)."""
    noise = gaussian_filter(rng.normal(0.0, 1.0, length), sigma=max(2.0, length / 12))
    scale = float(np.abs(noise).max()) or 1.0
    result: FloatArray = (1 + rng.uniform(0.0, 0.06) * noise / scale).astype(np.float32)
    return result


def _draw_shafts(canvas: FloatArray, bank: CropBank, rng: Rng) -> None:
    """One or two legs whose joints lie off the film: only femur or tibia shafts show."""
    rows, columns = canvas.shape
    for _ in range(int(rng.integers(1, 3))):
        side = round(rng.uniform(0.15, 0.4) * columns)
        y = -side if rng.random() < 0.5 else rows + side
        paste = _Paste.centred(int(rng.integers(len(bank))), rng.uniform(0, columns), y, side)
        _draw_leg(canvas, _resized(bank.pixels(paste.index), side), paste, rng)


def _distract(canvas: FloatArray, rng: Rng) -> None:
    """Marker blocks ("R", "L", text) and collimation borders."""
    for _ in range(int(rng.integers(0, 3))):
        _marker(canvas, rng)
    if rng.random() < 0.5:
        _collimate(canvas, rng)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _marker(canvas: FloatArray, rng: Rng) -> None:
    """A lead-marker-like block: a letter or short text, bright on dark or dark on bright."""
    rows, columns = canvas.shape
    size = max(8, round(rng.uniform(0.03, 0.09) * min(rows, columns)))
    text = str(rng.choice(["R", "L", "R", "L", "AP", "PA", "STANDING", "WB"]))
    font = _font(size)
    left, top, right, bottom = font.getbbox(text)
    width, height = int(right - left) + size // 2, int(bottom - top) + size // 2
    if width >= columns or height >= rows:
        return
    ink, paper = (255, 0) if rng.random() < 0.5 else (0, 255)
    block = Image.new("L", (width, height), paper if rng.random() < 0.7 else 0)
    ImageDraw.Draw(block).text((size // 4 - left, size // 4 - top), text, fill=ink, font=font)
    y, x = int(rng.integers(0, rows - height)), int(rng.integers(0, columns - width))
    values = np.asarray(block, dtype=np.float32) / 255.0
    window = canvas[y : y + height, x : x + width]
    window[...] = np.where(values > 0, values * rng.uniform(0.7, 1.0), window)


def _collimate(canvas: FloatArray, rng: Rng) -> None:
    """Bright (unexposed) or black (shuttered) bands along some edges of the film."""
    rows, columns = canvas.shape
    value = rng.uniform(0.8, 1.0) if rng.random() < 0.6 else rng.uniform(0.0, 0.05)
    for edge in range(4):
        if rng.random() < 0.5:
            continue
        length = rows if edge < 2 else columns
        depth = int(rng.uniform(0.01, 0.12) * length)
        if edge == 0:
            canvas[:depth] = value
        elif edge == 1:
            canvas[rows - depth :] = value
        elif edge == 2:
            canvas[:, :depth] = value
        else:
            canvas[:, columns - depth :] = value


def _photometry(canvas: FloatArray, rng: Rng) -> FloatArray:
    """Blur, exposure, gamma and noise, clipped to [0, 1]."""
    pixels: Array = canvas
    if rng.random() < 0.3:
        pixels = gaussian_filter(pixels, sigma=rng.uniform(0.5, 1.5))
    pixels = pixels * rng.uniform(0.75, 1.25) + rng.uniform(-0.08, 0.08)
    pixels = np.clip(pixels, 0.0, 1.0) ** rng.uniform(0.65, 1.5)
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 0.04), pixels.shape)
    result: FloatArray = np.clip(pixels, 0.0, 1.0).astype(np.float32)
    return result


# --- targets, loss and the loop ----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sample:
    """One training input and its targets on the stride-4 grid.

    Attributes
    ----------
    input:
        (1, 256, 256) localiser input (:func:`~dicomnode.models.localise.localiser_input`).
    heat:
        (64, 64) Gaussian centre targets, exactly 1 at each joint's nearest cell.
    log_side:
        (64, 64) ``log(side / input size)`` of the joint that dominates each cell.
    weight:
        (64, 64) weight of the side loss (the Gaussian of that joint).
    """

    input: torch.Tensor
    heat: torch.Tensor
    log_side: torch.Tensor
    weight: torch.Tensor


def make_sample(composite: Composite) -> Sample:
    """The localiser input of ``composite`` and its targets, through the node's letterbox."""
    tensor, placement = localiser_input(composite.pixels)
    cells = INPUT_SIZE // STRIDE
    heat = np.zeros((cells, cells), dtype=np.float32)
    log_side = np.zeros_like(heat)
    grid_y, grid_x = np.mgrid[0:cells, 0:cells].astype(np.float32)
    for (x, y), side in zip(composite.centres, composite.sides, strict=True):
        in_x, in_y = placement.input_point(x, y)
        in_side = side / placement.scale
        u, v = in_x / STRIDE - 0.5, in_y / STRIDE - 0.5
        sigma = max(1.0, in_side / STRIDE / 12)
        gauss = np.exp(-((grid_x - u) ** 2 + (grid_y - v) ** 2) / (2 * sigma**2))
        row, column = int(np.clip(round(v), 0, cells - 1)), int(np.clip(round(u), 0, cells - 1))
        gauss[row, column] = 1.0
        log_side = np.where(gauss > heat, math.log(in_side / INPUT_SIZE), log_side)
        heat = np.maximum(heat, gauss)
    return Sample(
        tensor, torch.from_numpy(heat), torch.from_numpy(log_side), torch.from_numpy(heat.copy())
    )


def localiser_loss(
    logits: torch.Tensor,
    log_side: torch.Tensor,
    heat: torch.Tensor,
    side: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) and the weighted side L1.

    ``logits`` and ``log_side`` are (N, 1, h, w) network outputs; the targets (N, h, w).
    The focal loss is normalised by the number of joints in the batch (at least 1).
    """
    logits, log_side = logits[:, 0], log_side[:, 0]
    prob = torch.sigmoid(logits)
    positive = heat >= 1.0
    pos = -F.logsigmoid(logits) * (1 - prob) ** 2
    neg = -F.logsigmoid(-logits) * prob**2 * (1 - heat) ** 4
    joints = positive.sum().clamp(min=1)
    focal = (torch.where(positive, pos, neg)).sum() / joints
    size = (weight * (log_side - side).abs()).sum() / weight.sum().clamp(min=1e-6)
    return focal, size


def train_localiser(
    data_dir: Path,
    out_path: Path,
    *,
    steps: int,
    seed: int,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    head: int = DEFAULT_HEAD,
    max_crops: int | None = None,
    threads: int | None = None,
    log_every: int = 50,
) -> Path:
    """Train a :class:`~dicomnode.models.localise.LocaliserNet` on composites; save it.

    Parameters
    ----------
    data_dir:
        ``<data_dir>/<class>/<patient><L|R>.<ext>`` joint crops; held-out
        patients (:func:`is_holdout`) are left out.
    out_path:
        Where the safetensors file goes (its sha256 is logged; read it with
        :func:`~dicomnode.models.card.sha256_of`).
    steps, batch_size, learning_rate:
        AdamW steps of ``batch_size`` fresh composites each; linear warm-up
        over the first 5 % of steps, then cosine decay to zero.
    seed:
        Seeds the network, the crop choice and every composite.
    widths, head:
        The network's size.
    max_crops:
        Use at most this many crops (a seeded sample), for quick runs.
    threads:
        ``torch.set_num_threads`` for the run (restored afterwards).
    log_every:
        Log the mean losses every this many steps.

    Returns
    -------
    Path
        ``out_path``.
    """
    if steps < 1 or batch_size < 1:
        raise TrainingError("steps and batch_size must be at least 1")
    rng = np.random.default_rng(seed)
    files = crop_files(data_dir)
    if max_crops is not None and max_crops < len(files):
        files = [files[i] for i in sorted(rng.choice(len(files), max_crops, replace=False))]
    started = time.perf_counter()
    bank = load_bank(files)
    logger.info("localiser crops loaded", extra={"crops": len(bank)})
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = LocaliserNet(widths, head)
        _fit(network, bank, rng, steps, batch_size, learning_rate, log_every)
    finally:
        torch.set_num_threads(previous)
    network.eval()
    sha256 = save_localiser(network, out_path)
    logger.info(
        "localiser saved",
        extra={"path": str(out_path), "sha256": sha256, "seconds": time.perf_counter() - started},
    )
    return out_path


def _fit(
    network: LocaliserNet,
    bank: CropBank,
    rng: Rng,
    steps: int,
    batch_size: int,
    learning_rate: float,
    log_every: int,
) -> None:
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(steps))
    network.train()
    totals = np.zeros(2)
    for step in range(1, steps + 1):
        samples = [make_sample(compose(bank, rng)) for _ in range(batch_size)]
        logits, log_side = network(torch.stack([s.input for s in samples]))
        focal, size = localiser_loss(
            logits,
            log_side,
            torch.stack([s.heat for s in samples]),
            torch.stack([s.log_side for s in samples]),
            torch.stack([s.weight for s in samples]),
        )
        optimiser.zero_grad(set_to_none=True)
        (focal + size).backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        scheduler.step()
        totals += (focal.item(), size.item())
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            logger.info(
                "localiser step %d/%d: focal %.4f, side %.4f",
                step,
                steps,
                totals[0] / count,
                totals[1] / count,
            )
            totals[:] = 0


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return factor


def attach_localiser(
    model_dir: Path, weights: Path, *, threshold: float = 0.5, intended_use: str = ""
) -> Path:
    """Ship a trained localiser with a model: copy it beside the card and point the card at it.

    The card gets ``preprocessing.localiser: knee`` and a ``localiser`` block
    with the file's sha256; a non-empty ``intended_use`` replaces the card's
    (which must now say that whole radiographs are accepted). Returns the card's path.
    """
    from dicomnode.models.card import LocaliserSpec, load_card, sha256_of, write_card

    card = load_card(model_dir)
    target = model_dir / "localiser.safetensors"
    if weights.resolve() != target.resolve():
        shutil.copyfile(weights, target)
    target.chmod(0o644)
    spec = LocaliserSpec(file=target.name, sha256=sha256_of(target), threshold=threshold)
    preprocessing = card.preprocessing.model_copy(update={"localiser": "knee"})
    intended = intended_use.strip() or card.intended_use
    updated = card.model_copy(
        update={"preprocessing": preprocessing, "localiser": spec, "intended_use": intended}
    )
    path = write_card(model_dir, type(card).model_validate(updated.model_dump()))
    load_card(model_dir)  # the written card validates and its files match
    return path
