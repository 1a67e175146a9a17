"""A worker host (`dicomnode worker`, no DICOM listener) serves the metrics too when its
configuration sets `metrics.port`: its own process and disk figures, the shared database's."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.testing.models import make_tiny_model
from dicomnode.testing.node import NodeProcess, stop_processes
from dicomnode.testing.peers import LOOPBACK, free_port, wait_for

pytestmark = pytest.mark.acceptance


def _scrape(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None  # not listening yet
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_a_worker_host_serves_its_metrics(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_tiny_model(models / "tiny-knee", num_classes=5, input_size=(96, 96))
    port = free_port()
    host = NodeProcess.create(
        tmp_path / "worker-host",
        models,
        peers={},
        destinations=[],  # results to the caller: no peer that only `serve` would register
        extra={"metrics": {"port": port}},
    )
    host.config_path.write_text(yaml.safe_dump(host.config))
    host.cli("db", "upgrade")
    worker = host.start_worker(1)
    try:
        wait_for(lambda: _scrape(port) is not None, 60, interval=0.5, what="worker metrics")
        figures = _scrape(port)
        assert figures is not None and figures["dicomnode_database_up"] == 1
        assert figures["process_resident_memory_bytes"] > 0
        assert worker.poll() is None  # still running: the endpoint is the worker's
    finally:
        stop_processes([worker])
    assert _scrape(port) is None  # gone with the worker
