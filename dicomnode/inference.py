"""Run a model card on prepared images: probabilities, predicted class, Grad-CAM.

:class:`Predictor` is what the worker holds for each loaded card. It is built
once (architecture, strictly loaded weights whose sha256 is checked on the very
bytes loaded, eval mode, frozen parameters) and then classifies batches:

    prepared pixels --to_input--> tensor --forward+Grad-CAM--> logits, cams
    logits --softmax(logits / temperature)--> probabilities
    cams --to_source_geometry--> heatmap on the image (at the overlay's size) --> peak

A card with ``preprocessing.localiser: knee`` first runs its knee-joint
localiser (:mod:`dicomnode.models.localise`) on each image; every joint found
becomes one square crop of the prepared pixels (black where the square leaves
the image), all crops of a batch go through the classifier and Grad-CAM
together, and each gives one finding whose heatmap is placed back on the whole
image (zero outside the joint's region).

Evaluation calls :meth:`Predictor.forward_probabilities` and
:func:`prepare_input`, so reported metrics come from the same numbers the node
sends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from dicomnode.errors import InferenceError, ModelError
from dicomnode.explain.gradcam import (
    CamBatch,
    Explainer,
    ensemble_grad_cam,
    grad_cam,
    mirror_averaged,
    peak,
    shift_averaged,
)
from dicomnode.imaging.tensor import Placement, to_input, to_source_geometry
from dicomnode.models.architectures import EnsembleNet, build_model, place, scorer, target_layer
from dicomnode.models.card import (
    MIRRORED_NETWORK_NOTE,
    GradCamSpec,
    ModelCard,
    identity,
    split_layers,
    split_members,
)
from dicomnode.models.localise import KneeLocaliser, crop_region
from dicomnode.values import (
    CodedClass,
    Finding,
    FloatArray,
    ImageResult,
    ModelIdentity,
    PreparedImage,
    Region,
)

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda", "auto"]
DEFAULT_BATCH_SIZE = 8


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, or ``auto`` (CUDA when available, else CPU).

    Raises
    ------
    ModelError
        For an unknown name, or ``cuda`` on a machine without CUDA.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was requested but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def prepare_input(card: ModelCard, pixels: FloatArray) -> tuple[torch.Tensor, Placement]:
    """The (C, H, W) input ``card`` expects for ``pixels``, and where the pixels sit in it."""
    if pixels.ndim != 2 or pixels.size == 0:
        raise InferenceError(
            f"a prepared image must be a non-empty 2-D array, got shape {pixels.shape}"
        )
    spec = card.input
    return to_input(
        pixels, spec.size, spec.channels, spec.mean, spec.std, card.preprocessing.resize
    )


def probabilities(logits: torch.Tensor, temperature: float) -> npt.NDArray[np.float64]:
    """``softmax(logits / temperature)`` per row, in float64 (rows sum to 1)."""
    scaled = logits.detach().to("cpu", torch.float64) / temperature
    result: npt.NDArray[np.float64] = torch.softmax(scaled, dim=1).numpy()
    return result


class Predictor:
    """A loaded model card, ready to classify and explain prepared images.

    Build it with :meth:`load`. Calls are serialised by a lock (Grad-CAM adds
    hooks to the shared network), so one instance may be shared by threads,
    but they take turns.

    Attributes
    ----------
    directory:
        The card's directory.
    card:
        The validated card.
    model:
        The network, in eval mode, parameters frozen, on ``device``.
    device:
        Where the network runs.
    batch_size:
        The most images (or joint crops; on CUDA, shifted copies) per forward pass.
    localiser:
        The card's knee-joint localiser (it runs on the CPU), or ``None``.
    heatmap_size:
        The longest side of the findings' heatmaps (0: each image's own size);
        the node passes its overlay size, so a 3000-pixel radiograph's map is
        made once at the overlay's 2048 pixels instead of at full size and then
        shrunk.
    explainer:
        Another explanation than the card's (SHAP, offline), or ``None``; the
        identity's ``explanation`` then names it.
    """

    def __init__(
        self,
        directory: Path,
        card: ModelCard,
        model: nn.Module,
        device: torch.device,
        batch_size: int = DEFAULT_BATCH_SIZE,
        localiser: KneeLocaliser | None = None,
        heatmap_size: int = 0,
        explainer: Explainer | None = None,
    ) -> None:
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        if heatmap_size < 0:
            raise ModelError(f"heatmap_size must be 0 (full size) or positive, got {heatmap_size}")
        self.directory = directory
        self.card = card
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.localiser = localiser
        self.heatmap_size = heatmap_size
        self.explainer = explainer
        self.identity: ModelIdentity = identity(card)
        if explainer is not None:
            self.identity = replace(
                self.identity,
                explanation=explainer.description
                + (MIRRORED_NETWORK_NOTE if card.test_time_flip else ""),
                explanation_method=explainer.method,
            )
        self.classes: tuple[CodedClass, ...] = card.coded_classes()
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        directory: Path,
        card: ModelCard,
        device: Device | str = "cpu",
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        heatmap_size: int = 0,
    ) -> Predictor:
        """Build the card's network and load its weights.

        Parameters
        ----------
        directory:
            The card's directory (holds the weights file).
        card:
            The validated card (see :func:`~dicomnode.models.card.load_card`).
        device:
            ``cpu``, ``cuda`` or ``auto``.
        batch_size:
            The most images per forward pass.
        heatmap_size:
            The longest side of the heatmaps (0: each image's own size); give
            the overlay's size (``results.overlay_max_size``).

        Raises
        ------
        ModelError
            If the card asks for an unavailable feature, the architecture is
            unknown, the weights (or the localiser) are missing, do not match the
            card's sha256 or do not fit the network (the message names the
            keys), or the Grad-CAM layer does not exist.
        """
        localiser = load_localiser(directory, card)
        target = resolve_device(device)
        spec = card.architecture
        model = build_model(spec.name, card.input.channels, card.num_classes, spec.params)
        _load_state(model, _read_weights(directory, card), card.name)
        check_cam_layers(model, card.gradcam.target_layer)
        model.requires_grad_(False)
        model.eval()
        place(model, target)
        logger.info(
            "model loaded",
            extra={"model": card.name, "version": card.version, "device": str(target)},
        )
        return cls(directory, card, model, target, batch_size, localiser, heatmap_size)

    def with_explanation(self, gradcam: GradCamSpec) -> Predictor:
        """The same network explained another way (method and layers), for comparisons;
        an explainer of this predictor is dropped (the card's explanation is the map).

        Raises
        ------
        ModelError
            If a layer of ``gradcam`` does not exist in the network.
        """
        check_cam_layers(self.model, gradcam.target_layer)
        card = self.card.model_copy(update={"gradcam": gradcam})
        return self._variant(card, self.localiser, None)

    def without_localiser(self) -> Predictor:
        """The same network classifying each image whole (a joint crop, say), localiser off."""
        return self._variant(self.card, None, self.explainer)

    def with_explainer(self, explainer: Explainer) -> Predictor:
        """The same network and localiser, each finding's map made by ``explainer``.

        The maps go through the same placement as the card's own (each joint's
        crop back onto the image), so any explanation works on whole radiographs.
        """
        return self._variant(self.card, self.localiser, explainer)

    def _variant(
        self, card: ModelCard, localiser: KneeLocaliser | None, explainer: Explainer | None
    ) -> Predictor:
        """This predictor's network with another card, localiser and explainer.

        The copy shares the network, so it shares the lock too: Grad-CAM's hooks on one
        network must not serve two callers at once.
        """
        variant = Predictor(
            self.directory,
            card,
            self.model,
            self.device,
            self.batch_size,
            localiser,
            self.heatmap_size,
            explainer,
        )
        variant._lock = self._lock
        return variant

    def predict(self, images: Sequence[PreparedImage]) -> list[ImageResult]:
        """Classify and explain ``images``, one :class:`ImageResult` each, in order.

        Images are processed in chunks of at most ``batch_size``; each chunk
        is one forward and one backward pass (with a localiser: one localiser
        pass, then the chunk's joint crops in passes of at most ``batch_size``).
        Without a localiser each result has one finding for the whole image;
        with one, a finding per joint, left to right.

        Raises
        ------
        InferenceError
            If an image is not a 2-D array, the network fails, or its outputs
            are not finite (NaN pixels, say).
        """
        results: list[ImageResult] = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                results.extend(self._predict_chunk(images[start : start + self.batch_size]))
        return results

    def forward_probabilities(
        self, tensors: torch.Tensor | Sequence[torch.Tensor]
    ) -> npt.NDArray[np.float64]:
        """Probabilities (N, classes) for model inputs made by :func:`prepare_input`.

        The same forward pass and temperature as :meth:`predict`, without
        Grad-CAM, under ``torch.inference_mode``; used by evaluation.
        """
        if not isinstance(tensors, torch.Tensor) and len(tensors) == 0:
            return np.zeros((0, self.card.num_classes), dtype=np.float64)
        batch = tensors if isinstance(tensors, torch.Tensor) else _stack(tensors)
        if batch.ndim != 4:
            raise InferenceError(f"expected a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
        parts = [np.zeros((0, self.card.num_classes), dtype=np.float64)]
        network = scorer(self.model, self.card.test_time_flip)
        with self._lock, torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                logits = network(batch[start : start + self.batch_size].to(self.device))
                parts.append(probabilities(logits, self.card.temperature))
        return np.concatenate(parts)

    def explain(self, batch: torch.Tensor) -> CamBatch:
        """Logits and the explanation of a ready batch on the network's device: the
        explainer's when this predictor has one, else the card's.

        On CUDA the shifted copies of a shift-averaged explanation go through
        in passes of up to ``batch_size`` images; on the CPU one copy per pass,
        which measured as fast with a quarter of the memory (``dicomnode
        bench-explain models/hand-ra --batch 1 --max-images 1`` against ``8``).
        """
        flip = self.card.test_time_flip
        if self.explainer is not None:
            return self.explainer.explain(scorer(self.model, flip), batch)
        per_pass = self.batch_size if self.device.type == "cuda" else None
        return explain_batch(self.model, self.card.gradcam, batch, per_pass, mirror=flip)

    def _predict_chunk(self, images: Sequence[PreparedImage]) -> list[ImageResult]:
        started = time.perf_counter()
        views = self._views(images)
        findings: list[list[Finding]] = [[] for _ in images]
        for start in range(0, len(views), self.batch_size):
            part = views[start : start + self.batch_size]
            for view, finding in zip(part, self._classify(images, part), strict=True):
                findings[view.image].append(finding)
        logger.debug(
            "batch classified",
            extra={
                "model": self.card.name,
                "images": len(images),
                "regions": len(views),
                "seconds": time.perf_counter() - started,
            },
        )
        return [
            ImageResult(
                model=self.identity,
                classes=self.classes,
                findings=tuple(found),
                not_assessed="" if found else NO_JOINT_FOUND,
            )
            for found in findings
        ]

    def _views(self, images: Sequence[PreparedImage]) -> list[_View]:
        """What the classifier sees: each whole image, or each joint the localiser finds."""
        if self.localiser is None:
            return [
                _View(i, image.pixels, Region(0, 0, image.columns, image.rows), image.laterality)
                for i, image in enumerate(images)
            ]
        joints = self.localiser.locate_batch(images)
        return [
            _View(i, crop_region(image.pixels, j.region), j.region, j.laterality, True, j.reasons)
            for i, (image, found) in enumerate(zip(images, joints, strict=True))
            for j in found
        ]

    def _classify(self, images: Sequence[PreparedImage], views: Sequence[_View]) -> list[Finding]:
        """One forward and backward pass over ``views``: a finding each."""
        prepared = [prepare_input(self.card, view.pixels) for view in views]
        batch = _stack([tensor for tensor, _ in prepared]).to(self.device)
        cams = self.explain(batch)
        if not bool(torch.isfinite(cams.logits).all()):
            sources = ", ".join(dict.fromkeys(images[v.image].source or "?" for v in views))
            raise InferenceError(f"model {self.card.name} gave non-finite outputs for: {sources}")
        probs = probabilities(cams.logits, self.card.temperature)
        return [
            self._finding(images[view.image], view, placement, probs[i], cams, i)
            for i, (view, (_, placement)) in enumerate(zip(views, prepared, strict=True))
        ]

    def _finding(
        self,
        image: PreparedImage,
        view: _View,
        placement: Placement,
        probs: npt.NDArray[np.float64],
        cams: CamBatch,
        index: int,
    ) -> Finding:
        shape = image.shape_within(self.heatmap_size)
        scale_y, scale_x = shape[0] / image.rows, shape[1] / image.columns
        region = _scaled(view.region, scale_x, scale_y)
        local = to_source_geometry(cams.cams[index], placement, (region.height, region.width))
        heatmap, visible = _on_image(local.astype(np.float32, copy=False), region, shape)
        column, row = peak(heatmap[visible.y0 : visible.y1, visible.x0 : visible.x1])
        seen = _visible(view.region, image.rows, image.columns)
        return Finding(
            # The argmax of the logits is the argmax of softmax(logits / T), T > 0;
            # taking it from the cam keeps the heatmap and the prediction in step.
            predicted=self.classes[cams.classes[index]],
            probabilities=tuple(float(p) for p in probs),
            heatmap=heatmap,
            peak=(
                _unscaled(column + visible.x0, scale_x, seen.x0, seen.x1),
                _unscaled(row + visible.y0, scale_y, seen.y0, seen.y1),
            ),
            region=seen,
            laterality=view.laterality,
            localisation_uncertain=bool(view.uncertainty),
            localised=view.localised,
            uncertainty=view.uncertainty,
        )


NO_JOINT_FOUND = "No knee joint found on the image: not graded"
"""Why an image the localiser found no joint on has no finding."""


@dataclass(frozen=True, eq=False)
class _View:
    """The pixels the classifier sees for one finding, and where they come from.

    ``region`` is the whole image, or a joint's square (which may leave the image).
    """

    image: int
    pixels: FloatArray
    region: Region
    laterality: str | None
    localised: bool = False
    uncertainty: tuple[str, ...] = ()


def _visible(region: Region, rows: int, columns: int) -> Region:
    """The part of ``region`` inside an image of ``rows`` x ``columns``."""
    return Region(
        max(0, region.x0), max(0, region.y0), min(columns, region.x1), min(rows, region.y1)
    )


def _scaled(region: Region, scale_x: float, scale_y: float) -> Region:
    """The pixels that cover ``region`` on the image scaled by (``scale_x``, ``scale_y``)."""
    if scale_x == scale_y == 1.0:
        return region
    return Region(  # the tolerance keeps 3990 * (2045 / 3990) from rounding up to 2046
        math.floor(region.x0 * scale_x + _ROUNDING),
        math.floor(region.y0 * scale_y + _ROUNDING),
        math.ceil(region.x1 * scale_x - _ROUNDING),
        math.ceil(region.y1 * scale_y - _ROUNDING),
    )


_ROUNDING = 1e-6
"""Floating-point slack of a scaled pixel edge (far below a pixel)."""


def _unscaled(position: float, scale: float, low: int, high: int) -> float:
    """A pixel of the scaled heatmap as a position on the image, kept inside [low, high)."""
    if scale == 1.0:
        return float(position)
    return float(min(max((position + 0.5) / scale - 0.5, low), high - 1))


def _on_image(
    local: FloatArray, region: Region, shape: tuple[int, int]
) -> tuple[FloatArray, Region]:
    """A map of ``region`` on an image of ``shape`` (zero elsewhere), and its visible part."""
    rows, columns = shape
    visible = _visible(region, rows, columns)
    if visible == region == Region(0, 0, columns, rows):
        return local, visible
    heatmap = np.zeros(shape, dtype=np.float32)
    heatmap[visible.y0 : visible.y1, visible.x0 : visible.x1] = local[
        visible.y0 - region.y0 : visible.y1 - region.y0,
        visible.x0 - region.x0 : visible.x1 - region.x0,
    ]
    return heatmap, visible


def cam_layers(model: nn.Module, layers: str) -> tuple[str, ...]:
    """The Grad-CAM layer(s) of a network, or one entry per member (comma-separated) of an ensemble.

    An entry may join several layers of one network with ``+``.
    """
    paths = split_members(layers)
    if isinstance(model, EnsembleNet) and len(paths) != len(model.members):
        raise ModelError(
            f"an ensemble of {len(model.members)} members needs as many Grad-CAM layers "
            f"(comma-separated), got {layers!r}"
        )
    if not isinstance(model, EnsembleNet) and len(paths) != 1:
        raise ModelError(f"one Grad-CAM layer expected, got {layers!r}")
    return paths


def check_cam_layers(model: nn.Module, layers: str) -> None:
    """Raise :class:`ModelError` unless every Grad-CAM layer of ``layers`` exists."""
    paths = cam_layers(model, layers)
    networks = model.members if isinstance(model, EnsembleNet) else [model]
    for network, path in zip(networks, paths, strict=True):
        for layer in split_layers(path):
            target_layer(network, layer)


def explain_batch(
    model: nn.Module,
    spec: GradCamSpec,
    batch: torch.Tensor,
    max_images: int | None = None,
    *,
    mirror: bool = False,
) -> CamBatch:
    """Logits and class activation maps as ``spec`` says: plain or the ensemble's
    share-weighted mean, of the batch alone or averaged over shifted copies of it
    (batched up to ``max_images`` images per pass, see
    :func:`~dicomnode.explain.gradcam.shift_averaged`); with ``mirror`` (a card's
    ``test_time_flip``) the images and their mirrors, averaged, in passes of up to
    ``max_images`` images (:func:`~dicomnode.explain.gradcam.mirror_averaged`; of an
    ensemble, each member's own input and its mirror, before the members are fused)."""
    paths = cam_layers(model, spec.target_layer)

    if isinstance(model, EnsembleNet):  # each member mirrors its own input

        def members_pass(inputs: torch.Tensor, classes: Sequence[int] | None) -> CamBatch:
            return ensemble_grad_cam(
                model, paths, inputs, spec.method, classes, mirror=mirror, max_images=max_images
            )

        return shift_averaged(members_pass, batch, spec.shift, max_images)

    def one_pass(inputs: torch.Tensor, classes: Sequence[int] | None) -> CamBatch:
        return grad_cam(model, paths[0], inputs, classes, spec.method)

    explain = mirror_averaged(one_pass, max_images) if mirror else one_pass
    return shift_averaged(explain, batch, spec.shift, max_images)


def load_localiser(directory: Path, card: ModelCard) -> KneeLocaliser | None:
    """The card's knee localiser (sha256 checked), ``None`` when the card has none."""
    if card.preprocessing.localiser == "none":
        return None
    if card.localiser is None:
        raise ModelError(
            f"model {card.name}: localiser {card.preprocessing.localiser!r} is not available "
            "in this version of the card: it has no localiser block (file, sha256, threshold)"
        )
    spec = card.localiser
    return KneeLocaliser.load(directory / spec.file, spec.sha256, threshold=spec.threshold)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        raise InferenceError("no model inputs to stack")
    try:
        return torch.stack(list(tensors))
    except RuntimeError as exc:
        raise InferenceError(f"model inputs differ in shape: {exc}") from exc


def _read_weights(directory: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The state dict in the card's weights file, checked against the card's sha256."""
    path = directory / card.weights.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"model {card.name}: cannot read weights {path}: {exc.strerror}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.weights.sha256:
        raise ModelError(
            f"model {card.name}: weights {path} have sha256 {actual}, "
            f"the card says {card.weights.sha256}; refusing to load"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(
            f"model {card.name}: weights {path} are not a safetensors file: {exc}"
        ) from exc


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ``state`` strictly; name every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    problems = [f"missing {key}" for key in expected if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in expected]
    problems += [
        f"{key} has shape {tuple(state[key].shape)}, the network needs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if problems:
        shown = "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
        raise ModelError(f"model {name}: weights do not fit the architecture: {shown}")
    model.load_state_dict(state, strict=True)
