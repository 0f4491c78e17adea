"""Who a request's client is, for the limit on refused payments: its peer, or from a trusted
proxy the rightmost X-Forwarded-For address that is not one (the left part is the client's to
forge); anything that is not an address ends the walk. IPv6 clients are keyed by their /64."""

from __future__ import annotations

import ipaddress

import pytest

from drain_provider.api.clients import client_address, limit_key
from drain_provider.config import LOOPBACK_NETWORKS

PROXIES = (*LOOPBACK_NETWORKS, ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.7", None, "203.0.113.7"),
        ("203.0.113.7", "198.51.100.1", "203.0.113.7"),  # not a proxy of ours: its header is ignored
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the left part is the client's to forge
        ("127.0.0.1", "198.51.100.1, 10.1.2.3", "198.51.100.1"),  # through two proxies of ours
        ("127.0.0.1", "10.9.9.9, 10.1.2.3", "10.9.9.9"),  # all proxies: the leftmost
        ("127.0.0.1", "garbage, 198.51.100.1", "198.51.100.1"),
        ("127.0.0.1", "198.51.100.1, garbage", "127.0.0.1"),  # the last good address stands
        ("127.0.0.1", "\udcff\udcfe", "127.0.0.1"),
        ("127.0.0.1", " 2001:db8::1 ", "2001:db8::1"),
        ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),  # v4-mapped peers are v4
        ("not an address", "198.51.100.1", None),
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str | None) -> None:
    address = client_address(peer, forwarded, PROXIES)
    assert (str(address) if address is not None else None) == client


def test_no_trusted_proxies() -> None:
    assert str(client_address("127.0.0.1", "198.51.100.1", ())) == "127.0.0.1"


def test_a_long_forwarded_for_is_read_from_its_right_end() -> None:
    forwarded = ", ".join(["10.0.0.1"] * 10_000 + ["198.51.100.1"])
    assert str(client_address("127.0.0.1", forwarded, PROXIES)) == "198.51.100.1"


def test_limit_keys() -> None:
    assert limit_key(ipaddress.ip_address("198.51.100.1")) == "198.51.100.1"
    v6 = limit_key(ipaddress.ip_address("2001:db8:1:2:aaaa::1"))
    assert v6 == limit_key(ipaddress.ip_address("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
    assert limit_key(None) == "unknown"
