"""Client addresses: parsing what a client, a proxy or the spool names, which may be
granted, and the prefix an address is counted under (throttle, grant limits)."""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


#: Addresses are counted per prefix: an IPv4 address alone, an IPv6 /64 (one site or
#: device, whose privacy addresses change within it).
PREFIX_LENGTH = {4: 32, 6: 64}


def prefix_of(addr: Address, length: int | None = None) -> str:
    """The prefix `addr` is counted under, as text (``192.0.2.10/32``, ``2001:db8::/64``).

    `length`: `addr` stands for its network of that length (a network grant), which is
    counted under the wider of that network and the usual prefix (``198.51.100.0/24``)."""
    bits = PREFIX_LENGTH[addr.version]
    if length is not None:
        bits = min(bits, length)
    cls = ipaddress.IPv4Network if addr.version == 4 else ipaddress.IPv6Network
    return str(cls((addr.packed, bits), strict=False))


def full_length(version: int) -> int:
    """The prefix length of one address alone: 32 or 128."""
    return 32 if version == 4 else 128


def parse_opened(text: str) -> tuple[Address, int | None]:
    """What a grant opens, as the state file, the kernel and the audit trail write it: an
    address (``192.0.2.10``: (address, None)) or a network (``198.51.100.0/24``: (its
    network address, 24)); a /32 or /128 is the address alone. Raises ValueError, also for
    a network with host bits set (the text is never ambiguous)."""
    if "/" not in text:
        return parse_address(text), None
    net = ipaddress.ip_network(text.strip(), strict=True)
    if net.prefixlen == full_length(net.version):
        return net.network_address, None
    return net.network_address, net.prefixlen


class AddressError(ValueError):
    """The client address cannot be told; `status` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def client_address(remote: str, forwarded: str, trusted: tuple[Network, ...]) -> Address:
    """REMOTE_ADDR, or the last untrusted X-Forwarded-For hop when the peer is a trusted
    proxy. Raises AddressError: 500 for an unusable REMOTE_ADDR (the web server's fault),
    400 for a malformed X-Forwarded-For from a trusted proxy."""
    try:
        if "%" in remote:  # an IPv6 scope means nothing to a firewall rule
            raise ValueError(remote)
        addr = parse_address(remote)
    except ValueError:
        raise AddressError(500, f"REMOTE_ADDR {remote[:60]!r} unusable") from None
    hops = [h.strip() for h in forwarded.split(",") if h.strip()] if trusted else []
    while hops and any(addr in net for net in trusted):
        try:
            hop = hops.pop()
            if "%" in hop:  # an IPv6 scope means nothing off this host
                raise ValueError(hop)
            addr = parse_address(hop)
        except ValueError:
            raise AddressError(400, "malformed X-Forwarded-For from a trusted proxy") from None
    return addr
