"""Records shared by the daemon, the state file and the firewall backends."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOS = ("tcp", "udp")


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


@dataclass(frozen=True)
class GrantKey:
    """One opening: this address may connect to this proto/port."""

    ip: Address
    proto: str
    port: int

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise ValueError(f"proto must be tcp or udp, not {self.proto!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")

    @property
    def family(self) -> int:
        return self.ip.version

    def sort_key(self) -> tuple[int, int, str, int]:
        """Stable order across families (IPv4 first), for batches and listings."""
        return (self.ip.version, int(self.ip), self.proto, self.port)

    def __lt__(self, other: GrantKey) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.proto}/{self.port}"


@dataclass(frozen=True)
class Entry:
    """A grant as the firewall needs it: the key and its absolute expiry (Unix time)."""

    key: GrantKey
    expires: float

    def remaining(self, now: float) -> int:
        """Whole seconds left (at least 1, for kernels that need a positive timeout)."""
        return max(1, int(self.expires - now + 0.999))


@dataclass(frozen=True)
class Grant:
    """A grant as the state file records it."""

    key: GrantKey
    first_opened: float
    last_renewed: float
    expires: float
    renew_count: int = 0

    @property
    def entry(self) -> Entry:
        return Entry(self.key, self.expires)
