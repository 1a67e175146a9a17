"""Real peers on loopback for tests and the benchmark: free ports, a collecting SCP, a
STOW-RS service, Orthanc.

Nothing here is a mock: :class:`CollectingSCP` is a pynetdicom Storage SCP that
keeps what it receives, :class:`StowService` an HTTP server that reads STOW-RS
requests as DICOM and answers as a test tells it, :class:`TokenService` an OAuth 2.0
token endpoint that issues its tokens, :class:`Orthanc` runs the Debian
``Orthanc`` binary (and its DICOMweb plugin) with a generated configuration on free
loopback ports.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

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
    DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    """The DICOMweb plugin (Debian package ``orthanc-dicomweb``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: dict[str, tuple[str, int]] | None = None,
        extra: dict[str, Any] | None = None,
        dicomweb: bool = False,
        user: tuple[str, str] | None = None,
    ):
        self.workdir = workdir
        self.dicomweb = dicomweb
        """Load the DICOMweb plugin: STOW-RS at :attr:`dicomweb_url` ``/studies``."""
        self.user = user
        """HTTP basic authentication on: this user (name, password) only, the helpers too."""
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

    @property
    def dicomweb_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    @property
    def authorization(self) -> str:
        """The HTTP Authorization header value of :attr:`user` ("" without one)."""
        if self.user is None:
            return ""
        return "Basic " + base64.b64encode(":".join(self.user).encode()).decode()

    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        plugins = [str(Orthanc.DICOMWEB_PLUGIN)] if self.dicomweb else []
        return {
            "Name": "dicomnode-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.user is not None,
            "RegisteredUsers": dict([self.user]) if self.user else {},
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": plugins,
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
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
        if self.user is not None:
            request.add_header("Authorization", self.authorization)
        with urllib.request.urlopen(request, timeout=60) as response:
            data: bytes = response.read()
            return data

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: bytes | str) -> Any:
        raw = body.encode() if isinstance(body, str) else body
        return json.loads(self._request("POST", path, raw) or b"null")

    def metadata(self, instance_id: str, name: str) -> str:
        """An instance's metadata item (``Origin``: ``DicomProtocol``, ``RestApi``, ...)."""
        return self._request("GET", f"/instances/{instance_id}/metadata/{name}").decode()

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

    def export_study(self, study_id: str, target: Path) -> Path:
        """The study as Orthanc exports it (its ZIP archive, unpacked into ``target``)."""
        archive = self._request("GET", f"/studies/{study_id}/archive")
        with zipfile.ZipFile(io.BytesIO(archive)) as unpacked:
            unpacked.extractall(target)
        return target


@dataclass
class _HttpService:
    """An HTTP server on a loopback port, serving from :meth:`start` to :meth:`stop`."""

    ssl_context: Any = None
    """A server-side ``ssl.SSLContext``: the service then speaks https."""
    port: int = field(default_factory=free_port)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def origin(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{LOOPBACK}:{self.port}"

    def handler(self) -> type:
        """The request handler class of the service."""
        raise NotImplementedError

    def start(self) -> Self:
        from http.server import ThreadingHTTPServer

        server = ThreadingHTTPServer((LOOPBACK, self.port), self.handler())
        if self.ssl_context is not None:
            server.socket = self.ssl_context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class StowService(_HttpService):
    """A DICOMweb STOW-RS service on loopback (``POST /dicom-web/studies``) that keeps every
    instance it is sent, with the request's headers, and answers as :attr:`answer` says.

    ``answer(instances)`` returns (HTTP status, the DICOM JSON body or None); the default
    stores everything (200, every instance in the Referenced SOP Sequence). Requests with
    another ``Authorization`` header than :attr:`authorization` (when set) get 401.
    """

    authorization: str = ""
    answer: Callable[[list[Dataset]], tuple[int, dict[str, Any] | None]] | None = None
    qido: bool = True
    """Whether it answers QIDO-RS queries (False: 405, as a STOW-RS-only service)."""
    received: list[Dataset] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    """The headers of each request, in order."""

    @property
    def url(self) -> str:
        return f"{self.origin}/dicom-web"

    def handler(self) -> type:
        return _stow_handler(self)

    def take(self, instances: list[Dataset], headers: dict[str, str]) -> tuple[int, bytes]:
        """Record one request and what it sent; the answer's status and body."""
        with self._lock:
            self.requests.append(headers)
        if self.authorization and headers.get("Authorization") != self.authorization:
            return 401, b""
        status, body = (self.answer or stored_all)(instances)
        if 200 <= status < 300:
            stored = {uid for uid in _referenced(body)} if body is not None else None
            with self._lock:
                self.received.extend(
                    i for i in instances if stored is None or str(i.SOPInstanceUID) in stored
                )
        return status, b"" if body is None else json.dumps(body).encode()


@dataclass
class TokenService(_HttpService):
    """An OAuth 2.0 token endpoint on loopback (``POST /token``, the client credentials
    grant of RFC 6749 4.4) for one client, as Keycloak or Entra ID answer it.

    The client authenticates by HTTP Basic or in the form (either is taken); a wrong
    one gets 401 ``invalid_client``. Each grant issues a new token (``token-1``,
    ``token-2``, ...) that lives ``expires_in`` seconds (None: the answer has no
    ``expires_in``); :attr:`stow`, when set, then takes that token alone, as a service
    that checks the authorisation server's tokens would.
    """

    client_id: str = "dicomnode"
    client_secret: str = "s3cret:&=+"
    service_account: tuple[str, str] | None = None
    """``(client_email, public key PEM)`` of a service account whose signed assertions it
    takes (the JWT bearer grant of RFC 7523, as Google's token endpoint)."""
    expires_in: int | None = 300
    stow: StowService | None = None
    issued: list[str] = field(default_factory=list)
    requests: list[dict[str, str]] = field(default_factory=list)
    """Each request's form fields, and its Authorization header under ``Authorization``."""

    @property
    def url(self) -> str:
        return f"{self.origin}/token"

    def handler(self) -> type:
        return _token_handler(self)

    def grant(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        """Answer one token request: the HTTP status and the JSON body."""
        with self._lock:
            self.requests.append({**form, "Authorization": authorization})
        if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            refused = self._assertion_refused(form.get("assertion", ""))
            if refused:
                return 400, {"error": "invalid_grant", "error_description": refused}
            return self._issue()
        client = (form.get("client_id", ""), form.get("client_secret", ""))
        if authorization.startswith("Basic "):
            from urllib.parse import unquote_plus

            pair = base64.b64decode(authorization[6:]).decode()
            client = tuple(unquote_plus(part) for part in pair.split(":", 1))  # type: ignore[assignment]
        if client != (self.client_id, self.client_secret):
            return 401, {"error": "invalid_client", "error_description": "Invalid client"}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        return self._issue()

    def _assertion_refused(self, assertion: str) -> str:
        """Why a JWT bearer assertion is refused ("" when it is taken): signed by the
        account's key (RS256), issued by its email, for this endpoint, a scope, an hour."""
        import jwt

        if self.service_account is None:
            return "no service account here"
        email, public_key = self.service_account
        try:
            claims = jwt.decode(
                assertion, public_key, algorithms=["RS256"], audience=self.url, issuer=email
            )
        except jwt.PyJWTError as exc:
            return f"Invalid JWT: {exc}"
        if not claims.get("scope") or claims["exp"] - claims["iat"] > 3600:
            return "Invalid JWT: no scope, or longer than an hour"
        return ""

    def _issue(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            token = f"token-{len(self.issued) + 1}"
            self.issued.append(token)
        if self.stow is not None:
            self.stow.authorization = f"Bearer {token}"
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return 200, answer


def _token_handler(service: TokenService) -> type:
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qsl

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/token":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            form = dict(parse_qsl(body.decode("ascii")))
            status, answer = service.grant(form, self.headers.get("Authorization", ""))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def stored_all(instances: list[Dataset]) -> tuple[int, dict[str, Any]]:
    """A STOW-RS answer that every instance was stored (200, Referenced SOP Sequence)."""
    return 200, stow_response(stored=instances)


def stow_response(
    *,
    stored: Sequence[Dataset] = (),
    failed: Sequence[tuple[Dataset, int]] = (),
) -> dict[str, Any]:
    """A Store Instances Response (DICOM JSON): ``stored``, and ``failed`` with reasons."""
    response = Dataset()
    response.ReferencedSOPSequence = [_reference(i) for i in stored]
    items = []
    for instance, reason in failed:
        item = _reference(instance)
        item.FailureReason = reason
        items.append(item)
    response.FailedSOPSequence = items
    result: dict[str, Any] = response.to_json_dict()
    return result


def _reference(instance: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item


def _referenced(body: dict[str, Any]) -> list[str]:
    items = body.get("00081199", {}).get("Value", [])
    return [str(item.get("00081155", {}).get("Value", [""])[0]) for item in items]


def _stow_handler(service: StowService) -> type:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/dicom-web/studies":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            instances = _parts(self.headers.get("Content-Type", ""), body)
            status, answer = service.take(instances, dict(self.headers.items()))
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def do_GET(self) -> None:  # QIDO-RS: no study here, or 401 without the token
            if not service.qido:
                self.send_error(405)
                return
            wanted = service.authorization
            if wanted and self.headers.get("Authorization") != wanted:
                self.send_error(401)
                return
            if self.path.split("?")[0].rstrip("/") != "/dicom-web/studies":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def _parts(content_type: str, body: bytes) -> list[Dataset]:
    """The ``application/dicom`` parts of a ``multipart/related`` body, read."""
    from io import BytesIO

    from pydicom import dcmread

    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"')
    instances: list[Dataset] = []
    for part in body.split(f"--{boundary}".encode())[1:]:
        if part.startswith(b"--"):
            break
        _, _, payload = part.partition(b"\r\n\r\n")
        instances.append(dcmread(BytesIO(payload.removesuffix(b"\r\n"))))
    return instances
