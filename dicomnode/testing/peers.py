"""Real peers on loopback for tests and the benchmark: free ports, a collecting SCP, Orthanc.

Nothing here is a mock: :class:`CollectingSCP` is a pynetdicom Storage SCP that
keeps what it receives, :class:`Orthanc` runs the Debian ``Orthanc`` binary
with a generated configuration on free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import (
    AE,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def pynetdicom_receive_globals_restored() -> Iterator[None]:
    """Restore what :func:`dicomnode.receive.scp.receive_into` sets process-wide in pynetdicom.

    The node's SCP has pynetdicom write incoming data straight into its ``incoming``
    folder (chunked receiving and its own ``NamedTemporaryFile``). Left in place after a
    test, any later in-process SCP (a :class:`CollectingSCP`) would write into that
    test's folder.
    """
    chunked = _config.STORE_RECV_CHUNKED_DATASET
    temporary_file = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = chunked
        dimse_messages.NamedTemporaryFile = temporary_file  # type: ignore[attr-defined]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; :class:`TimeoutError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    def open_() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((LOOPBACK, port)) == 0

    wait_for(open_, timeout, what=f"port {port}")


@dataclass
class CollectingSCP:
    """A Storage SCP on loopback that keeps every dataset it receives."""

    ae_title: str = "COLLECTOR"
    port: int = field(default_factory=free_port)
    status: int = 0x0000
    accept_jpeg: bool = True
    """Accept JPEG Baseline besides the uncompressed syntaxes, as PACS do."""
    ssl_context: Any = None
    """A server-side ``ssl.SSLContext``: the collector then listens over DICOM TLS."""
    received: list[Dataset] = field(default_factory=list)
    commitment_requests: list[Dataset] = field(default_factory=list)
    """The Action Information of each storage commitment request (N-ACTION) received; the
    collector accepts them and reports nothing: a test reports as the PACS would."""
    arrivals: list[float] = field(default_factory=list)
    """``time.monotonic()`` of each received dataset, in the order of ``received``."""
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: evt.Event) -> int:
        if self.status == 0:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            with self._lock:
                self.received.append(dataset)
                self.arrivals.append(time.monotonic())
        return self.status

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        with self._lock:
            self.commitment_requests.append(event.action_information)  # type: ignore[attr-defined]
        return 0x0000, None

    def start(self) -> CollectingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StorageCommitmentPushModel)
        syntaxes = [*DEFAULT_TRANSFER_SYNTAXES, *([JPEGBaseline8Bit] if self.accept_jpeg else [])]
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        self._server = ae.start_server(
            (LOOPBACK, self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)],
            ssl_context=self.ssl_context,
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def sop_uids(self) -> list[str]:
        with self._lock:
            return [str(d.SOPInstanceUID) for d in self.received]


class Orthanc:
    """A real Orthanc server (Debian package ``orthanc``) on free loopback ports."""

    BINARY = "/usr/sbin/Orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, int]] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = modalities or {}
        self.extra = extra or {}
        """Configuration keys added to (or replacing) :meth:`config`'s, e.g. ``DicomTls*``."""
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(Orthanc.BINARY).exists() or shutil.which("Orthanc") is not None

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        return {
            "Name": "dicomnode-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "StableAge": 60,
            "LogExportedResources": False,
            "DicomScpTimeout": 30,
            "DicomModalities": {
                name: [aet, LOOPBACK, port] for name, (aet, port) in self.modalities.items()
            },
            **self.extra,
        }

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        binary = Orthanc.BINARY if Path(Orthanc.BINARY).exists() else "Orthanc"
        with (self.workdir / "orthanc.log").open("wb") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [binary, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for(self._alive, 60, what="Orthanc HTTP")
            wait_for_port(self.dicom_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {self.process.returncode}; see {self.workdir / 'orthanc.log'}"
            )
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    # REST helpers -------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data: bytes = response.read()
            return data

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: bytes | str) -> Any:
        raw = body.encode() if isinstance(body, str) else body
        return json.loads(self._request("POST", path, raw) or b"null")

    def upload(self, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/instances", path.read_bytes())
        return result

    def send_study(self, modality: str, study_id: str) -> Any:
        return self.post(
            f"/modalities/{modality}/store",
            json.dumps({"Resources": [study_id], "Synchronous": True}),
        )

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get(f"/studies/{study_id}/instances")
        return result

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return result

    def download(self, instance_id: str, target: Path) -> Path:
        target.write_bytes(self._request("GET", f"/instances/{instance_id}/file"))
        return target
