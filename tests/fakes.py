"""Test doubles: an in-memory firewall, a recording command runner, and webknockd on the
in-memory firewall."""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable, Sequence

from webknock.config import ServerConfig
from webknock.server.engine import GrantEngine, Limits
from webknock.server.events import EventBus, Sink
from webknock.server.firewall.base import Firewall, FirewallError, FirewallSettings
from webknock.server.grants import Entry, GrantKey
from webknock.server.loop import Daemon
from webknock.server.state import StateStore
from webknock.spool.mount import WebIdentity, prepare_spool

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
    """Records (argv, stdin) and answers from a table of canned outputs, keyed by program
    (``ipset``) or by a longer command line (``ipset save WEBKNOCK4``): the longest key the
    command starts with answers."""

    def __init__(self, outputs: dict[str, str] | None = None, fail: str | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.outputs = outputs or {}
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        if self.fail and argv[0] == self.fail:
            raise FirewallError(f"{argv[0]} failed: injected")
        line = " ".join(argv)
        keys = [k for k in self.outputs if line == k or line.startswith(f"{k} ")]
        return self.outputs[max(keys, key=len)] if keys else ""

    def stdin_of(self, program: str) -> list[str]:
        return [stdin or "" for argv, stdin in self.calls if argv[0] == program]


def memory_daemon(
    cfg: ServerConfig,
    *sinks: Sink,
    clock: Callable[[], float] = time.time,
) -> tuple[Daemon, MemoryFirewall]:
    """webknockd for `cfg` (spool prepared, its limits) on an in-memory firewall; `sinks`
    get the engine's events."""
    web = pwd.getpwnam(cfg.web_user)
    prepare_spool(cfg.spool, web.pw_gid)
    fw = MemoryFirewall()
    limits = Limits(cfg.max_grants, cfg.max_grants_per_prefix)
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), fw, EventBus(*sinks), limits)
    identity = WebIdentity(cfg.web_user, web.pw_uid, web.pw_gid)
    return Daemon(cfg, engine, identity, clock), fw
