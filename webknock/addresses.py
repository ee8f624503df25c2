"""Client addresses: parsing what a client, a proxy or the spool names, and which may be granted.

On every CGI request (the peer, the packet's `ip`): it imports nothing but ipaddress,
while the grant records (:mod:`webknock.grants`) are dataclasses, each costing a process
about a millisecond to build.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address:
    """Parse a client address; IPv4-mapped IPv6 (``::ffff:192.0.2.1``) becomes IPv4."""
    addr = ipaddress.ip_address(text.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def grantable(addr: Address) -> str | None:
    """Why `addr` may not be granted, or None if it may."""
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_multicast:
        return "multicast address"
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast address"
    return None
