"""iptables + ipset backend: one ``hash:ip,port`` set per address family, with timeouts.

Layout per family (sets ``<chain>4``/``<chain>6``, e.g. ``WEBKNOCK4``/``WEBKNOCK6``)::

    INPUT     -j WEBKNOCK                                              (once, at the top)
    WEBKNOCK  -m set --match-set WEBKNOCK4 src,dst -j ACCEPT
              [protect] offered ports: ESTABLISHED,RELATED accept, then DROP

Each element carries its remaining lifetime, so the kernel closes a grant on time even
with the daemon and cron dead. Changes go in as one ``ipset -exist restore`` file: ``add``
of an element that is there already replaces its timeout in place (no duplicate, no gap),
``del`` of one the kernel already expired is no error. A full sync fills a fresh set and
``swap``s it in, so the live set never passes through an empty state. ``ipset restore``
is not one transaction: when it fails half way, the engine's full sync repairs the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence

from webknock.addresses import parse_address
from webknock.firewall.base import FirewallError, Runner, run_command
from webknock.firewall.iptables import IptablesFirewall, Rule
from webknock.grants import Entry, GrantKey

IPSET = "ipset"
FAMILY = {4: "inet", 6: "inet6"}
MAXELEM = 1048576


def element(key: GrantKey) -> str:
    """``ADDR,PROTO:PORT`` as ``ipset save`` prints it."""
    return f"{key.ip},{key.proto}:{key.port}"


def parse_element(text: str) -> GrantKey | None:
    """The grant of an ``ipset save`` element, or None for anything else."""
    addr, _, rest = text.rpartition(",")
    proto, _, port = rest.partition(":")
    try:
        return GrantKey(parse_address(addr), proto, int(port))
    except ValueError:
        return None


class IpsetFirewall(IptablesFirewall):
    """iptables/ip6tables with one ipset per family instead of a rule per grant."""

    name = "iptables+ipset"

    @classmethod
    def unusable(cls, runner: Runner = run_command) -> str | None:
        why = super().unusable(runner)
        if why:
            return why
        if shutil.which(IPSET) is None:
            return "ipset not found (apt-get install ipset)"
        try:
            runner([IPSET, "list", "-n"])
        except FirewallError as exc:
            return f"ipset does not work here: {exc}"
        return None

    def set_name(self, family: int) -> str:
        return f"{self.settings.chain}{family}"

    def grant_match_rules(self, family: int) -> list[Rule]:
        return [("-m", "set", "--match-set", self.set_name(family), "src,dst", "-j", "ACCEPT")]

    def own_chains(self) -> tuple[str, ...]:
        return (self.chain,)

    # -- ipset I/O ----------------------------------------------------------------------------

    def create_line(self, name: str, family: int) -> str:
        return f"create {name} hash:ip,port family {FAMILY[family]} timeout 0 maxelem {MAXELEM}"

    def add_lines(self, name: str, entries: Iterable[Entry], now: float) -> list[str]:
        return [
            f"add {name} {element(e.key)} timeout {e.remaining(now)}"
            for e in sorted(entries, key=lambda e: e.key)
        ]

    def ipset_restore(self, lines: Sequence[str]) -> None:
        if lines:
            self.run([IPSET, "-exist", "restore"], "".join(f"{ln}\n" for ln in lines))

    def existing_sets(self) -> set[str]:
        return set(self.run([IPSET, "list", "-n"]).split())

    # -- interface ------------------------------------------------------------------------------

    def retired_chains(self) -> tuple[str, ...]:
        return (self.grants_chain,)  # left by the linear variant

    def ensure(self) -> None:
        self.ipset_restore([self.create_line(self.set_name(f), f) for f in (4, 6)])
        super().ensure()  # the sets exist before the rules that match them

    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        lines: list[str] = []
        for family in (4, 6):
            name = self.set_name(family)
            lines += self.add_lines(
                name, [e for e in [*add, *renew] if e.key.family == family], now
            )
            lines += [f"del {name} {element(k)}" for k in sorted(remove) if k.family == family]
        self.ipset_restore(lines)

    def listed(self) -> list[GrantKey]:
        found: list[GrantKey] = []
        for family in (4, 6):
            name = self.set_name(family)
            try:
                out = self.run([IPSET, "save", name])
            except FirewallError as exc:
                if "does not exist" in str(exc):
                    continue
                raise
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[:2] == ["add", name]:
                    key = parse_element(parts[2])
                    if key is not None:
                        found.append(key)
        return found

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        self.ensure()
        lines: list[str] = []
        for family in (4, 6):
            name, fresh = self.set_name(family), f"{self.set_name(family)}-new"
            lines += [self.create_line(fresh, family), f"flush {fresh}"]
            lines += self.add_lines(fresh, [e for e in entries if e.key.family == family], now)
            lines += [f"swap {fresh} {name}", f"destroy {fresh}"]
        self.ipset_restore(lines)

    def teardown(self) -> None:
        super().teardown()  # the rules that reference the sets go first
        have = self.existing_sets()
        names = [self.set_name(f) for f in (4, 6)] + [f"{self.set_name(f)}-new" for f in (4, 6)]
        self.ipset_restore([f"destroy {n}" for n in names if n in have])

    def held_count(self, family: int, saved: list[str], problems: list[str]) -> int:
        name = self.set_name(family)
        try:
            out = self.run([IPSET, "list", "-t", name])
        except FirewallError as exc:
            problems.append(f"IPv{family}: set {name} missing ({exc})")
            return 0
        for line in out.splitlines():
            if line.startswith("Number of entries:"):
                return int(line.split(":", 1)[1])
        problems.append(f"IPv{family}: cannot count the entries of set {name}")
        return 0

    def describe(self) -> str:
        return f"iptables+ipset (chain {self.chain}, sets {self.set_name(4)}/{self.set_name(6)})"
