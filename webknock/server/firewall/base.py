"""The one firewall interface every backend implements.

A backend turns grant changes (data) into one batch for the kernel: an
``iptables-restore --noflush`` file, an ``ipset restore`` file, or one
libnftables transaction. A failed :meth:`Firewall.apply` raises
:class:`FirewallError` and leaves the kernel as it was. ``ensure``, ``sync`` and
``teardown`` are idempotent instead: with iptables they are one batch per address family,
and a half-done one is completed by the next call (the daemon's self-repair check).
"""

from __future__ import annotations

import logging
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from webknock.server.grants import Entry, GrantKey

log = logging.getLogger(__name__)


class FirewallError(Exception):
    """A firewall command or batch failed; nothing of that batch was applied."""


class Runner(Protocol):
    """Runs one program with optional stdin and returns its stdout (raises FirewallError)."""

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str: ...


def run_command(argv: Sequence[str], stdin: str | None = None) -> str:
    """The real runner: no shell, bounded time, stderr folded into the error."""
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise FirewallError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise FirewallError(f"{argv[0]}: timed out after 60 s") from None
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split())[:400] or f"exit status {proc.returncode}"
        raise FirewallError(f"{argv[0]} failed: {detail}")
    return proc.stdout


@dataclass(frozen=True)
class FirewallSettings:
    """What a backend needs to know of the instance."""

    instance: str
    chain: str
    tcp_ports: frozenset[int]
    udp_ports: frozenset[int]
    protect: bool = False
    ipset: str = "auto"
    forward: bool = False  # the effective setting (forward.decide): guard DNAT'ed ports too

    def ports(self, proto: str) -> list[int]:
        return sorted(self.tcp_ports if proto == "tcp" else self.udp_ports)


class Firewall(ABC):
    """Interface: ensure our objects, apply a batch, list what the kernel holds, sync, teardown."""

    name: ClassVar[str]

    def __init__(self, settings: FirewallSettings, runner: Runner = run_command) -> None:
        self.settings = settings
        self.run = runner

    @classmethod
    @abstractmethod
    def unusable(cls, runner: Runner = run_command) -> str | None:
        """Why this backend cannot work on this host, or None when it can."""

    @classmethod
    def container_chain(cls, runner: Runner = run_command) -> str | None:
        """Evidence (one line) of a container runtime's chain this backend sees, such as
        Docker's DOCKER-USER, for ``forward = auto``; None when there is none."""
        return None

    def forward_held(self) -> bool | None:
        """Whether the kernel holds this instance's forward-path chain; None when it holds
        none of its objects (nothing set up yet)."""
        return None

    @abstractmethod
    def ensure(self) -> None:
        """Create our table/chains/sets and the hook or jump, idempotently; keep grants."""

    @abstractmethod
    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        """Apply one batch: open `add`, extend `renew`, close `remove`; all or nothing."""

    @abstractmethod
    def listed(self) -> list[GrantKey]:
        """Every grant the kernel holds in our objects (duplicates appear twice)."""

    @abstractmethod
    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        """Make the kernel hold exactly `entries` (reconcile), in one batch per family."""

    @abstractmethod
    def teardown(self) -> None:
        """Remove every object of ours (and only ours) from the kernel."""

    def describe(self) -> str:
        """One line for logs and `webknockctl status`."""
        return self.name

    @classmethod
    def build(cls, settings: FirewallSettings, runner: Runner = run_command) -> Firewall:
        """The instance to use for `settings` (a backend may pick a variant, e.g. ipset)."""
        return cls(settings, runner)

    def census(self) -> tuple[dict[int, int], list[str]]:
        """Grants the kernel holds per address family, and what is wrong with our objects.

        The default counts :meth:`listed`; a backend overrides it with a cheaper count that
        also checks its table, chains, sets and hook.
        """
        held = {4: 0, 6: 0}
        for key in self.listed():
            held[key.family] += 1
        return held, []
