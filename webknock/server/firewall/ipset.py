"""iptables + ipset backend: one ``hash:net,port`` set per address family, with timeouts.

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

An element is an address (``192.0.2.10,tcp:22``; the kernel holds it as a /32 or /128) or,
for a client's ``open_prefix``, a network (``198.51.100.0/24,tcp:22``). A ``hash:net,port``
set holds both, nested or not, and a packet matches if any of them contains its source.

Versions before network grants made ``hash:ip,port`` sets of the same names. :meth:`ensure`
replaces such a set in place, keeping its elements and their remaining timeouts, with the
chain matching a full copy at every instant: sets of different types cannot be swapped,
and a set a rule uses can be neither renamed nor destroyed, so the chain is pointed at a
copy (``<set>-new``) while the set is made anew under its name, then pointed back.

A set matches the packet's own destination port, which DNAT has changed before FORWARD:
with ``forward`` on (container ports) the registry builds the linear variant instead, and
this one removes a forward path the linear variant left (:mod:`.ipt_forward`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence

from webknock.server.firewall.base import FirewallError, Runner, run_command
from webknock.server.firewall.iptables import IptablesFirewall
from webknock.server.firewall.restorefile import Rule, restore_line
from webknock.server.grants import Entry, GrantKey

log = logging.getLogger(__name__)

IPSET = "ipset"
FAMILY = {4: "inet", 6: "inet6"}
MAXELEM = 1048576
SET_TYPE = "hash:net,port"


def element(key: GrantKey) -> str:
    """``ADDR,PROTO:PORT`` or ``NET/LEN,PROTO:PORT`` as ``ipset save`` prints it."""
    return f"{key.ip_text},{key.proto}:{key.port}"


def parse_element(text: str) -> GrantKey | None:
    """The grant of an ``ipset save`` element, or None for anything else."""
    addr, _, rest = text.rpartition(",")
    proto, _, port = rest.partition(":")
    try:
        return GrantKey.parse(addr, proto, int(port))
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

    def fresh_name(self, family: int) -> str:
        """The set a sync fills before swapping it in (and a migration's copy)."""
        return f"{self.set_name(family)}-new"

    def grant_match_rules(self, family: int, name: str | None = None) -> list[Rule]:
        name = name or self.set_name(family)
        return [("-m", "set", "--match-set", name, "src,dst", "-j", "ACCEPT")]

    def own_chains(self) -> tuple[str, ...]:
        return (self.chain,)

    # -- ipset I/O ----------------------------------------------------------------------------

    def create_line(self, name: str, family: int) -> str:
        return f"create {name} {SET_TYPE} family {FAMILY[family]} timeout 0 maxelem {MAXELEM}"

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

    def set_types(self) -> dict[str, str]:
        """The type of each of our sets that exists (``ipset list -t``: headers only)."""
        ours = {n for f in (4, 6) for n in (self.set_name(f), self.fresh_name(f))}
        types: dict[str, str] = {}
        name = ""
        for line in self.run([IPSET, "list", "-t"]).splitlines():
            if line.startswith("Name:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Type:") and name in ours:
                types[name] = line.split(":", 1)[1].strip()
        return types

    def copy_lines(self, source: str, target: str) -> list[str]:
        """``add`` lines giving `target` the elements of `source` with their remaining
        timeouts, as ``ipset save`` prints them."""
        lines = []
        for line in self.run([IPSET, "save", source]).splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[:2] == ["add", source]:
                lines.append(f"add {target} {parts[2]}")
        return lines

    def _match_only(self, family: int, name: str) -> None:
        """Rebuild the main chain of `family` (one atomic restore) matching set `name`."""
        rules = self.grant_match_rules(family, name)
        rules += self.main_rules(family)[len(self.grant_match_rules(family)) :]
        self.restore(
            family, [f":{self.chain} - [0:0]", *(restore_line("-A", self.chain, r) for r in rules)]
        )

    def _migrate(self, family: int, old_type: str) -> None:
        """Replace our set of `family`, of an older version's type, by a SET_TYPE set of the
        same name with the same elements (see the module's docstring)."""
        name, copy = self.set_name(family), self.fresh_name(family)
        self.ipset_restore(
            [self.create_line(copy, family), f"flush {copy}", *self.copy_lines(name, copy)]
        )
        self._match_only(family, copy)  # the old set is unused from here on
        self.ipset_restore(
            [f"destroy {name}", self.create_line(name, family), *self.copy_lines(copy, name)]
        )
        self._match_only(family, name)
        self.ipset_restore([f"destroy {copy}"])
        log.info("set %s: replaced its %s set by a %s one, elements kept", name, old_type, SET_TYPE)

    # -- interface ------------------------------------------------------------------------------

    def retired_chains(self) -> tuple[str, ...]:
        return (self.grants_chain,)  # left by the linear variant

    def ensure(self) -> None:
        types = self.set_types()
        for family in (4, 6):
            copy = self.fresh_name(family)
            if types.get(copy, SET_TYPE) != SET_TYPE:  # an older version's, unused
                self.ipset_restore([f"destroy {copy}"])
            old = types.get(self.set_name(family), SET_TYPE)
            if old != SET_TYPE:
                self._migrate(family, old)
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
            name, fresh = self.set_name(family), self.fresh_name(family)
            lines += [self.create_line(fresh, family), f"flush {fresh}"]
            lines += self.add_lines(fresh, [e for e in entries if e.key.family == family], now)
            lines += [f"swap {fresh} {name}", f"destroy {fresh}"]
        self.ipset_restore(lines)

    def teardown(self) -> None:
        super().teardown()  # the rules that reference the sets go first
        have = self.existing_sets()
        names = [self.set_name(f) for f in (4, 6)] + [self.fresh_name(f) for f in (4, 6)]
        self.ipset_restore([f"destroy {n}" for n in names if n in have])

    def held_count(self, family: int, saved: list[str], problems: list[str]) -> int:
        name = self.set_name(family)
        try:
            out = self.run([IPSET, "list", "-t", name])
        except FirewallError as exc:
            problems.append(f"IPv{family}: set {name} missing ({exc})")
            return 0
        for line in out.splitlines():
            kind = line.partition(":")[2].strip()
            if line.startswith("Type:") and kind != SET_TYPE:  # reconcile replaces it
                problems.append(f"IPv{family}: set {name} is {kind}, not {SET_TYPE}")
            if line.startswith("Number of entries:"):
                return int(line.split(":", 1)[1])
        problems.append(f"IPv{family}: cannot count the entries of set {name}")
        return 0

    def describe(self) -> str:
        return f"iptables+ipset (chain {self.chain}, sets {self.set_name(4)}/{self.set_name(6)})"
