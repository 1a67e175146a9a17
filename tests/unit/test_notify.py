"""The sd_notify protocol as systemd's side of it receives it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.notify import Watchdog, notify


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd would listen, and its path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path


def test_a_message_reaches_the_socket_that_notify_socket_names(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    sock, path = systemd_socket
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert sock.recv(100) == b"READY=1"


def test_an_abstract_socket_is_reached_too() -> None:
    name = f"dicomnode-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_outside_systemd_or_without_its_socket_nothing_is_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert "cannot notify systemd (READY)" in caplog.text


def test_the_watchdog_pings_at_half_its_interval_and_only_for_this_process(
    systemd_socket: tuple[socket.socket, str],
) -> None:
    sock, path = systemd_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"}
    watchdog = Watchdog(env)
    assert watchdog.interval == 30.0
    watchdog.ping()
    watchdog.ping()  # within the half interval: not sent again
    assert sock.recv(100) == b"WATCHDOG=1"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    assert Watchdog({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).interval is None
    assert Watchdog({**env, "WATCHDOG_PID": str(os.getpid())}).interval == 30.0
    assert Watchdog({"NOTIFY_SOCKET": path}).interval is None
