"""The receiving transport: which callers are believed, and how PDUs are read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dicomnode.receive.callers import caller_matches


@pytest.mark.parametrize(
    ("host", "address", "matches"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", True),
        ("127.0.0.1", "::ffff:127.0.0.1", True),  # an IPv4 caller seen by an IPv6 socket
        ("10.255.255.1", "127.0.0.1", False),
        ("no-such-host.invalid", "127.0.0.1", False),
        ("127.0.0.1", "not an address", False),
    ],
)
def test_a_caller_matches_the_addresses_its_host_resolves_to(
    host: str, address: str, matches: bool
) -> None:
    assert caller_matches(host, address) is matches


def test_a_pdu_is_read_whole_or_as_far_as_the_connection_lasted() -> None:
    """The node's socket reads a PDU into one buffer (pynetdicom read 4 kB at a time): all
    of it, across many TCP segments, or what came before the peer closed, as pynetdicom."""
    import os
    import socket
    import threading

    from dicomnode.receive.transport import BoundedSocket

    payload = os.urandom(3 << 20)
    ours, theirs = socket.socketpair()
    reader = BoundedSocket.__new__(BoundedSocket)  # the socket, and an accepted request
    reader._assoc = SimpleNamespace(requestor=SimpleNamespace(primitive=object()))  # type: ignore[assignment]
    reader.socket = ours

    def send() -> None:
        theirs.sendall(payload)
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert reader._read(len(payload)) == payload
    assert reader._read(100) == b""  # closed: nothing more
    sender.join()
    ours.close()
    ours, theirs = socket.socketpair()
    reader.socket = ours
    theirs.sendall(b"0123456789")
    theirs.close()
    assert reader._read(100) == b"0123456789"
    ours.close()


def test_a_peer_host_is_looked_up_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    from dicomnode.receive import callers

    calls: list[str] = []
    real = socket.getaddrinfo

    def counting(host: str, *args: object, **kwargs: object) -> object:
        calls.append(host)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", counting)  # the module callers resolves with
    monkeypatch.setattr(callers, "_resolved", {})
    assert all(caller_matches("localhost", "127.0.0.1") for _ in range(5))
    assert calls == ["localhost"]
    monkeypatch.setattr(time, "monotonic", lambda: 1e12)  # a minute and more later
    assert caller_matches("localhost", "127.0.0.1")
    assert calls == ["localhost", "localhost"]
