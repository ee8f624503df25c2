"""iptables/ip6tables backend: a linear chain of ACCEPT rules, applied with
``iptables-restore --noflush`` (one batch per address family).

Layout per family, in table ``filter``::

    INPUT            -j WEBKNOCK                 (exactly once, at the top)
    WEBKNOCK         -j WEBKNOCK-GRANTS
                     [protect] offered ports: ESTABLISHED,RELATED accept, then DROP
    WEBKNOCK-GRANTS  -s ADDR/LEN -p PROTO -m PROTO --dport PORT -j ACCEPT   (one per grant)

LEN is 32 (128) for an address alone, shorter for a client's ``open_prefix`` network.

With forward on (container ports, :mod:`.forward`), also::

    DOCKER-USER      -j WEBKNOCK-FWD             (once, at the top; FORWARD without Docker)
    WEBKNOCK-FWD     -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
                     -j WEBKNOCK-FWD-G
                     -p PROTO -m conntrack --ctstate DNAT --ctorigdstport PORT -j DROP
    WEBKNOCK-FWD-G   -s ADDR/LEN -p PROTO -m conntrack --ctstate DNAT --ctorigdstport PORT
                     -j ACCEPT                                              (one per grant)

DNAT changes the destination port before FORWARD, so the rules match the connection's
original one (``--ctorigdstport``), as Docker's documentation advises for DOCKER-USER. We
never create DOCKER-USER: Docker makes it and jumps to it first, and would adopt (and we
could not remove) a chain of ours by that name; without it our jump sits atop FORWARD.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from collections.abc import Iterable, Sequence

from webknock.server.firewall.base import Firewall, FirewallError, Runner, run_command
from webknock.server.firewall.forward import DOCKER_USER
from webknock.server.firewall.ipt_forward import ForwardPath
from webknock.server.firewall.restorefile import (
    Rule,
    body,
    declared,
    jumps,
    restore_file,
    restore_line,
)
from webknock.server.grants import Entry, GrantKey

log = logging.getLogger(__name__)

_MULTIPORT_MAX = 15
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}


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

    @classmethod
    def container_chain(cls, runner: Runner = run_command) -> str | None:
        try:
            saved = runner([SAVE[4], "-t", "filter"]).splitlines()
        except FirewallError:
            return None
        return f"iptables chain {DOCKER_USER} exists" if DOCKER_USER in declared(saved) else None

    def forward_held(self) -> bool | None:
        chains = declared(self.run([SAVE[4], "-t", "filter"]).splitlines())
        return self.forward.chain in chains if self.chain in chains else None

    @property
    def chain(self) -> str:
        return self.settings.chain

    @property
    def grants_chain(self) -> str:
        return f"{self.settings.chain}-GRANTS"

    @property
    def forward(self) -> ForwardPath:
        return ForwardPath(self.settings)

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

    def grant_lines(self, op: str, keys: Iterable[GrantKey], family: int) -> list[str]:
        """Restore lines that add (``-A``) or delete (``-D``) the rules of the grants `keys`
        of `family`, forward ones included: the one rule builder of apply, undo and sync."""
        lines: list[str] = []
        for key in sorted(k for k in keys if k.family == family):
            lines.append(restore_line(op, self.grants_chain, self.grant_rule(key)))
            if self.settings.forward:
                forward = self.forward.grant_rule(key)
                lines.append(restore_line(op, self.forward.grants, forward))
        return lines

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
            chains = declared(lines)
            hooks = jumps(lines, "INPUT", self.chain)
            batch = [
                f":{c} - [0:0]" for c in self.own_chains() if c != self.chain and c not in chains
            ]
            batch.append(f":{self.chain} - [0:0]")  # declared: flushed and rebuilt atomically
            batch += [restore_line("-A", self.chain, rule) for rule in self.main_rules(family)]
            if not hooks:
                batch.append(restore_line("-I", "INPUT", ("1", "-j", self.chain)))
            batch += [restore_line("-D", "INPUT", ("-j", self.chain))] * (hooks - 1)
            for chain in self.retired_chains():  # ours, no longer referenced once rebuilt
                if chain in chains:
                    batch += [f"-F {chain}", f"-X {chain}"]
            if self.settings.forward:
                batch += self.forward.ensure_lines(lines)
            else:  # left by forward = yes before, or by the linear variant
                batch += self.forward.removal_lines(lines)
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
            lines = self.grant_lines("-A", [e.key for e in add], family)
            lines += self.grant_lines("-D", remove, family)
            try:
                self.restore(family, lines)
            except FirewallError:
                for undo in done:  # keep all-or-nothing across the two families
                    self._undo(undo, add, remove)
                raise
            if lines:
                done.append(family)

    def _undo(self, family: int, add: Sequence[Entry], remove: Sequence[GrantKey]) -> None:
        lines = self.grant_lines("-D", [e.key for e in add], family)
        lines += self.grant_lines("-A", remove, family)
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
        grants = [self.grants_chain]
        if self.settings.forward:
            grants.append(self.forward.grants)
        for family in (4, 6):
            batch = [f":{c} - [0:0]" for c in grants]  # flush and refill in one commit
            batch += self.grant_lines("-A", [e.key for e in entries], family)
            self.restore(family, batch)

    def teardown(self) -> None:
        for family in (4, 6):
            lines = self.saved(family)
            chains = declared(lines)
            batch = self.forward.removal_lines(lines)  # whatever the setting now
            batch += [restore_line("-D", "INPUT", ("-j", self.chain))] * jumps(
                lines, "INPUT", self.chain
            )
            ours = [c for c in (self.chain, self.grants_chain) if c in chains]
            batch += [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]
            self.restore(family, batch)

    def census(self) -> tuple[dict[int, int], list[str]]:
        """A text-only census of ``*-save`` (a line count, about 10x cheaper than parsing
        every rule): grants per family, and a missing chain, hook or main-chain rule, and
        the forward path's (:meth:`ForwardPath.census`)."""
        held = {4: 0, 6: 0}
        problems: list[str] = []
        main = self.chain
        for family in (4, 6):
            lines = self.saved(family)
            chains = declared(lines)
            missing = [c for c in self.own_chains() if c not in chains]
            if missing:
                problems.append(f"IPv{family}: chain {', '.join(missing)} missing")
            hooks = jumps(lines, "INPUT", main)
            if hooks != 1:
                problems.append(f"IPv{family}: INPUT jumps to {main} {hooks} times, not once")
            rules, rows = self.main_rules(family), body(lines, main)
            if len(rows) != len(rules) or rows[:1] != [restore_line("-A", main, rules[0])]:
                problems.append(f"IPv{family}: chain {main} does not hold its {len(rules)} rule(s)")
            held[family] = self.held_count(family, lines, problems)
            problems += self.forward.census(lines, family, held[family])
        return held, problems

    def own_chains(self) -> tuple[str, ...]:
        """The chains this variant needs."""
        return (self.chain, self.grants_chain)

    def retired_chains(self) -> tuple[str, ...]:
        """Chains of ours that another variant used and this one removes."""
        return ()

    def held_count(self, family: int, saved: list[str], problems: list[str]) -> int:
        """Grants of one family, counted from the ``*-save`` lines."""
        return len(body(saved, self.grants_chain))

    def describe(self) -> str:
        forward = f", forward chain {self.forward.chain}" if self.settings.forward else ""
        return f"iptables (linear chain {self.chain}{forward})"
