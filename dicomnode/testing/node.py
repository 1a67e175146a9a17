"""Run a real ``dicomnode serve`` process with a generated configuration (tests, benchmark)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dicomnode.config import Settings, load_settings
from dicomnode.testing.peers import LOOPBACK, Orthanc, free_port, wait_for, wait_for_port

WORKER_STARTED = re.compile(r"worker \S+ started")
"""The line each worker logs when it enters its loop (:meth:`dicomnode.worker.Worker.run`)."""


def node_config(
    workdir: Path,
    models_dir: Path,
    *,
    port: int,
    peers: dict[str, tuple[str, int]],
    destinations: list[str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete settings mapping for a node under ``workdir``."""
    config: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": LOOPBACK, "port": port},
        "storage": {"data_dir": str(workdir / "data"), "min_free_mb": 50},
        "database": {"url": f"sqlite:///{workdir / 'dicomnode.db'}"},
        "peers": {
            name: {"ae_title": aet, "host": LOOPBACK, "port": p} for name, (aet, p) in peers.items()
        },
        "results": {"destinations": destinations},
        "study": {"settle_seconds": 0.5},
        "workers": {
            "count": 1,
            "batch_size": 4,
            "device": "cpu",
            "lease_seconds": 6,
            "poll_seconds": 0.1,
        },
        "send": {
            "max_attempts": 5,
            "backoff_initial_seconds": 1,
            "backoff_max_seconds": 4,
            "timeout_seconds": 10,
        },
        "models": {"dir": str(models_dir)},
        "logging": {"level": "INFO"},
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    return config


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for an in-process node under ``tmp_path`` (fast polling, short back-off)."""
    data: dict[str, Any] = {
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
        "models": {"dir": str(tmp_path / "models")},
        "study": {"settle_seconds": 0.2},
        "workers": {"device": "cpu", "lease_seconds": 5, "poll_seconds": 0.05},
        "send": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1, "timeout_seconds": 5},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_settings(None, environ={}, overrides=data)


class NodeProcess:
    """``dicomnode serve`` in a subprocess; its log is ``workdir/node.log``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.port = int(config["node"]["port"])
        self.config_path = workdir / "dicomnode.yaml"
        self.log_path = workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.port_seconds = 0.0
        self._log_offset = 0

    @classmethod
    def create(
        cls,
        workdir: Path,
        models_dir: Path,
        *,
        peers: dict[str, tuple[str, int]],
        destinations: list[str],
        extra: dict[str, Any] | None = None,
        port: int | None = None,
    ) -> NodeProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        config = node_config(
            workdir,
            models_dir,
            port=port or free_port(),
            peers=peers,
            destinations=destinations,
            extra=extra,
        )
        return cls(workdir, config)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dicomnode --config <ours> ARGS`` and return the finished process."""
        return subprocess.run(
            self._command(*args),
            capture_output=True,
            text=True,
            check=check,
            timeout=300,
            env=self._env(),
        )

    def _command(self, *args: str) -> list[str]:
        """``python -m dicomnode.cli --config <ours> ARGS``."""
        return [sys.executable, "-m", "dicomnode.cli", "--config", str(self.config_path), *args]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> NodeProcess:
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.cli("db", "upgrade")
        command = self._command("serve")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, timeout=60)
            tls_port = int(self.config.get("tls", {}).get("port") or 0)
            if tls_port:  # the TLS listener starts just after the plain one
                wait_for_port(tls_port, timeout=60)
        except BaseException:
            self.stop()
            raise
        self.port_seconds = time.monotonic() - self.started_at
        return self

    def wait_for_workers(self, count: int | None = None, timeout: float = 120.0) -> float:
        """Wait until ``count`` workers (default: the configured ``workers.count``) of this
        start have logged that they run; the seconds from :meth:`start` until then.

        The listener opens before the fork server has imported torch, so a node whose
        port is open may still be seconds away from analysing anything.
        """
        wanted = int(self.config.get("workers", {}).get("count", 2)) if count is None else count

        def running() -> bool:
            since_start = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
            return len(WORKER_STARTED.findall(since_start)) >= wanted

        wait_for(running, timeout, interval=0.1, what=f"{wanted} worker(s) of the node")
        return time.monotonic() - self.started_at

    def start_worker(self, count: int = 1) -> subprocess.Popen[bytes]:
        """``dicomnode worker --count COUNT`` on this node's configuration (a worker host)."""
        return subprocess.Popen(
            self._command("worker", "--count", str(count)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._env(),
        )

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes: the fork server's children (see dicomnode.service)."""
        assert self.process is not None
        import psutil

        pids = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                forked = child.ppid() != self.process.pid  # not the fork server itself
                if forked and child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
            except psutil.Error:
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL the node and every process it started (a power cut, as far as it can tell)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM every process, then SIGKILL those still running after ``timeout`` seconds."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def orthanc_and_node(
    workdir: Path, models_dir: Path, extra: dict[str, Any] | None = None
) -> tuple[Orthanc, NodeProcess]:
    """A started Orthanc that knows the node as modality ``dicomnode``, and a node (not
    started yet) that sends its results to that Orthanc as peer ``PACS``."""
    node_port = free_port()
    orthanc = Orthanc(workdir / "orthanc", modalities={"dicomnode": ("DICOMNODE", node_port)})
    orthanc.start()
    try:
        node = NodeProcess.create(
            workdir / "node",
            models_dir,
            peers={"PACS": ("ORTHANC", orthanc.dicom_port)},
            destinations=["PACS"],
            extra=extra,
            port=node_port,
        )
    except BaseException:
        orthanc.stop()
        raise
    return orthanc, node
