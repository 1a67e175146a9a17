"""The benchmark scenarios. Every comparison alternates its two sides within one run.

``receive``     dcmtk storescu -> dcmtk storescp (+B, max PDU 128 KiB) vs -> dicomnode SCP
                (fsync + database commit per instance), one sender and four concurrent.
``turnaround``  one-image studies sent one at a time: C-STORE start -> SR at the destination.
``burst``       many studies at once: time until every result is delivered, images/s,
                compared with a bare in-process loop over the same stages; peak RSS;
                the node's start-up (serve -> port open -> every worker running).

Every scenario with a node starts once its workers run (the bare loop's imports and model
loading are not timed either); the burst records how long that took.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from dicomnode.bench.data import SMALL, Study, all_files, make_studies
from dicomnode.config import Settings
from dicomnode.testing.node import NodeProcess, orthanc_and_node
from dicomnode.testing.peers import (
    LOOPBACK,
    CollectingSCP,
    Orthanc,
    free_port,
    wait_for,
    wait_for_port,
)

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
MAX_PDU = "131072"


def _storescu(port: int, aec: str, files: Sequence[Path]) -> subprocess.Popen[bytes]:
    command = [
        STORESCU,
        "-aet",
        "BENCH",
        "-aec",
        aec,
        "--max-pdu",
        MAX_PDU,
        LOOPBACK,
        str(port),
        *map(str, files),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def send(port: int, aec: str, files: Sequence[Path], senders: int = 1) -> float:
    """Seconds for ``senders`` storescu processes (an association each) to send ``files``."""
    chunks = [list(files[i::senders]) for i in range(senders)]
    start = time.perf_counter()
    processes = [_storescu(port, aec, chunk) for chunk in chunks if chunk]
    for process in processes:
        _, err = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


class StoreSCP:
    """dcmtk storescp writing to disk at its fastest settings."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            STORESCP,
            "--max-pdu",
            MAX_PDU,
            "+B",
            "-od",
            str(self.folder),
            "-aet",
            "STORESCP",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(30)
        shutil.rmtree(self.folder, ignore_errors=True)


def receive(workdir: Path, models: Path, count: int, rounds: int, senders: int) -> dict[str, Any]:
    """Files/s and MB/s of storescp and of the node, alternating, ``rounds`` each."""
    files = list(all_files(make_studies(workdir / "receive-data", count, 1)))
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    timings: dict[str, list[float]] = {"storescp": [], "dicomnode": []}
    for round_ in range(rounds):
        with StoreSCP(workdir / f"storescp-{round_}") as scp:
            timings["storescp"].append(send(scp.port, "STORESCP", files, senders))
        node = NodeProcess.create(
            workdir / f"node-receive-{round_}",
            models,
            peers={"BENCH": ("BENCH", 1)},
            destinations=[],
            extra={"workers": {"count": 0}},
        )
        node.start()
        try:
            timings["dicomnode"].append(send(node.port, "DICOMNODE", files, senders))
        finally:
            node.stop()
            shutil.rmtree(node.workdir, ignore_errors=True)
    shutil.rmtree(workdir / "receive-data", ignore_errors=True)
    median = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "instances": count,
        "megabytes": round(megabytes, 1),
        "senders": senders,
        "rounds": rounds,
        "seconds": timings,
        "files_per_s": {k: count / v for k, v in median.items()},
        "mb_per_s": {k: megabytes / v for k, v in median.items()},
        "ratio_node_over_storescp": median["storescp"] / median["dicomnode"],
    }


def default_runtime() -> dict[str, dict[str, Any]]:
    """Shipped defaults of the latency settings (the test helpers use faster ones)."""
    defaults = Settings()
    return {
        "study": defaults.study.model_dump(),
        "workers": defaults.workers.model_dump(),
        "send": defaults.send.model_dump(),
    }


def _node_with_collector(
    workdir: Path, models: Path, extra: dict[str, Any] | None = None
) -> tuple[NodeProcess, CollectingSCP]:
    collector = CollectingSCP(ae_title="DEST").start()
    node = NodeProcess.create(
        workdir,
        models,
        peers={"DEST": ("DEST", collector.port), "BENCH": ("BENCH", 1)},
        destinations=["DEST"],
        extra=extra,
    )
    for section, values in default_runtime().items():
        node.config[section].update(values)
    for section, values in (extra or {}).items():
        node.config.setdefault(section, {}).update(values)
    node.start()
    try:  # measured from here on: the node at work, as the bare loop (start-up is a figure)
        node.wait_for_workers()
    except BaseException:
        node.stop()
        collector.stop()
        raise
    return node, collector


def _first_arrival(
    collector: CollectingSCP, study_uid: str, sop_class: str, since: int
) -> float | None:
    for dataset, arrived in list(zip(collector.received, collector.arrivals, strict=True))[since:]:
        if str(dataset.StudyInstanceUID) == study_uid and str(dataset.SOPClassUID) == sop_class:
            return arrived
    return None


def _arrived(collector: CollectingSCP, study_uid: str, since: int) -> bool:
    return _first_arrival(collector, study_uid, SR_CLASS, since) is not None


def turnaround(workdir: Path, models: Path, studies: int) -> dict[str, Any]:
    """Median and p95 seconds from C-STORE start to SR (and SC) at the destination."""
    data = make_studies(workdir / "turnaround-data", studies + 1, 1)
    node, collector = _node_with_collector(workdir / "node-turnaround", models)
    sr_times: list[float] = []
    sc_times: list[float] = []
    try:
        for index, study in enumerate(data):
            seen = len(collector.received)
            start = time.monotonic()
            send(node.port, "DICOMNODE", study.files)
            arrived = functools.partial(_arrived, collector, study.study_uid, seen)
            wait_for(arrived, 300, interval=0.01, what="the SR")
            if index == 0:
                continue  # warm-up: the worker loads the model on its first job
            sr = _first_arrival(collector, study.study_uid, SR_CLASS, seen)
            sc = _first_arrival(collector, study.study_uid, "1.2.840.10008.5.1.4.1.1.7", seen)
            assert sr is not None
            sr_times.append(sr - start)
            if sc is not None:
                sc_times.append(sc - start)
    finally:
        node.stop()
        collector.stop()
    return {
        "studies": studies,
        "settle_seconds": Settings().study.settle_seconds,
        "sr_seconds": sr_times,
        "sc_seconds": sc_times,
        "sr_median": statistics.median(sr_times),
        "sr_p95": _p95(sr_times),
        "sc_median": statistics.median(sc_times) if sc_times else None,
    }


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _rss_mb(root: psutil.Process) -> float:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


def _role(process: psutil.Process, root: psutil.Process) -> str:
    """``main``, ``fork server``, ``worker`` or the process name, with its pid."""
    if process.pid == root.pid:
        return f"main {process.pid}"
    command = " ".join(process.cmdline())
    if "resource_tracker" in command:
        return f"resource tracker {process.pid}"
    if "forkserver" in command and process.ppid() == root.pid:
        return f"fork server {process.pid}"  # the workers are its children (same command line)
    return f"worker {process.pid}"


def _rss_by_process(root: psutil.Process, peaks: dict[str, float]) -> None:
    """Raise ``peaks[role pid]`` to each node process's current RSS in MB."""
    for process in [root, *root.children(recursive=True)]:
        try:
            key, rss = _role(process, root), process.memory_info().rss / 1e6
        except psutil.Error:
            continue
        peaks[key] = max(peaks.get(key, 0.0), rss)


def _pss_mb(root: psutil.Process) -> float:
    """Proportional set size of the process tree: shared pages counted once in all.

    The sum of RSS counts the libraries that every worker maps (torch's are
    hundreds of MB) once per process; PSS splits each shared page among the
    processes that map it, so the sum is the memory the node really holds.
    """
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):
            continue
    return total / 1e6


def burst(workdir: Path, models: Path, studies: int, per_study: int) -> dict[str, Any]:
    """All studies sent at once (4 senders): seconds until every SC and SR arrived, peak RSS."""
    data: list[Study] = make_studies(workdir / "burst-data", studies, per_study)
    files = list(all_files(data))
    node, collector = _node_with_collector(workdir / "node-burst", models)
    startup = {"port": node.port_seconds, "workers": time.monotonic() - node.started_at}
    expected = len(files) + len(data)
    peak = peak_pss = 0.0
    per_process: dict[str, float] = {}
    try:
        assert node.process is not None
        root = psutil.Process(node.process.pid)
        start = time.monotonic()
        send(node.port, "DICOMNODE", files, senders=4)
        while len(collector.received) < expected:
            peak = max(peak, _rss_mb(root))
            peak_pss = max(peak_pss, _pss_mb(root))
            _rss_by_process(root, per_process)
            if time.monotonic() - start > 1800:
                raise TimeoutError("burst did not finish in 30 minutes")
            time.sleep(0.2)
        seconds = max(collector.arrivals) - start
        after = _rss_mb(root)
    finally:
        node.stop()
        collector.stop()
    return {
        "studies": studies,
        "images": len(files),
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "peak_rss_mb": peak,
        "peak_pss_mb": peak_pss,
        "peak_rss_mb_by_process": per_process,
        "rss_after_mb": after,
        "startup_seconds": startup,
    }


def _wait_for_srs(collector: CollectingSCP, count: int, timeout: float) -> None:
    def enough() -> bool:
        return sum(str(d.SOPClassUID) == SR_CLASS for d in list(collector.received)) >= count

    wait_for(enough, timeout, interval=0.2, what=f"{count} SRs")


def soak(workdir: Path, models: Path, images: int, checkpoint: int = 100) -> dict[str, Any]:
    """Small one-image studies through one node: RSS after ``checkpoint`` images and at the end."""
    data = make_studies(workdir / "soak-data", images, 1, sizes=SMALL)
    node, collector = _node_with_collector(workdir / "node-soak", models)
    try:
        assert node.process is not None
        root = psutil.Process(node.process.pid)
        first = [s.files[0] for s in data[:checkpoint]]
        send(node.port, "DICOMNODE", first)
        _wait_for_srs(collector, len(first), 1800)
        at_checkpoint = _rss_mb(root)
        send(node.port, "DICOMNODE", [s.files[0] for s in data[checkpoint:]], senders=2)
        _wait_for_srs(collector, len(data), 3600)
        at_end = _rss_mb(root)
    finally:
        node.stop()
        collector.stop()
        shutil.rmtree(workdir / "soak-data", ignore_errors=True)
    return {
        "images": images,
        "checkpoint": checkpoint,
        "rss_at_checkpoint_mb": at_checkpoint,
        "rss_at_end_mb": at_end,
        "growth": at_end / at_checkpoint - 1,
    }


def _orthanc_has_sr(orthanc: Orthanc, study_id: str) -> bool:
    return any(
        orthanc.instance_tags(i["ID"]).get("SOPClassUID") == SR_CLASS
        for i in orthanc.study_instances(study_id)
    )


def pacs_turnaround(workdir: Path, models: Path, studies: int) -> dict[str, Any]:
    """Orthanc sends a one-image study to the node; seconds until Orthanc has stored the SR."""
    orthanc, node = orthanc_and_node(workdir / "pacs", models, extra=default_runtime())
    times: list[float] = []
    try:
        node.start()
        ids = [
            orthanc.upload(s.files[0])["ParentStudy"]
            for s in make_studies(workdir / "pacs-data", studies + 1, 1)
        ]
        for index, study_id in enumerate(ids):
            start = time.monotonic()
            orthanc.send_study("dicomnode", study_id)
            wait_for(
                functools.partial(_orthanc_has_sr, orthanc, study_id), 300, interval=0.05, what="SR"
            )
            if index:  # the first study warms the worker up (model load)
                times.append(time.monotonic() - start)
    finally:
        node.stop()
        orthanc.stop()
    return {
        "studies": studies,
        "sr_seconds": times,
        "sr_median": statistics.median(times),
        "sr_p95": _p95(times),
    }
