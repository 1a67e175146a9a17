"""A small run of `dicomnode bench` keeps the benchmark working; figures printed, not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from dicomnode.bench.bare import PR_STAGE
from dicomnode.bench.main import BenchOptions, run_bench

pytestmark = [
    pytest.mark.acceptance,
    pytest.mark.skipif(not Path("/usr/bin/storescp").exists(), reason="dcmtk"),
]


def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    options = BenchOptions(
        instances=3,
        rounds=1,
        turnaround_studies=2,
        burst_studies=2,
        burst_images=1,
        pacs_studies=1,
        soak_images=3,
        records_jobs=2000,
        models_dir=tmp_path / "no-models",
        out_dir=tmp_path / "bench",
        work_dir=tmp_path,
    )
    path = run_bench(options, Console(width=160))
    result = json.loads(path.read_text())
    figures = result["figures"]
    assert set(figures) == {
        "receive_1",
        "receive_4",
        "turnaround",
        "pacs",
        "soak",
        "burst",
        "bare",
        "model_limit",
        "records",
    }
    assert len(figures["pacs"]["sr_seconds"]) == 1
    assert figures["receive_1"]["files_per_s"]["dicomnode"] > 0
    assert len(figures["turnaround"]["sr_seconds"]) == 2
    assert figures["burst"]["images"] == 2 and figures["burst"]["peak_rss_mb"] > 0
    stages = figures["bare"]["stage_seconds_per_image"]
    assert {"overlay", "sc encoding", "sr encoding", PR_STAGE} <= set(stages)
    assert all(seconds > 0 for seconds in stages.values())
    startup = figures["burst"]["startup_seconds"]  # the burst began once the workers ran
    assert 0 < startup["port"] <= startup["workers"]
    roles = {name.rsplit(" ", 1)[0] for name in figures["burst"]["peak_rss_mb_by_process"]}
    assert {"main", "fork server", "worker"} <= roles
    records = figures["records"]
    assert records["jobs"] == 2000 and records["status_seconds"] > 0
    assert records["metrics_seconds"] > 0
    assert records["backlog"] == 500 and records["claim_ms"] > 0 and records["lookup_ms"] > 0
    assert records["images"] == 400 and records["ready_ms"] > 0
    assert "untrained" in result["settings"]["model"]
    assert result["versions"]["torch"].startswith("2.14.1")
