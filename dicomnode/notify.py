"""Telling systemd how ``serve`` stands: the sd_notify protocol, one datagram to the socket
that systemd names in ``$NOTIFY_SOCKET`` (``Type=notify`` units).

``READY=1`` once the listeners accept and the workers are started (units ordered after the
node wait until then, and ``systemctl start`` returns then); ``WATCHDOG=1`` from the scheduler
loop at half of ``$WATCHDOG_USEC`` (the unit's ``WatchdogSec``: systemd restarts a node whose
loop stops); ``STOPPING=1`` when a stop begins. Outside systemd the variables are unset and
every call does nothing. The protocol is a few lines; the libraries that speak it either
need libsystemd's headers to build (systemd-python) or are unmaintained (sdnotify).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to systemd; False (and nothing sent) outside a ``Type=notify`` unit
    or when the socket cannot be reached (logged: the node goes on)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", message.split("=")[0], exc.strerror)
        return False
    return True


class Watchdog:
    """Pings systemd's watchdog at half its interval, when the unit has one for this process
    (``$WATCHDOG_USEC``, and ``$WATCHDOG_PID`` when set naming this process)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ = env
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        mine = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last = float("-inf")

    def ping(self) -> None:
        """Tell systemd the node is alive, at most once per half interval."""
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            notify("WATCHDOG=1", self._environ)
            self._last = now
