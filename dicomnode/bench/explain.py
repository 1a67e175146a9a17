"""What an explanation costs: time per image and the memory its backward pass holds.

``dicomnode bench-explain MODEL_DIR [--method M --layer L]`` runs the card's
network on a batch of random inputs of its input size: a plain forward pass
first (the baseline), then the explanation, once to measure the rise of the
process's peak resident memory, then ``repeats`` times for the time. One
explanation per process, since the peak is a high-water mark.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dicomnode.inference import Predictor, explain_batch
from dicomnode.models.card import GradCamSpec, load_card


@dataclass(frozen=True)
class ExplanationCost:
    """Milliseconds per image (best of the repeats) and the rise of peak RSS in MB."""

    explanation: str
    batch: int
    ms_per_image: float
    peak_rss_rise_mb: float


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def explanation_cost(
    model_dir: Path,
    gradcam: GradCamSpec | None = None,
    *,
    batch: int = 8,
    repeats: int = 3,
    threads: int = 1,
    max_images: int = 1,
) -> ExplanationCost:
    """Time and memory of the card's explanation (or ``gradcam``) on a batch, on the CPU.

    ``max_images`` is the most images per pass when shifted copies are batched
    (1, one copy per pass, is what the node does on the CPU).
    """
    torch.set_num_threads(threads)
    card = load_card(model_dir)
    predictor = Predictor.load(model_dir, card, "cpu")
    if gradcam is not None:
        predictor = predictor.with_explanation(gradcam)
    spec = predictor.card.gradcam
    inputs = torch.rand(
        batch, card.input.channels, *card.input.size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        predictor.model(inputs)
    flip = card.test_time_flip
    before = _peak_rss_mb()
    explain_batch(predictor.model, spec, inputs, max_images, mirror=flip)
    rise = _peak_rss_mb() - before
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        explain_batch(predictor.model, spec, inputs, max_images, mirror=flip)
        best = min(best, time.perf_counter() - start)
    return ExplanationCost(predictor.identity.explanation, batch, 1000.0 * best / batch, rise)
