"""Who is calling: a caller's address against the addresses a peer's host resolves to."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVED_SECONDS = 60.0
"""How long a peer host's resolved addresses are reused (one lookup a minute, not one per
association; a failed lookup is not kept)."""

_resolved: dict[str, tuple[float, frozenset[IpAddress]]] = {}
_resolved_lock = threading.Lock()


def caller_matches(host: str, address: str) -> bool:
    """True when ``address`` (the caller's IP) is one that ``host`` (a peer's registered IP
    or host name) resolves to; a name that does not resolve matches nothing."""
    caller = ip_of(address)
    return caller is not None and caller in _addresses(host)


def _addresses(host: str) -> frozenset[IpAddress]:
    now = time.monotonic()
    with _resolved_lock:
        kept = _resolved.get(host)
    if kept is not None and kept[0] > now:
        return kept[1]
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    addresses = frozenset(ip for info in found if (ip := ip_of(str(info[4][0]))) is not None)
    with _resolved_lock:
        _resolved[host] = (now + RESOLVED_SECONDS, addresses)
    return addresses


def ip_of(text: str) -> IpAddress | None:
    """``text`` as an IP address (an IPv4 address seen as IPv6 as itself), None if it is
    not one."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:10.0.0.5 is 10.0.0.5
    return mapped or ip
