"""Which callers the SCP believes: a registered peer's AE title from its own host only."""

from __future__ import annotations

import pytest

from dicomnode.receive.scp import caller_matches


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
