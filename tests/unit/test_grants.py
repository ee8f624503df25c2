"""Grant keys: an address alone or a network (a client's open_prefix), one key per opening."""

from __future__ import annotations

import ipaddress

import pytest

from webknock.addresses import parse_opened, prefix_of
from webknock.server.grants import GrantKey, GrantRequest

ip = ipaddress.ip_address


def test_a_network_key_is_its_network_address_and_length() -> None:
    key = GrantKey.covering(ip("198.51.100.7"), "tcp", 22, 24)
    assert key == GrantKey(ip("198.51.100.0"), "tcp", 22, 24)
    assert key.ip_text == "198.51.100.0/24" and str(key) == "198.51.100.0/24:tcp/22"
    assert key.network == ipaddress.ip_network("198.51.100.0/24") and key.length == 24
    six = GrantKey.covering(ip("2001:db8:5::abcd"), "udp", 51820, 64)
    assert str(six) == "[2001:db8:5::/64]:udp/51820"
    assert GrantKey.parse("2001:db8:5::/64", "udp", 51820) == six
    assert hash(six) == hash(GrantKey.parse(six.ip_text, "udp", 51820))


def test_a_full_length_is_the_address_alone() -> None:
    alone = GrantKey(ip("192.0.2.10"), "tcp", 22)
    assert GrantKey(ip("192.0.2.10"), "tcp", 22, 32) == alone
    assert GrantKey.covering(ip("192.0.2.10"), "tcp", 22, None) == alone
    assert GrantKey.parse("192.0.2.10/32", "tcp", 22) == alone
    assert alone.prefixlen is None and alone.ip_text == "192.0.2.10" and alone.length == 32
    assert GrantKey(ip("2001:db8::10"), "tcp", 22, 128).prefixlen is None


@pytest.mark.parametrize(
    ("addr", "length"), [("198.51.100.7", 24), ("198.51.100.0", 0), ("198.51.100.0", 33)]
)
def test_host_bits_or_a_length_out_of_range_are_refused(addr: str, length: int) -> None:
    with pytest.raises(ValueError):
        GrantKey(ip(addr), "tcp", 22, length)


def test_parse_opened() -> None:
    assert parse_opened("192.0.2.10") == (ip("192.0.2.10"), None)
    assert parse_opened("::ffff:192.0.2.10") == (ip("192.0.2.10"), None)
    assert parse_opened("2001:db8::/48") == (ip("2001:db8::"), 48)
    with pytest.raises(ValueError):
        parse_opened("198.51.100.7/24")


def test_order_and_overlap() -> None:
    net = GrantKey(ip("198.51.100.0"), "tcp", 22, 24)
    inner = GrantKey(ip("198.51.100.7"), "tcp", 22)
    six = GrantKey(ip("2001:db8::"), "tcp", 22, 64)
    assert sorted([six, inner, net]) == [net, inner, six]
    assert net.overlaps(ipaddress.ip_network("198.51.100.7/32"))
    assert net.overlaps(ipaddress.ip_network("198.51.0.0/16"))
    assert not inner.overlaps(ipaddress.ip_network("198.51.100.8/29"))
    assert not net.overlaps(ipaddress.ip_network("::/0")), "never across families"


def test_a_request_opens_its_network_and_is_counted_under_it() -> None:
    req = GrantRequest("r", ip("198.51.100.7"), (("tcp", 22),), 60, prefixlen=24)
    assert req.key("tcp", 22) == GrantKey(ip("198.51.100.0"), "tcp", 22, 24)
    assert req.opened == "198.51.100.0/24"
    assert GrantRequest("r", ip("198.51.100.7"), (), 60, prefixlen=32).opened == "198.51.100.7"
    assert prefix_of(req.ip, req.prefixlen) == "198.51.100.0/24"
    assert prefix_of(ip("2001:db8::7"), 96) == "2001:db8::/64", "never narrower than a /64"
    assert prefix_of(ip("2001:db8::7"), 48) == "2001:db8::/48"
    with pytest.raises(ValueError):
        GrantRequest("r", ip("198.51.100.7"), (("tcp", 22),), 60, prefixlen=40)
