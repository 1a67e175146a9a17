"""The bare loop: the node's stages in one process, no network, database or queue.

decode + prepare -> batched inference with Grad-CAM -> overlay -> SC/SR encoding (to bytes).
The presentation state (``results.presentation_state``, off by default) is encoded too and
timed as a stage of its own, outside the loop's images/s. Also the raw model limit: batched
forward + Grad-CAM on ready tensors.
"""

from __future__ import annotations

import time
from collections import defaultdict
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import torch

from dicomnode import pipeline
from dicomnode.bench.data import Study
from dicomnode.encode.sr import SrImageItem
from dicomnode.inference import Predictor, prepare_input
from dicomnode.models.registry import LoadedCard

PR_STAGE = "pr encoding (optional, not in images/s)"


def _encode(dataset: pydicom.Dataset) -> int:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def bare_loop(
    studies: list[Study],
    loaded: LoadedCard,
    batch_size: int,
    device: str,
    uid_root: str,
    max_size: int = 2048,
    jpeg_quality: int = 90,
) -> dict[str, Any]:
    """Seconds per stage and images/s over all ``studies`` (each overlay rendered once).

    ``max_size`` and ``jpeg_quality`` should be the node's (``results.overlay_*``).
    """
    predictor = Predictor.load(
        loaded.directory, loaded.card, device, batch_size=batch_size, heatmap_size=max_size
    )
    stages: dict[str, float] = defaultdict(float)
    images = 0
    start = time.perf_counter()
    for study in studies:
        mark = time.perf_counter()
        prepared = [pipeline.read_and_prepare(path) for path in study.files]
        stages["decode+prepare"] += time.perf_counter() - mark
        mark = time.perf_counter()
        analysed = pipeline.analyse(predictor, prepared)
        stages["inference+gradcam"] += time.perf_counter() - mark
        items = []
        for item in analysed:
            assert item.prepared.image is not None and item.result is not None
            mark = time.perf_counter()
            pixels = pipeline.overlay_pixels(item, max_size)
            stages["overlay"] += time.perf_counter() - mark
            mark = time.perf_counter()
            sc = pipeline.make_sc(
                item, uid_root=uid_root, max_size=max_size, pixels=pixels, jpeg_quality=jpeg_quality
            )
            _encode(sc)
            stages["sc encoding"] += time.perf_counter() - mark
            items.append(SrImageItem(source=item.prepared.header, sc=sc, result=item.result))
            images += 1
            mark = time.perf_counter()
            _encode(pipeline.make_pr(item, uid_root=uid_root))
            stages[PR_STAGE] += time.perf_counter() - mark
        mark = time.perf_counter()
        _encode(pipeline.make_sr(items, uid_root=uid_root, sequence=1))
        stages["sr encoding"] += time.perf_counter() - mark
    seconds = time.perf_counter() - start - stages[PR_STAGE]  # off by default: not counted
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "stage_seconds_per_image": {k: v / images for k, v in stages.items()},
    }


def model_limit(
    loaded: LoadedCard, batch_size: int, device: str, example: Path, batches: int = 5
) -> dict[str, Any]:
    """Images/s of batched forward + Grad-CAM on ready tensors (no decoding, no encoding)."""
    predictor = Predictor.load(loaded.directory, loaded.card, device, batch_size=batch_size)
    prepared = pipeline.read_and_prepare(example)
    assert prepared.image is not None
    tensor, _ = prepare_input(loaded.card, prepared.image.pixels)
    batch = tensor.unsqueeze(0).repeat(batch_size, 1, 1, 1)
    predictor.explain(batch.to(predictor.device))
    start = time.perf_counter()
    for _ in range(batches):
        predictor.explain(batch.to(predictor.device))
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "images_per_s": batches * batch_size / seconds,
        "device": str(predictor.device),
    }
