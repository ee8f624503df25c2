"""The forward path of the iptables backends: offered ports that DNAT sends to containers.

Layout and rationale: the docstring of :mod:`.iptables`. One :class:`ForwardPath` builds
the restore lines of the two forward chains for ensure (on or off), teardown and the
census, from the ``*-save`` listing of one family; grant rules come from
:meth:`ForwardPath.grant_rule`, used with the INPUT grant rule by the backend's one rule
builder.
"""

from __future__ import annotations

from dataclasses import dataclass

from webknock.server.firewall.base import FirewallSettings
from webknock.server.firewall.forward import DOCKER_USER
from webknock.server.firewall.restorefile import Rule, body, declared, jumps, restore_line
from webknock.server.grants import GrantKey

#: The chains that may jump to our forward chain, the one used when it exists first.
HOOKS = (DOCKER_USER, "FORWARD")


@dataclass(frozen=True)
class ForwardPath:
    """The forward chain ``<chain>-FWD`` and its grants chain ``<chain>-FWD-G``."""

    settings: FirewallSettings

    @property
    def chain(self) -> str:
        return f"{self.settings.chain}-FWD"

    @property
    def grants(self) -> str:
        return f"{self.settings.chain}-FWD-G"

    def grant_rule(self, key: GrantKey) -> Rule:
        """The ACCEPT rule of one grant for DNAT'ed connections, as iptables-save prints it."""
        orig = ("-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport", str(key.port))
        return ("-s", str(key.network), "-p", key.proto, *orig, "-j", "ACCEPT")

    def rules(self) -> list[Rule]:
        """The forward chain: established back to the caller, then grants, then drops."""
        rules: list[Rule] = [
            ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"),
            ("-j", self.grants),
        ]
        for proto in ("tcp", "udp"):
            for port in self.settings.ports(proto):
                orig = ("-m", "conntrack", "--ctstate", "DNAT", "--ctorigdstport", str(port))
                rules.append(("-p", proto, *orig, "-j", "DROP"))
        return rules

    @staticmethod
    def hook(saved: list[str]) -> str:
        """The chain our jump belongs in: Docker's DOCKER-USER if there, else FORWARD."""
        return DOCKER_USER if DOCKER_USER in declared(saved) else "FORWARD"

    def ensure_lines(self, saved: list[str]) -> list[str]:
        """Create the grants chain if missing, rebuild the forward chain (grants kept), and
        leave exactly one jump to it, at the top of :meth:`hook`."""
        chains = declared(saved)
        lines = [] if self.grants in chains else [f":{self.grants} - [0:0]"]
        lines.append(f":{self.chain} - [0:0]")  # declared: flushed and rebuilt atomically
        lines += [restore_line("-A", self.chain, rule) for rule in self.rules()]
        hook = self.hook(saved)
        for source in HOOKS:  # (no jump counts from a chain that is not there)
            count = jumps(saved, source, self.chain)
            keep = 1 if source == hook else 0
            if source == hook and count == 0:
                lines.append(restore_line("-I", hook, ("1", "-j", self.chain)))
            lines += [restore_line("-D", source, ("-j", self.chain))] * max(count - keep, 0)
        return lines

    def removal_lines(self, saved: list[str]) -> list[str]:
        """Delete every jump to the forward chain, then both chains (forward off, teardown)."""
        chains = declared(saved)
        lines: list[str] = []
        for source in HOOKS:
            lines += [restore_line("-D", source, ("-j", self.chain))] * jumps(
                saved, source, self.chain
            )
        ours = [c for c in (self.chain, self.grants) if c in chains]
        return lines + [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]

    def census(self, saved: list[str], family: int, granted: int) -> list[str]:
        """What is wrong with the forward path of one family: with forward off, that it is
        there; with it on, a missing chain, a jump not exactly once in :meth:`hook`, a wrong
        rule count, or other than `granted` grant rules (the INPUT grants' count)."""
        chains = declared(saved)
        if not self.settings.forward:
            there = self.chain in chains
            return [f"IPv{family}: chain {self.chain} present, forward is off"] if there else []
        problems = []
        missing = [c for c in (self.chain, self.grants) if c not in chains]
        if missing:
            problems.append(f"IPv{family}: chain {', '.join(missing)} missing")
        hook = self.hook(saved)
        counts = [jumps(saved, s, self.chain) for s in HOOKS if s != hook]
        if jumps(saved, hook, self.chain) != 1 or any(counts):
            problems.append(f"IPv{family}: {self.chain} is not jumped to once, from {hook}")
        rules, held = self.rules(), body(saved, self.chain)
        if len(held) != len(rules) or held[:1] != [restore_line("-A", self.chain, rules[0])]:
            problems.append(
                f"IPv{family}: chain {self.chain} does not hold its {len(rules)} rule(s)"
            )
        forwarded = len(body(saved, self.grants))
        if forwarded != granted:
            problems.append(
                f"IPv{family}: chain {self.grants} holds {forwarded} grant(s), not {granted}"
            )
        return problems
