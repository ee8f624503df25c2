"""iptables/ip6tables backend: a linear chain of ACCEPT rules, applied with
``iptables-restore --noflush`` (one batch per address family).

Layout per family, in table ``filter``::

    INPUT            -j WEBKNOCK                 (exactly once, at the top)
    WEBKNOCK         -j WEBKNOCK-GRANTS
                     [protect] offered ports: ESTABLISHED,RELATED accept, then DROP
    WEBKNOCK-GRANTS  -s ADDR/LEN -p PROTO -m PROTO --dport PORT -j ACCEPT   (one per grant)

LEN is 32 (128) for an address alone, shorter for a client's ``open_prefix`` network.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
from collections.abc import Iterable, Sequence

from webknock.server.firewall.base import Firewall, FirewallError, Runner, run_command
from webknock.server.grants import Entry, GrantKey

log = logging.getLogger(__name__)

Rule = tuple[str, ...]
_TOKEN = re.compile(r"[A-Za-z0-9_.:/,-]+")
_MULTIPORT_MAX = 15
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


def restore_line(op: str, chain: str, rule: Rule) -> str:
    """One line of an iptables-restore file from data; refuses anything not a plain token."""
    for token in (chain, *rule):
        if not _TOKEN.fullmatch(token):
            raise FirewallError(f"refusing unsafe token {token!r} in a rule")
    return " ".join((op, chain, *rule))


def restore_file(lines: Iterable[str]) -> str:
    """Wrap lines into a filter-table restore file."""
    return "*filter\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def chunks(ports: list[int], size: int = _MULTIPORT_MAX) -> list[list[int]]:
    return [ports[i : i + size] for i in range(0, len(ports), size)]


class IptablesFirewall(Firewall):
    """Linear-chain backend for iptables (legacy or nft flavour) and ip6tables."""

    name = "iptables"

    @classmethod
    def unusable(cls, runner: Runner = run_command) -> str | None:
        for tool in (*SAVE.values(), *RESTORE.values()):
            if shutil.which(tool) is None:
                return f"{tool} not found (apt-get install iptables)"
        return None

    @property
    def chain(self) -> str:
        return self.settings.chain

    @property
    def grants_chain(self) -> str:
        return f"{self.settings.chain}-GRANTS"

    # -- rules as data ----------------------------------------------------------------------

    def grant_rule(self, key: GrantKey) -> Rule:
        """The ACCEPT rule of one grant, exactly as iptables-save prints it back."""
        return (
            "-s",
            str(key.network),
            "-p",
            key.proto,
            "-m",
            key.proto,
            "--dport",
            str(key.port),
            "-j",
            "ACCEPT",
        )

    def grant_match_rules(self, family: int) -> list[Rule]:
        """The first rule(s) of the main chain: where grants are matched."""
        return [("-j", self.grants_chain)]

    def main_rules(self, family: int = 4) -> list[Rule]:
        """Contents of the main chain: the grant match, then the protect rules."""
        rules: list[Rule] = list(self.grant_match_rules(family))
        if self.settings.protect:
            for proto in ("tcp", "udp"):
                for group in chunks(self.settings.ports(proto)):
                    match = ("-p", proto, "-m", "multiport", "--dports", ",".join(map(str, group)))
                    rules.append(
                        (
                            *match,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "RELATED,ESTABLISHED",
                            "-j",
                            "ACCEPT",
                        )
                    )
                    rules.append((*match, "-j", "DROP"))
        return rules

    # -- kernel I/O -----------------------------------------------------------------------

    def restore(self, family: int, lines: list[str]) -> None:
        if lines:
            self.run([RESTORE[family], "-w", "10", "--noflush"], restore_file(lines))

    def saved(self, family: int) -> list[str]:
        """Lines of ``*-save -t filter`` (empty if the table does not exist yet)."""
        try:
            out = self.run([SAVE[family], "-t", "filter"])
        except FirewallError as exc:
            if "does not exist" in str(exc) or "Table does not exist" in str(exc):
                return []
            raise
        return out.splitlines()

    def _parse_grant(self, line: str) -> GrantKey | None:
        parts = line.split()
        if (
            len(parts) != 12
            or parts[:2] != ["-A", self.grants_chain]
            or parts[-2:] != ["-j", "ACCEPT"]
        ):
            return None
        try:
            net = ipaddress.ip_network(parts[3], strict=False)
            return GrantKey(net.network_address, parts[5], int(parts[9]), net.prefixlen)
        except ValueError:
            return None

    # -- interface --------------------------------------------------------------------------

    def ensure(self) -> None:
        for family in (4, 6):
            lines = self.saved(family)
            chains = {ln.split()[0][1:] for ln in lines if ln.startswith(":")}
            jumps = [ln for ln in lines if ln.split() == ["-A", "INPUT", "-j", self.chain]]
            batch = [
                f":{c} - [0:0]" for c in self.own_chains() if c != self.chain and c not in chains
            ]
            batch.append(f":{self.chain} - [0:0]")  # declared: flushed and rebuilt atomically
            batch += [restore_line("-A", self.chain, rule) for rule in self.main_rules(family)]
            if not jumps:
                batch.append(restore_line("-I", "INPUT", ("1", "-j", self.chain)))
            batch += [restore_line("-D", "INPUT", ("-j", self.chain))] * (len(jumps) - 1)
            for chain in self.retired_chains():  # ours, no longer referenced once rebuilt
                if chain in chains:
                    batch += [f"-F {chain}", f"-X {chain}"]
            self.restore(family, batch)

    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        # A linear chain has no timeouts: a renewal changes nothing in the kernel.
        done: list[int] = []
        for family in (4, 6):
            lines = [
                restore_line("-A", self.grants_chain, self.grant_rule(e.key))
                for e in sorted(add, key=lambda e: e.key)
                if e.key.family == family
            ]
            lines += [
                restore_line("-D", self.grants_chain, self.grant_rule(k))
                for k in sorted(remove)
                if k.family == family
            ]
            try:
                self.restore(family, lines)
            except FirewallError:
                for undo in done:  # keep all-or-nothing across the two families
                    self._undo(undo, add, remove)
                raise
            if lines:
                done.append(family)

    def _undo(self, family: int, add: Sequence[Entry], remove: Sequence[GrantKey]) -> None:
        lines = [
            restore_line("-D", self.grants_chain, self.grant_rule(e.key))
            for e in add
            if e.key.family == family
        ]
        lines += [
            restore_line("-A", self.grants_chain, self.grant_rule(k))
            for k in remove
            if k.family == family
        ]
        try:
            self.restore(family, lines)
        except FirewallError:
            pass  # reconcile on the next sync repairs what the undo could not

    def listed(self) -> list[GrantKey]:
        found: list[GrantKey] = []
        for family in (4, 6):
            for line in self.saved(family):
                key = self._parse_grant(line)
                if key is not None:
                    found.append(key)
        return found

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        self.ensure()
        for family in (4, 6):
            batch = [f":{self.grants_chain} - [0:0]"]  # flush and refill in one commit
            batch += [
                restore_line("-A", self.grants_chain, self.grant_rule(e.key))
                for e in sorted(entries, key=lambda e: e.key)
                if e.key.family == family
            ]
            self.restore(family, batch)

    def teardown(self) -> None:
        for family in (4, 6):
            lines = self.saved(family)
            chains = {ln.split()[0][1:] for ln in lines if ln.startswith(":")}
            batch = [
                restore_line("-D", "INPUT", ("-j", self.chain))
                for ln in lines
                if ln.split() == ["-A", "INPUT", "-j", self.chain]
            ]
            for chain in (self.chain, self.grants_chain):
                if chain in chains:
                    batch.append(f"-F {chain}")
            for chain in (self.chain, self.grants_chain):
                if chain in chains:
                    batch.append(f"-X {chain}")
            self.restore(family, batch)

    def census(self) -> tuple[dict[int, int], list[str]]:
        """A text-only census of ``*-save`` (a line count, about 10x cheaper than parsing
        every rule): grants per family, and a missing chain, hook or main-chain rule."""
        held = {4: 0, 6: 0}
        problems: list[str] = []
        main = self.chain
        for family in (4, 6):
            lines = self.saved(family)
            chains = {ln.split()[0][1:] for ln in lines if ln.startswith(":")}
            missing = [c for c in self.own_chains() if c not in chains]
            if missing:
                problems.append(f"IPv{family}: chain {', '.join(missing)} missing")
            hooks = sum(ln.split() == ["-A", "INPUT", "-j", main] for ln in lines)
            if hooks != 1:
                problems.append(f"IPv{family}: INPUT jumps to {main} {hooks} times, not once")
            body = [ln for ln in lines if ln.startswith(f"-A {main} ")]
            rules = self.main_rules(family)
            if len(body) != len(rules) or body[:1] != [restore_line("-A", main, rules[0])]:
                problems.append(f"IPv{family}: chain {main} does not hold its {len(rules)} rule(s)")
            held[family] = self.held_count(family, lines, problems)
        return held, problems

    def own_chains(self) -> tuple[str, ...]:
        """The chains this variant needs."""
        return (self.chain, self.grants_chain)

    def retired_chains(self) -> tuple[str, ...]:
        """Chains of ours that another variant used and this one removes."""
        return ()

    def held_count(self, family: int, saved: list[str], problems: list[str]) -> int:
        """Grants of one family, counted from the ``*-save`` lines."""
        return sum(ln.startswith(f"-A {self.grants_chain} ") for ln in saved)

    def describe(self) -> str:
        return f"iptables (linear chain {self.chain})"
