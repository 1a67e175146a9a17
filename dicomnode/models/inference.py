"""Run a model card on prepared images: probabilities, predicted class, Grad-CAM.

:class:`Predictor` is what the worker holds for each loaded card. It is built
once (architecture, strictly loaded weights whose sha256 is checked on the very
bytes loaded, eval mode, frozen parameters) and then classifies batches:

    prepared pixels --to_input--> tensor --forward+Grad-CAM--> logits, cams
    logits --softmax(logits / temperature)--> probabilities
    cams --to_source_geometry--> heatmap on the original pixels --> peak

Evaluation calls :meth:`Predictor.forward_probabilities` and
:func:`prepare_input`, so reported metrics come from the same numbers the node
sends.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from dicomnode.errors import InferenceError, ModelError
from dicomnode.explain.gradcam import CamBatch, grad_cam, peak
from dicomnode.imaging.tensor import Placement, to_input, to_source_geometry
from dicomnode.models.architectures import build_model, target_layer
from dicomnode.models.card import ModelCard, identity
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
        The most images per forward pass.
    """

    def __init__(
        self,
        directory: Path,
        card: ModelCard,
        model: nn.Module,
        device: torch.device,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ModelError(f"batch_size must be at least 1, got {batch_size}")
        self.directory = directory
        self.card = card
        self.model = model
        self.device = device
        self.batch_size = batch_size
        self.identity: ModelIdentity = identity(card)
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

        Raises
        ------
        ModelError
            If the card asks for an unavailable feature, the architecture is
            unknown, the weights are missing, do not match the card's sha256 or
            do not fit the network (the message names the keys), or the
            Grad-CAM layer does not exist.
        """
        if card.preprocessing.localiser != "none":
            raise ModelError(
                f"localiser {card.preprocessing.localiser!r} is not available in this version"
            )
        target = resolve_device(device)
        spec = card.architecture
        model = build_model(spec.name, card.input.channels, card.num_classes, spec.params)
        _load_state(model, _read_weights(directory, card), card.name)
        target_layer(model, card.gradcam.target_layer)
        model.requires_grad_(False)
        model.eval()
        model.to(target)
        logger.info(
            "model loaded",
            extra={"model": card.name, "version": card.version, "device": str(target)},
        )
        return cls(directory, card, model, target, batch_size)

    def predict(self, images: Sequence[PreparedImage]) -> list[ImageResult]:
        """Classify and explain ``images``, one :class:`ImageResult` each, in order.

        Images are processed in chunks of at most ``batch_size``; each chunk
        is one forward and one backward pass.

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
        with self._lock, torch.inference_mode():
            for start in range(0, batch.shape[0], self.batch_size):
                logits = self.model(batch[start : start + self.batch_size].to(self.device))
                parts.append(probabilities(logits, self.card.temperature))
        return np.concatenate(parts)

    def _predict_chunk(self, images: Sequence[PreparedImage]) -> list[ImageResult]:
        started = time.perf_counter()
        prepared = [prepare_input(self.card, image.pixels) for image in images]
        batch = _stack([tensor for tensor, _ in prepared]).to(self.device)
        cams = grad_cam(self.model, self.card.gradcam.target_layer, batch)
        if not bool(torch.isfinite(cams.logits).all()):
            sources = ", ".join(image.source or "?" for image in images)
            raise InferenceError(f"model {self.card.name} gave non-finite outputs for: {sources}")
        probs = probabilities(cams.logits, self.card.temperature)
        results = [
            self._result(image, placement, probs[i], cams, i)
            for i, (image, (_, placement)) in enumerate(zip(images, prepared, strict=True))
        ]
        logger.debug(
            "batch classified",
            extra={
                "model": self.card.name,
                "images": len(images),
                "seconds": time.perf_counter() - started,
            },
        )
        return results

    def _result(
        self,
        image: PreparedImage,
        placement: Placement,
        probs: npt.NDArray[np.float64],
        cams: CamBatch,
        index: int,
    ) -> ImageResult:
        heatmap = to_source_geometry(cams.cams[index], placement).astype(np.float32, copy=False)
        finding = Finding(
            # The argmax of the logits is the argmax of softmax(logits / T), T > 0;
            # taking it from the cam keeps the heatmap and the prediction in step.
            predicted=self.classes[cams.classes[index]],
            probabilities=tuple(float(p) for p in probs),
            heatmap=heatmap,
            peak=peak(heatmap),
            region=Region(0, 0, image.columns, image.rows),
            laterality=image.laterality,
        )
        return ImageResult(model=self.identity, classes=self.classes, findings=(finding,))


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
