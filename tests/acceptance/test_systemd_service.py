"""The node as a systemd service (config/systemd/): `make service-files` renders the unit, the
settings and the admin wrapper; the unit verifies, and its own commands run the node from the
settings it was given, with its data in the state folder."""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomnode.config import load_settings
from dicomnode.testing.peers import free_port, wait_for

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("dicomnode.service", "dicomnode-backup.service", "dicomnode-backup.timer")


@dataclass(frozen=True)
class Rendered:
    unit: Path
    settings: Path
    state: Path
    wrapper: Path


def _render(base: Path) -> Rendered:
    """`make service-files` into ``base``, for the user running the tests (so that the
    wrapper runs the node directly, as it does for the service user)."""
    folders = {"UNIT_DIR": "units", "ETC_DIR": "etc", "STATE_DIR": "state", "ADMIN_BIN": "bin"}
    settings = [f"{name}={base / folder}" for name, folder in folders.items()]
    settings.append(f"SERVICE_USER={getpass.getuser()}")
    subprocess.run(
        ["make", "-s", "--no-print-directory", "service-files", *settings],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    (base / "state").mkdir(exist_ok=True)
    return Rendered(
        base / "units" / "dicomnode.service",
        base / "etc" / "dicomnode.yaml",
        base / "state",
        base / "bin" / "dicomnode",
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return _render(tmp_path_factory.mktemp("service"))


def _service_section(unit: Path) -> dict[str, list[str]]:
    """The [Service] section's settings, each key with its values in order."""
    section, values = "", dict[str, list[str]]()
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def _unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    """The test's environment without DICOMNODE_* variables, plus the unit's Environment=."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            name, value = word.split("=", 1)
            env[name] = value
    return env


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_the_rendered_unit_verifies_without_a_word(rendered: Rendered) -> None:
    """`systemd-analyze verify` fails on a missing executable and warns (exit 0) on an
    unknown key or a bad value: either would be printed."""
    units = [rendered.unit.with_name(name) for name in UNITS]
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    for unit in units:  # every folder filled in
        assert re.search(r"@[A-Z]+@", unit.read_text()) is None, unit.name


def test_the_service_settings_put_the_data_in_the_state_folder(rendered: Rendered) -> None:
    """The settings file is the example configuration with its three relative paths made
    absolute: the data and the database in the state folder, the checkout's models."""
    service = load_settings(rendered.settings, environ={})
    example = load_settings(ROOT / "config" / "dicomnode.yaml", environ={})
    assert service.storage.data_dir == rendered.state / "data"
    assert service.database.url == f"sqlite:///{rendered.state}/dicomnode.db"
    assert service.models.dir == ROOT / "models"
    moved = {"storage", "database", "models"}
    assert service.model_dump(exclude=moved) == example.model_dump(exclude=moved)
    assert oct(rendered.settings.stat().st_mode & 0o777) == "0o640"  # it may hold a password


def test_installing_again_keeps_the_administrators_settings(tmp_path: Path) -> None:
    first = _render(tmp_path)
    edited = first.settings.read_text().replace("ae_title: DICOMNODE", "ae_title: AI_NODE_7")
    first.settings.write_text(edited)
    first.unit.write_text("stale")
    again = _render(tmp_path)
    assert again.settings.read_text() == edited
    assert again.unit.read_text().startswith("# dicomnode as a systemd service")  # renewed


class NotifySocket:
    """systemd's end of ``Type=notify``: a datagram socket, read in a thread; each message
    with whether the node's port accepted a connection when it arrived."""

    def __init__(self, folder: Path, port: int) -> None:
        self.path = str(folder / "notify")
        self.port = port
        self.messages: list[tuple[str, bool]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((message, self._listening()))

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def said(self, message: str) -> int:
        return sum(1 for m, _ in self.messages if m == message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def test_the_units_commands_run_the_node_and_sigterm_stops_it(
    rendered: Rendered, tmp_path: Path
) -> None:
    """ExecStartPre makes the database in the state folder; ExecStart serves and, as
    ``Type=notify`` asks, says READY once its port accepts, pings the watchdog and says
    STOPPING; the admin wrapper reads the same node; KillSignal stops it cleanly within
    TimeoutStopSec."""
    service = _service_section(rendered.unit)
    assert service["Type"] == ["notify"]
    env = _unit_environment(service)
    port = free_port()
    env |= {"DICOMNODE_NODE__PORT": str(port), "DICOMNODE_WORKERS__COUNT": "1"}
    systemd = NotifySocket(tmp_path, port)
    env |= {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "1000000"}  # a ping each 0.5 s
    cwd = service["WorkingDirectory"][0]
    assert Path(cwd) == rendered.state
    (pre,) = service["ExecStartPre"]
    subprocess.run(shlex.split(pre), cwd=cwd, env=env, check=True, timeout=120)
    assert (rendered.state / "dicomnode.db").is_file()

    (start,) = service["ExecStart"]
    log = rendered.state / "serve.log"
    with log.open("wb") as out:
        node = subprocess.Popen(
            shlex.split(start), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: systemd.said("READY=1") == 1, 120, what="READY=1")
        assert systemd.messages[0] == ("READY=1", True)  # its port accepted by then
        health = subprocess.run(
            [str(rendered.wrapper), "health"], env=env, capture_output=True, text=True, timeout=120
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert str(port) in health.stdout
        status = subprocess.run(
            [str(rendered.wrapper), "status"], env=env, capture_output=True, text=True, timeout=120
        )
        assert status.returncode == 0, status.stderr
        wait_for(lambda: systemd.said("WATCHDOG=1") >= 2, 30, what="two watchdog pings")
    finally:
        kill = getattr(signal, service["KillSignal"][0])
        node.send_signal(kill)
        returncode = node.wait(timeout=float(service["TimeoutStopSec"][0]))
        time.sleep(0.5)
        systemd.close()
    assert returncode == 0, log.read_text()[-2000:]
    assert systemd.said("STOPPING=1") == 1
    assert (rendered.state / "data").is_dir()


def test_the_backup_units_command_copies_the_database(rendered: Rendered) -> None:
    """dicomnode-backup.service's own lines, on a database made by the node's ExecStartPre."""
    node = _service_section(rendered.unit)
    backup = _service_section(rendered.unit.with_name("dicomnode-backup.service"))
    env = _unit_environment(backup)
    cwd = backup["WorkingDirectory"][0]
    subprocess.run(shlex.split(node["ExecStartPre"][0]), cwd=cwd, env=env, check=True, timeout=120)
    for line in [*backup["ExecStartPre"], *backup["ExecStart"]]:
        subprocess.run(shlex.split(line), cwd=cwd, env=env, check=True, timeout=120)
    (copy,) = (rendered.state / "backups").glob("dicomnode-*.db")
    assert copy.stat().st_size > 0
