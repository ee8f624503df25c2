"""Records shared by the daemon, the state file and the firewall backends (addresses are
:mod:`webknock.addresses`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from webknock.addresses import Address, Network, full_length, parse_opened

PROTOS = ("tcp", "udp")
#: Who asked for a grant, as the root side knows it (never read from the spool).
SOURCES = ("knock", "admin")


@dataclass(frozen=True)
class GrantKey:
    """One opening: this address, or this network, may connect to this proto/port.

    `prefixlen` None: the address `ip` alone. A length (1-31 for IPv4, 1-127 for IPv6): the
    network of that length whose network address is `ip` (a client's ``open_prefix``);
    host bits must be zero, and a full length (32, 128) is the address alone, so that
    one opening has exactly one key.
    """

    ip: Address
    proto: str
    port: int
    prefixlen: int | None = None

    def __post_init__(self) -> None:
        if self.proto not in PROTOS:
            raise ValueError(f"proto must be tcp or udp, not {self.proto!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.prefixlen is None:
            return
        full = full_length(self.ip.version)
        if not 1 <= self.prefixlen <= full:
            raise ValueError(f"prefix length {self.prefixlen} out of range 1-{full}")
        if self.prefixlen == full:
            object.__setattr__(self, "prefixlen", None)
            return
        net = ipaddress.ip_network((self.ip, self.prefixlen), strict=False)
        if net.network_address != self.ip:
            raise ValueError(f"{self.ip}/{self.prefixlen} has host bits set")

    @classmethod
    def covering(cls, addr: Address, proto: str, port: int, prefixlen: int | None) -> GrantKey:
        """The key that opens `addr`'s network of `prefixlen` (None: `addr` alone)."""
        if prefixlen is None:
            return cls(addr, proto, port)
        net = ipaddress.ip_network((addr, prefixlen), strict=False)
        return cls(net.network_address, proto, port, prefixlen)

    @classmethod
    def parse(cls, opened: str, proto: str, port: int) -> GrantKey:
        """From :attr:`ip_text` (``192.0.2.10``, ``198.51.100.0/24``); raises ValueError."""
        addr, prefixlen = parse_opened(opened)
        return cls(addr, proto, port, prefixlen)

    @property
    def family(self) -> int:
        return self.ip.version

    @property
    def length(self) -> int:
        """The prefix length opened: 32 or 128 for an address alone."""
        return full_length(self.ip.version) if self.prefixlen is None else self.prefixlen

    @property
    def network(self) -> Network:
        """What is opened, as a network (a /32 or /128 for an address alone)."""
        return ipaddress.ip_network((self.ip, self.length))

    @property
    def ip_text(self) -> str:
        """The address (``192.0.2.10``) or network (``198.51.100.0/24``) opened."""
        return str(self.ip) if self.prefixlen is None else f"{self.ip}/{self.prefixlen}"

    def overlaps(self, net: Network) -> bool:
        """Whether some address of `net` is opened by this key (for revoke)."""
        return self.network.version == net.version and self.network.overlaps(net)

    def sort_key(self) -> tuple[int, int, int, str, int]:
        """Stable order across families (IPv4 first), for batches and listings."""
        return (self.ip.version, int(self.ip), self.length, self.proto, self.port)

    def __lt__(self, other: GrantKey) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        host = f"[{self.ip_text}]" if self.ip.version == 6 else self.ip_text
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
    client: str | None = None  # v2: the enrolled client that last opened or renewed it

    @property
    def entry(self) -> Entry:
        return Entry(self.key, self.expires)


@dataclass(frozen=True)
class GrantRequest:
    """A request to open `ports` for `ip`, decided by root: a verified knock or an admin.

    `prefixlen`: open `ip`'s network of that length instead (a v2 client's ``open_prefix``);
    `ip` stays the address the request came from."""

    id: str
    ip: Address
    ports: tuple[tuple[str, int], ...]
    time: int
    source: str = "knock"
    client: str | None = None  # v2: the enrolled client's name
    user_agent: str = ""
    prefixlen: int | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        full = full_length(self.ip.version)
        if self.prefixlen is not None and not 1 <= self.prefixlen <= full:
            raise ValueError(f"prefix length {self.prefixlen} out of range 1-{full}")

    def key(self, proto: str, port: int) -> GrantKey:
        """The grant this request opens for one port."""
        return GrantKey.covering(self.ip, proto, port, self.prefixlen)

    @property
    def opened(self) -> str:
        """What it opens: the address, or its network (``198.51.100.0/24``)."""
        if self.prefixlen is None or self.prefixlen == full_length(self.ip.version):
            return str(self.ip)
        return str(ipaddress.ip_network((self.ip, self.prefixlen), strict=False))
