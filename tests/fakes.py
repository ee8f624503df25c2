"""Test doubles: an in-memory firewall and a recording command runner."""

from __future__ import annotations

from collections.abc import Sequence

from webknock.firewall.base import Firewall, FirewallError, FirewallSettings
from webknock.grants import Entry, GrantKey

SETTINGS = FirewallSettings(
    instance="webknock",
    chain="WEBKNOCK",
    tcp_ports=frozenset({22, 2222}),
    udp_ports=frozenset({51820}),
)


class MemoryFirewall(Firewall):
    """Holds grants in a dict like a kernel with timeouts; can be told to fail."""

    name = "memory"

    def __init__(self, settings: FirewallSettings = SETTINGS) -> None:
        super().__init__(settings)
        self.held: dict[GrantKey, float] = {}
        self.fail_apply = False
        self.fail_sync = False
        self.batches: list[tuple[list[Entry], list[Entry], list[GrantKey]]] = []
        self.ensured = 0

    @classmethod
    def unusable(cls, runner: object = None) -> str | None:
        return None

    def ensure(self) -> None:
        self.ensured += 1

    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        if self.fail_apply:
            raise FirewallError("injected apply failure")
        self.batches.append((list(add), list(renew), list(remove)))
        for e in [*add, *renew]:
            self.held[e.key] = e.expires
        for k in remove:
            self.held.pop(k, None)

    def listed(self) -> list[GrantKey]:
        return list(self.held)

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        if self.fail_sync:
            raise FirewallError("injected sync failure")
        self.held = {e.key: e.expires for e in entries}

    def teardown(self) -> None:
        self.held.clear()


class RecordingRunner:
    """Records (argv, stdin) and answers from a table of canned outputs."""

    def __init__(self, outputs: dict[str, str] | None = None, fail: str | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.outputs = outputs or {}
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        if self.fail and argv[0] == self.fail:
            raise FirewallError(f"{argv[0]} failed: injected")
        return self.outputs.get(argv[0], "")

    def stdin_of(self, program: str) -> list[str]:
        return [stdin or "" for argv, stdin in self.calls if argv[0] == program]
