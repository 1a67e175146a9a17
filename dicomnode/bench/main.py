"""Run the benchmark, print the table and write ``var/bench/<timestamp>.json``."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dicomnode.bench import run
from dicomnode.bench.bare import bare_loop, model_limit
from dicomnode.bench.data import (
    KNEE_CROPS_VARIABLE,
    knee_crops,
    knee_pictures_available,
    make_studies,
)
from dicomnode.bench.records import records
from dicomnode.config import Settings
from dicomnode.models.registry import LoadedCard, ModelRegistry
from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.peers import Orthanc
from dicomnode.values import BodyPart

UID_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class BenchOptions:
    instances: int = 200
    rounds: int = 2
    turnaround_studies: int = 20
    burst_studies: int = 50
    burst_images: int = 4
    pacs_studies: int = 10
    soak_images: int = 1000
    records_jobs: int = 700_000
    models_dir: Path = Path("models")
    out_dir: Path = Path("var/bench")
    work_dir: Path | None = None
    device: str = "cpu"


def _model(options: BenchOptions, scratch: Path) -> tuple[Path, LoadedCard, str]:
    """The shipped knee model, or a tiny untrained one when none is installed (said so)."""
    registry = (
        ModelRegistry.load(options.models_dir) if options.models_dir.is_dir() else ModelRegistry()
    )
    loaded = registry.for_body_part(BodyPart.KNEE)
    if loaded is not None:
        return options.models_dir, loaded, f"{loaded.card.name} {loaded.card.version}"
    tiny = scratch / "models"
    make_tiny_model(tiny / "tiny-knee", num_classes=5)
    loaded = ModelRegistry.load(tiny).for_body_part(BodyPart.KNEE)
    assert loaded is not None
    return tiny, loaded, "tiny-knee (untrained; no knee model installed)"


def _pictures() -> str:
    """What the knee films show, as the run's record says it."""
    if knee_pictures_available():
        return f"one knee joint each, composed of real crops from {knee_crops()}"
    return (
        f"WARNING: no knee crops at {knee_crops()} (set {KNEE_CROPS_VARIABLE}): synthetic "
        "pictures on which the localiser may find no joint, so the classifier may not run"
    )


def _machine() -> dict[str, Any]:
    import psutil

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "processor": platform.processor(),
    }


def _versions() -> dict[str, str]:
    names = ("dicomnode", "torch", "pynetdicom", "pydicom", "highdicom", "sqlalchemy")
    return {name: metadata.version(name) for name in names}


def run_bench(options: BenchOptions, console: Console) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=options.work_dir))
    try:
        models_dir, loaded, model_name = _model(options, scratch)
        console.print(f"model: {model_name}; device: {options.device}; scratch: {scratch}")
        pictures = _pictures()
        console.print(f"knee films: {pictures}")
        figures: dict[str, Any] = {}
        console.print(f"receive: {options.instances} instances x {options.rounds} rounds, 1 sender")
        figures["receive_1"] = run.receive(
            scratch, models_dir, options.instances, options.rounds, 1
        )
        console.print("receive: 4 concurrent senders")
        figures["receive_4"] = run.receive(
            scratch, models_dir, options.instances, options.rounds, 4
        )
        console.print(f"turnaround: {options.turnaround_studies} one-image studies")
        figures["turnaround"] = run.turnaround(scratch, models_dir, options.turnaround_studies)
        if options.pacs_studies and Orthanc.available():
            console.print(f"PACS turnaround: {options.pacs_studies} one-image studies from Orthanc")
            figures["pacs"] = run.pacs_turnaround(scratch, models_dir, options.pacs_studies)
        console.print(f"burst: {options.burst_studies} studies x {options.burst_images} images")
        figures["burst"] = run.burst(
            scratch, models_dir, options.burst_studies, options.burst_images
        )
        if options.soak_images:
            console.print(f"memory soak: {options.soak_images} small one-image studies")
            figures["soak"] = run.soak(
                scratch, models_dir, options.soak_images, min(100, options.soak_images)
            )
        if options.records_jobs:
            console.print(f"records: status and a metrics scrape over {options.records_jobs} jobs")
            figures["records"] = records(scratch, options.records_jobs)
        # The bare loop's images/s is measured on half the burst's studies (same sizes, in turn).
        bare_studies = max(1, options.burst_studies // 2)
        bare_data = make_studies(scratch / "bare-data", bare_studies, options.burst_images)
        results = Settings().results
        figures["bare"] = bare_loop(
            bare_data,
            loaded,
            8,
            options.device,
            UID_ROOT,
            max_size=results.overlay_max_size,
            jpeg_quality=results.overlay_jpeg_quality,
        )
        figures["model_limit"] = model_limit(loaded, 8, options.device, bare_data[0].files[0])
        figures["burst"]["ratio_node_over_bare"] = (
            figures["burst"]["images_per_s"] / figures["bare"]["images_per_s"]
        )
        result = {
            "time": datetime.now(UTC).isoformat(),
            "machine": _machine(),
            "versions": _versions(),
            "settings": {**options.__dict__, "model": model_name, "knee_films": pictures},
            "figures": figures,
        }
        path = _write(result, options.out_dir)
        console.print(table(figures))
        console.print(f"written {path}")
        return path
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def table(figures: dict[str, Any]) -> Table:
    out = Table("figure", "value", "target", title="dicomnode benchmark")
    for key in ("receive_1", "receive_4"):
        r = figures[key]
        size = r["megabytes"] / r["instances"]
        label = f"receive, {r['senders']} sender(s), {r['instances']} x {size:.0f} MB"
        out.add_row(
            f"{label}: storescp files/s, MB/s",
            f"{r['files_per_s']['storescp']:.1f}, {r['mb_per_s']['storescp']:.0f}",
            "",
        )
        out.add_row(
            f"{label}: dicomnode files/s, MB/s",
            f"{r['files_per_s']['dicomnode']:.1f}, {r['mb_per_s']['dicomnode']:.0f}",
            "",
        )
        out.add_row(
            f"{label}: ratio node / storescp", f"{r['ratio_node_over_storescp']:.2f}", ">= 1.0"
        )
    t = figures["turnaround"]
    out.add_row(
        f"turnaround to SR, {t['studies']} studies: median / p95 s",
        f"{t['sr_median']:.2f} / {t['sr_p95']:.2f}",
        "<= 3.0 / 5.0",
    )
    if "pacs" in figures:
        p = figures["pacs"]
        out.add_row(
            f"Orthanc -> node -> SR stored in Orthanc, {p['studies']} studies: median / p95 s",
            f"{p['sr_median']:.2f} / {p['sr_p95']:.2f}",
            "",
        )
    b = figures["burst"]
    out.add_row(
        f"burst {b['studies']} studies x {b['images'] // b['studies']}: seconds, images/s",
        f"{b['seconds']:.1f}, {b['images_per_s']:.2f}",
        "",
    )
    out.add_row("bare loop images/s", f"{figures['bare']['images_per_s']:.2f}", "")
    if "startup_seconds" in b:
        up = b["startup_seconds"]
        out.add_row(
            "start-up: serve -> port open / -> every worker running, s",
            f"{up['port']:.1f} / {up['workers']:.1f}",
            "",
        )
    out.add_row("burst / bare loop", f"{b['ratio_node_over_bare']:.2f}", ">= 0.9")
    out.add_row(
        "raw model limit (forward + Grad-CAM) images/s",
        f"{figures['model_limit']['images_per_s']:.1f}",
        "",
    )
    for stage, seconds in figures["bare"]["stage_seconds_per_image"].items():
        out.add_row(f"  stage {stage}, s/image", f"{seconds:.3f}", "")
    out.add_row(
        "peak memory of all node processes during the burst, MB: PSS (RSS sum)",
        f"{b.get('peak_pss_mb', float('nan')):.0f} ({b['peak_rss_mb']:.0f})",
        "<= 2000",
    )
    by_process = b.get("peak_rss_mb_by_process", {})
    out.add_row(
        "  peak RSS per process, MB",
        ", ".join(f"{name.rsplit(' ', 1)[0]} {mb:.0f}" for name, mb in sorted(by_process.items())),
        "",
    )
    if "soak" in figures:
        k = figures["soak"]
        out.add_row(
            f"RSS after {k['checkpoint']} / {k['images']} images, MB (growth)",
            f"{k['rss_at_checkpoint_mb']:.0f} / {k['rss_at_end_mb']:.0f} ({k['growth']:+.1%})",
            "<= +10%",
        )
    if "records" in figures:
        r = figures["records"]
        out.add_row(
            f"status / metrics scrape with {r['jobs']:,} jobs, {r['images']:,} images (SQLite), s",
            f"{r['status_seconds']:.2f} / {r['metrics_seconds']:.2f}",
            "<= 1.0",
        )
        out.add_row(
            "a scheduler pass's look for ready rounds among them (write lock held), ms",
            f"{r['ready_ms']:.1f}",
            "<= 10",
        )
        out.add_row(
            f"a worker's claim of 8 with {r['backlog']:,} analyses due (SQLite), ms",
            f"{r['claim_ms']:.0f}",
            "<= 100",
        )
        out.add_row(
            f"a result object's sends found by its UID among {r['jobs']:,} jobs (SQLite), ms",
            f"{r['lookup_ms']:.1f}",
            "<= 10",
        )
    return out
