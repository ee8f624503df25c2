"""Records shared by the daemon, the state file and the firewall backends (addresses are
:mod:`webknock.addresses`)."""

from __future__ import annotations

from dataclasses import dataclass

from webknock.addresses import Address

PROTOS = ("tcp", "udp")
#: Who asked for a grant, as the root side knows it (never read from the spool).
SOURCES = ("knock", "admin")


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
    client: str | None = None  # v2: the enrolled client that last opened or renewed it

    @property
    def entry(self) -> Entry:
        return Entry(self.key, self.expires)


@dataclass(frozen=True)
class GrantRequest:
    """A request to open `ports` for `ip`, decided by root: a verified knock or an admin."""

    id: str
    ip: Address
    ports: tuple[tuple[str, int], ...]
    time: int
    source: str = "knock"
    client: str | None = None  # v2: the enrolled client's name
    user_agent: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
