"""Find the knee joints on a whole knee radiograph.

A PACS sends whole knee radiographs, often both knees on one film (AP standing
bilateral); the knee model grades one joint-centred square crop. The localiser
finds each joint so that the node can crop, grade and report it separately::

    prepared pixels --to_input (letterbox, 256 x 256 grey)--> tensor
    tensor --LocaliserNet--> centre heatmap + box side, at stride 4
    maps --decode_joints--> at most 2 square boxes on the source pixels, R/L, confidence

The network is a small fully convolutional encoder-decoder (CenterNet-style):
a Gaussian peak at each joint centre and, at every cell, the side of the
joint's square box (as ``log(side / input size)``). It was trained on
synthetic composites of real joint crops (``dicomnode.training.localiser``),
and its box side keeps the crops' scale: the box is the field of view the
knee classifier was trained on.

Decoding
--------
* candidates are the local maxima (3 x 3) of the heatmap at or above
  ``threshold * CANDIDATE_FRACTION``; a candidate closer than
  ``NMS_DISTANCE`` box sides to a stronger one is suppressed;
* the two strongest candidates become joints, centred on the heat-weighted
  centroid of their 3 x 3 neighbourhood, each a square of the predicted side
  mapped back through the letterbox onto the source pixels;
* a joint is ``uncertain`` when its confidence (peak height) is below
  ``threshold`` (:data:`DEFAULT_THRESHOLD` unless the card says otherwise),
  when its square leaves the image, or when more than two candidates compete;
* with no candidate at all, no joint is returned: the image is not graded,
  and the node says that no knee joint was found (grading the centre of a
  film that shows no knee would give a grade to nothing).

Laterality
----------
On an AP/PA radiograph in the standard display orientation the patient's
right knee is on the viewer's left: Patient Orientation's row direction is
``L`` (or the header does not say, and the standard display is assumed). A film
whose rows run towards the patient's right (row direction ``R``: shown mirrored)
has the left knee on the viewer's left; a row direction with neither or both of
``L`` and ``R`` (a lateral view, a film turned by 90 degrees) names no side.
With two joints, the one on the viewer's left gets that side and the other the
opposite side; on a film whose header names one side (Image Laterality L or R) the
joint of the other side is flagged uncertain. With one joint, the image's own
laterality is used when it has one; otherwise the half of the image the joint sits
in decides, but only when the other half clearly holds no leg: its 90th-percentile
brightness is below ``NO_LEG_FRACTION`` of the mean brightness inside the joint's
box. Else ``None``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from dicomnode.errors import InferenceError, ModelError
from dicomnode.imaging.tensor import Placement, to_input
from dicomnode.models.architectures import place
from dicomnode.values import FloatArray, PreparedImage, Region

logger = logging.getLogger(__name__)

INPUT_SIZE = 256
"""Side of the square, letterboxed, grey model input."""
INPUT_MEAN = 0.5
INPUT_STD = 0.25
STRIDE = 4
"""Input pixels per heatmap cell."""
DEFAULT_WIDTHS = (12, 24, 48, 64, 96)
"""Channels at strides 2, 4, 8, 16 and 32."""
DEFAULT_HEAD = 24
"""Channels of the decoder and of both heads."""

DEFAULT_THRESHOLD = 0.5
"""Peak height below which a joint is flagged uncertain."""
CANDIDATE_FRACTION = 0.5
"""Peaks at or above ``threshold * CANDIDATE_FRACTION`` compete as candidates."""
NMS_DISTANCE = 0.7
"""A candidate closer than this many box sides to a stronger one is suppressed."""
MAX_JOINTS = 2
NO_LEG_FRACTION = 0.5
"""The other half "clearly holds no leg" below this fraction of the joint's mean brightness."""
HEAT_PRIOR = 0.01
"""Initial heatmap probability (the bias of the heat head), as in CenterNet."""

_METADATA_KEY = "dicomnode.localiser"


@dataclass(frozen=True)
class Joint:
    """One knee joint found on a radiograph.

    Attributes
    ----------
    region:
        The joint-centred square in source pixel coordinates; it may extend
        past the image border (then ``uncertain`` is set and the crop is padded
        with black).
    laterality:
        ``"R"``, ``"L"`` or ``None`` when it cannot be told.
    confidence:
        Height of the heatmap peak, in [0, 1].
    uncertain:
        True when the localisation should not be trusted (see the module docstring).
    reasons:
        Why it should not, in short phrases (:func:`uncertainty_reasons`).
    """

    region: Region
    laterality: str | None
    confidence: float
    uncertain: bool
    reasons: tuple[str, ...] = ()

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre of ``region`` in source pixel coordinates."""
        return (self.region.x0 + self.region.x1) / 2, (self.region.y0 + self.region.y1) / 2


@dataclass(frozen=True, eq=False)
class JointMaps:
    """What the network says about one input.

    Attributes
    ----------
    heat:
        (h, w) centre probability in [0, 1]; cell (i, j) covers input pixels
        [j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride).
    side:
        (h, w) predicted box side, in input pixels, of a joint centred in that cell.
    stride:
        Input pixels per cell.
    """

    heat: FloatArray
    side: FloatArray
    stride: int = STRIDE


@dataclass(frozen=True)
class _Candidate:
    x: float
    y: float
    side: float
    confidence: float


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LocaliserNet(nn.Module):
    """A small fully convolutional centre-heatmap network (CenterNet-style).

    An encoder halves the resolution ``len(widths)`` times; a feature-pyramid
    decoder brings the deepest features back to stride 4, where two heads give
    the centre logits and ``log(side / input size)``, both (N, 1, H/4, W/4).

    Parameters
    ----------
    widths:
        Channels at strides 2, 4, 8, ... (at least two levels).
    head:
        Channels of the decoder and heads.
    """

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS, head: int = DEFAULT_HEAD) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ModelError("a localiser needs at least two encoder levels")
        self.widths = tuple(int(w) for w in widths)
        self.head_width = int(head)
        self.stem = _conv(1, self.widths[0], 2)
        self.down = nn.ModuleList(
            nn.Sequential(_conv(a, b, 2), _conv(b, b)) for a, b in itertools.pairwise(self.widths)
        )
        self.lateral = nn.ModuleList(nn.Conv2d(w, head, 1) for w in self.widths[1:])
        self.smooth = nn.ModuleList(_conv(head, head) for _ in self.widths[2:])
        self.heat = nn.Conv2d(head, 1, 3, padding=1)
        self.size = nn.Conv2d(head, 1, 3, padding=1)
        bias = self.heat.bias
        assert bias is not None
        nn.init.constant_(bias, math.log(HEAT_PRIOR / (1 - HEAT_PRIOR)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = []
        x = self.stem(x)
        for block in self.down:
            x = block(x)
            levels.append(x)
        y = self.lateral[-1](levels[-1])
        for index in range(len(levels) - 2, -1, -1):
            skip = self.lateral[index](levels[index])
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest") + skip
            y = self.smooth[index](y)
        return self.heat(y), self.size(y)

    def config(self) -> dict[str, Any]:
        """What :func:`build_localiser` needs to rebuild this network."""
        return {"widths": list(self.widths), "head": self.head_width}


def build_localiser(config: dict[str, Any]) -> LocaliserNet:
    """A :class:`LocaliserNet` from a config written by :meth:`LocaliserNet.config`."""
    try:
        return LocaliserNet([int(w) for w in config["widths"]], int(config["head"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"localiser config {config!r} is invalid: {exc}") from exc


def save_localiser(network: LocaliserNet, path: Path) -> str:
    """Write ``network`` as safetensors (config in its metadata); return the file's sha256.

    One metadata key only, so the same weights always give the same bytes.
    """
    state = {k: v.detach().contiguous().clone() for k, v in network.state_dict().items()}
    metadata = {_METADATA_KEY: json.dumps(network.config(), sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header_config(data: bytes, path: Path) -> dict[str, Any]:
    """The network config in the safetensors header of ``data``."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        config = json.loads(header["__metadata__"][_METADATA_KEY])
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"localiser {path} has no dicomnode localiser config: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"localiser {path} has a malformed config")
    return config


def _read_network(path: Path, sha256: str) -> LocaliserNet:
    """Build and strictly load the network in ``path`` after checking its sha256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read localiser {path}: {exc.strerror}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ModelError(
            f"localiser {path} has sha256 {actual}, the card says {sha256}; refusing to load"
        )
    network = build_localiser(_header_config(data, path))
    try:
        network.load_state_dict(load_safetensors(data), strict=True)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise ModelError(f"localiser {path} does not fit its network: {exc}") from exc
    network.requires_grad_(False)
    place(network, torch.device("cpu"))
    return network.eval()


@dataclass(frozen=True, eq=False)
class KneeLocaliser:
    """A loaded knee-joint localiser. Build it with :meth:`load`.

    Attributes
    ----------
    network:
        The :class:`LocaliserNet`, in eval mode, parameters frozen, on the CPU.
    sha256:
        The checksum of the weights it was loaded from.
    threshold:
        Peak height below which a joint is uncertain.
    """

    network: nn.Module
    sha256: str
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ModelError(f"localiser threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def load(
        cls, path: Path, sha256: str, *, threshold: float = DEFAULT_THRESHOLD
    ) -> KneeLocaliser:
        """Load the localiser weights in ``path``, refusing them unless their sha256 matches.

        Raises
        ------
        ModelError
            If the file is missing, its sha256 differs from ``sha256``, it holds
            no localiser config or its tensors do not fit the network.
        """
        localiser = cls(_read_network(path, sha256), sha256, threshold)
        logger.info("knee localiser loaded", extra={"sha256": sha256[:12]})
        return localiser

    def locate(self, image: PreparedImage) -> tuple[Joint, ...]:
        """The knee joints on ``image`` (1 or 2; see the module docstring)."""
        return self.locate_batch([image])[0]

    def locate_batch(self, images: Sequence[PreparedImage]) -> list[tuple[Joint, ...]]:
        """:meth:`locate` for several images in one forward pass."""
        if not images:
            return []
        inputs = [localiser_input(image.pixels) for image in images]
        maps = self.maps(torch.stack([tensor for tensor, _ in inputs]))
        return [
            decode_joints(m, placement, image, self.threshold)
            for m, (_, placement), image in zip(maps, inputs, images, strict=True)
        ]

    def maps(self, batch: torch.Tensor) -> list[JointMaps]:
        """The network's maps for a (N, 1, H, W) batch made by :func:`localiser_input`."""
        with torch.inference_mode():
            logits, log_side = self.network(batch)
            heat = torch.sigmoid(logits)[:, 0].float().numpy()
            side = (torch.exp(log_side.clamp(-6.0, 1.0)) * batch.shape[-1])[:, 0].float().numpy()
        return [JointMaps(heat[i], side[i], STRIDE) for i in range(batch.shape[0])]


def localiser_input(pixels: FloatArray) -> tuple[torch.Tensor, Placement]:
    """The (1, 256, 256) letterboxed grey input of the localiser, and its placement."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise InferenceError(
            f"a prepared image must be a non-empty 2-D array, got shape {pixels.shape}"
        )
    size = (INPUT_SIZE, INPUT_SIZE)
    return to_input(pixels, size, 1, (INPUT_MEAN,), (INPUT_STD,), "letterbox")


def decode_joints(
    maps: JointMaps,
    placement: Placement,
    image: PreparedImage,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[Joint, ...]:
    """Turn the maps of one input into joints on ``image`` (see the module docstring)."""
    candidates = [
        c for c in _candidates(maps, threshold * CANDIDATE_FRACTION) if _on_source(c, placement)
    ]
    if not candidates:
        return ()
    crowded = len(candidates) > MAX_JOINTS
    chosen = sorted(candidates[:MAX_JOINTS], key=lambda c: c.x)
    regions = [_source_square(c, placement) for c in chosen]
    sides = _lateralities(regions, image)
    joints = []
    for c, region, side in zip(chosen, regions, sides, strict=True):
        reasons = uncertainty_reasons(
            c.confidence,
            threshold,
            clipped=_clipped(region, image),
            crowded=crowded,
            against_header=_contradicts_header(side, image, len(chosen)),
        )
        joints.append(Joint(region, side, c.confidence, bool(reasons), reasons))
    return tuple(joints)


def uncertainty_reasons(
    confidence: float, threshold: float, *, clipped: bool, crowded: bool, against_header: bool
) -> tuple[str, ...]:
    """Why a joint's localisation should not be trusted, as the overlay and SR say it."""
    reasons = []
    if confidence < threshold:
        reasons.append(f"weak joint signal ({confidence:.2f})")
    if clipped:
        reasons.append("box leaves the image")
    if crowded:
        reasons.append("more than two joint candidates")
    if against_header:
        reasons.append("side differs from the header's laterality")
    return tuple(reasons)


def _contradicts_header(side: str | None, image: PreparedImage, joints: int) -> bool:
    """Two joints on a film whose header names one side: the one of the other side is doubtful.

    A single-knee film (Image Laterality L or R) where a second, weaker peak appears
    would otherwise give its one knee the side its position says, whatever the header
    says; such a joint is flagged uncertain, so the SR says the localisation is.
    """
    return joints == 2 and image.laterality in ("L", "R") and side != image.laterality


def _candidates(maps: JointMaps, floor: float) -> list[_Candidate]:
    """Local maxima at or above ``floor``, strongest first, after distance-based NMS."""
    heat = torch.from_numpy(np.ascontiguousarray(maps.heat, dtype=np.float32))[None, None]
    pooled = F.max_pool2d(heat, 3, stride=1, padding=1)
    rows, columns = torch.nonzero((heat == pooled)[0, 0] & (heat[0, 0] >= floor), as_tuple=True)
    found = [_refine(maps, int(r), int(c)) for r, c in zip(rows, columns, strict=True)]
    kept: list[_Candidate] = []
    for candidate in sorted(found, key=lambda c: -c.confidence):
        if all(not _close(candidate, other) for other in kept):
            kept.append(candidate)
    return kept


def _refine(maps: JointMaps, row: int, column: int) -> _Candidate:
    """A candidate at the heat-weighted centroid of the 3 x 3 cells around (row, column)."""
    r0, c0 = max(0, row - 1), max(0, column - 1)
    window = maps.heat[r0 : row + 2, c0 : column + 2].astype(np.float64)
    ys, xs = np.mgrid[r0 : r0 + window.shape[0], c0 : c0 + window.shape[1]]
    total = float(window.sum())
    cell_x = float((window * xs).sum()) / total if total > 0 else float(column)
    cell_y = float((window * ys).sum()) / total if total > 0 else float(row)
    return _Candidate(
        x=(cell_x + 0.5) * maps.stride,
        y=(cell_y + 0.5) * maps.stride,
        side=float(maps.side[row, column]),
        confidence=float(maps.heat[row, column]),
    )


def _on_source(candidate: _Candidate, placement: Placement) -> bool:
    """Whether the candidate's centre lies on the source pixels (not on the letterbox bars)."""
    x, y = placement.source_point(candidate.x, candidate.y)
    return 0 <= x < placement.source_columns and 0 <= y < placement.source_rows


def _close(a: _Candidate, b: _Candidate) -> bool:
    return math.hypot(a.x - b.x, a.y - b.y) < NMS_DISTANCE * max(a.side, b.side)


def _source_square(candidate: _Candidate, placement: Placement) -> Region:
    """The candidate's square box in source pixels (it may leave the image)."""
    x, y = placement.source_point(candidate.x, candidate.y)
    return square_region(x, y, candidate.side * placement.scale)


def square_region(x: float, y: float, side: float) -> Region:
    """The square of ``side`` (at least 1 pixel) centred on continuous point (x, y)."""
    length = max(1, round(side))
    x0, y0 = round(x - length / 2), round(y - length / 2)
    return Region(x0, y0, x0 + length, y0 + length)


def crop_region(pixels: FloatArray, region: Region) -> FloatArray:
    """The pixels inside ``region``, black (0) where it leaves the image."""
    rows, columns = pixels.shape
    out = np.zeros((region.height, region.width), dtype=np.float32)
    y0, y1 = max(0, region.y0), min(rows, region.y1)
    x0, x1 = max(0, region.x0), min(columns, region.x1)
    if y1 > y0 and x1 > x0:
        out[y0 - region.y0 : y1 - region.y0, x0 - region.x0 : x1 - region.x0] = pixels[y0:y1, x0:x1]
    return out


def _clipped(region: Region, image: PreparedImage) -> bool:
    return region.x0 < 0 or region.y0 < 0 or region.x1 > image.columns or region.y1 > image.rows


_OPPOSITE = {"R": "L", "L": "R"}


def viewer_left_side(image: PreparedImage) -> str | None:
    """The patient's side shown on the viewer's left: ``R``, ``L`` or None (see the docstring)."""
    direction = image.row_direction
    if not direction:
        return "R"
    if ("L" in direction) == ("R" in direction):
        return None
    return "R" if "L" in direction else "L"


def _lateralities(regions: Sequence[Region], image: PreparedImage) -> list[str | None]:
    """R/L for joints sorted left to right (see the module docstring)."""
    left = viewer_left_side(image)
    if len(regions) == 2:
        return [None, None] if left is None else [left, _OPPOSITE[left]]
    if image.laterality is not None:
        return [image.laterality]
    return [_side_by_half(regions[0], image, left)]


def _side_by_half(region: Region, image: PreparedImage, left: str | None) -> str | None:
    """The side of the half the joint sits in, when the other half clearly holds no leg.

    ``left`` is the side shown on the viewer's left (:func:`viewer_left_side`).
    """
    if left is None:
        return None
    pixels = image.pixels
    centre = (region.x0 + region.x1) / 2
    middle = image.columns // 2
    other = (
        pixels[:, max(middle, region.x1) :]
        if centre < middle
        else pixels[:, : min(middle, region.x0)]
    )
    inside = pixels[max(0, region.y0) : region.y1, max(0, region.x0) : region.x1]
    if other.size == 0 or inside.size == 0:
        return None
    step = max(1, max(pixels.shape) // INPUT_SIZE)
    leg_level = float(np.percentile(other[::step, ::step], 90))
    joint_level = float(np.mean(inside[::step, ::step]))
    if leg_level >= NO_LEG_FRACTION * joint_level:
        return None
    return left if centre < middle else _OPPOSITE[left]
