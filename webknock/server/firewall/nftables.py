"""nftables backend: one table of our own, timeout sets, one JSON transaction per batch.

Layout (table ``inet webknock``, or ``inet webknock_<instance>`` for another instance)::

    set tcp4 { type ipv4_addr . inet_service; flags timeout; }   (tcp6, udp4, udp6 alike)
    set tcp4_24 { type ipv4_addr . inet_service; flags timeout; }   (network grants: below)
    chain input { type filter hook input priority filter - 1; policy accept;
        ip saddr . tcp dport @tcp4 accept        (ip6/udp alike)
        ip saddr & 255.255.255.0 . tcp dport @tcp4_24 accept   (one per network set)
        [protect] tcp dport { OFFERED } ct state established,related accept
        [protect] tcp dport { OFFERED } drop     (udp alike)
    }
    chain forward { type filter hook forward priority filter - 1; policy accept;   [forward]
        meta l4proto tcp ip saddr . ct original proto-dst @tcp4 accept   (every set alike)
        [protect] meta l4proto tcp ct original proto-dst PORT ct status dnat ct state new drop
    }

The forward chain (``[server] forward``, :mod:`.forward`) guards ports that DNAT sends to
containers, matching the connection's original destination port in the same sets.
Network grants (a client's ``open_prefix``) go into one exact set per protocol, family and
prefix length, ``<proto><family>_<length>``, matched by the source address masked to that
length; a set and its rule are added by the batch that first needs them and dropped by a
full sync once no grant uses them.

Every element carries its remaining lifetime. A new grant is one ``add element`` with its
timeout; a renewal is ``add``, ``delete``, ``add`` in one transaction (the same result on
every kernel); a removal is ``add`` then ``delete``. Batches go through libnftables
in-process (python3-nftables) as JSON, else ``nft -j -f -`` through the injected runner
(:mod:`.nftlib`); :class:`.nftrules.TableLayout` builds the commands. Why each of these,
and what an admin's own ruleset must do: docs/design.md, "Firewall backends".
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from typing import Any

from webknock.server.firewall.base import (
    Firewall,
    FirewallError,
    FirewallSettings,
    Runner,
    run_command,
)
from webknock.server.firewall.nftlib import (
    AUTO,
    NFT,
    Cmd,
    NftLib,
    _Auto,
    load_binding,
    missing,
    transact,
)
from webknock.server.firewall.nftrules import (
    CHAIN,
    FAMILY,
    FORWARD,
    HOST_SETS,
    SetKey,
    TableLayout,
    elem_key,
    mask,
    nets_of,
    parse_elem,
    parse_set_name,
    set_name,
    set_of,
    sets_of,
    table_name,
    timed,
)
from webknock.server.grants import Entry, GrantKey

log = logging.getLogger(__name__)

__all__ = ["NftablesFirewall", "load_binding", "mask", "parse_set_name", "set_name", "table_name"]


class NftablesFirewall(Firewall):
    """Timeout sets in a table of our own, applied as one libnftables JSON transaction."""

    name = "nftables"

    def __init__(
        self,
        settings: FirewallSettings,
        runner: Runner = run_command,
        lib: NftLib | _Auto | None = AUTO,
    ) -> None:
        super().__init__(settings, runner)
        self.lib = load_binding() if isinstance(lib, _Auto) else lib
        self.layout = TableLayout(settings)
        self.table = self.layout.table
        self._nets: set[SetKey] | None = None  # network sets (and rules) known to be there

    @classmethod
    def unusable(cls, runner: Runner = run_command) -> str | None:
        lib = load_binding()
        if lib is None and shutil.which(NFT) is None:
            return "neither python3-nftables nor nft found (apt-get install python3-nftables)"
        try:
            transact(lib, runner, [{"list": {"tables": None}}])
        except FirewallError as exc:
            return f"nftables does not work here: {exc}"
        return None

    @classmethod
    def container_chain(cls, runner: Runner = run_command) -> str | None:
        """Docker's DOCKER-USER chain as iptables-nft makes it (table ``ip filter``)."""
        chain = {"family": "ip", "table": "filter", "name": "DOCKER-USER"}
        try:
            transact(load_binding(), runner, [{"list": {"chain": chain}}])
        except FirewallError:
            return None
        return "chain ip filter DOCKER-USER exists"

    def forward_held(self) -> bool | None:
        held = None
        for chain in (CHAIN, FORWARD):
            try:
                self.run_batch([{"list": {"chain": self.layout.ref(name=chain)}}])
            except FirewallError as exc:
                if not missing(exc):
                    raise
                return held
            held = False
        return True

    def run_batch(self, cmds: list[Cmd]) -> dict[str, Any]:
        return transact(self.lib, self.run, cmds)

    def kernel_nets(self) -> set[SetKey]:
        """The network sets our chain matches now (one listing of the chain's rules, not of
        any set's elements); none when there is no table yet."""
        try:
            out = self.run_batch([{"list": {"chain": self.layout.ref(name=CHAIN)}}])
        except FirewallError as exc:
            if missing(exc):
                return set()
            raise
        return nets_of(out.get("nftables", []))

    def _kernel_state(self) -> tuple[set[SetKey], bool]:
        """For ensure and sync, which are rare: the network sets our chain matches and those
        no rule matches (left by someone flushing our chain), and whether a forward chain
        is there (to delete when forward is off); one listing of the whole table."""
        items = self._listing() or []
        nets = nets_of(items) | {k for k, _ in sets_of(items) if k[2] is not None}
        return nets, any(self._is_chain(i, FORWARD) for i in items)

    @staticmethod
    def _is_chain(item: dict[str, Any], name: str) -> bool:
        chain = item.get("chain")
        return isinstance(chain, dict) and chain.get("name") == name and chain.get("hook") == name

    # -- interface --------------------------------------------------------------------------

    def ensure(self) -> None:
        nets, forward = self._kernel_state()  # a set without its rule gets it back
        self.run_batch(self.layout.skeleton(nets, drop_forward=forward))
        self._nets = nets

    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        cmds: list[Cmd] = []
        timed_nets = {set_of(e.key) for e in [*add, *renew] if e.key.prefixlen is not None}
        removed_nets = {set_of(k) for k in remove if k.prefixlen is not None}
        nets = timed_nets | removed_nets
        known = self._nets or set()
        if nets and (self._nets is None or not nets <= known):  # unknown to this process:
            known = self._nets = self.kernel_nets()  # another one may have made it since
        if timed_nets - known:  # the first grant of its length: its set and rule come first
            cmds += self.layout.skeleton(known | timed_nets)
        there = known | timed_nets
        elements = self.layout.elements
        for setkey in [*HOST_SETS, *sorted(there & nets)]:
            fresh = {e.key: e for e in add if set_of(e.key) == setkey}
            setting = {e.key: e for e in renew if set_of(e.key) == setkey}
            gone = {k for k in remove if set_of(k) == setkey}
            gone -= {*setting, *fresh}
            touched = sorted({*setting, *gone})
            if touched:  # present or not: make it absent first (see the module's docstring)
                keys = [elem_key(k) for k in touched]
                cmds.append(elements("add", setkey, keys))
                cmds.append(elements("delete", setkey, keys))
            fresh.update(setting)
            if fresh:
                cmds.append(elements("add", setkey, timed(fresh.values(), now)))
        # (a network grant to remove whose set is not there is not in the kernel either)
        if not cmds:
            return
        try:
            self.run_batch(cmds)
        except FirewallError:
            self._nets = None  # read the kernel again next time
            raise
        if timed_nets:
            self._nets = there

    def _listing(self) -> list[dict[str, Any]] | None:
        """Our table as nft lists it, or None when it does not exist."""
        try:
            out = self.run_batch([{"list": {"table": {"family": FAMILY, "name": self.table}}}])
        except FirewallError as exc:
            if missing(exc):
                return None
            raise
        items = out.get("nftables", [])
        return [i for i in items if isinstance(i, dict)]

    def listed(self) -> list[GrantKey]:
        items = self._listing()
        found: list[GrantKey] = []
        for setkey, spec in sets_of(items or []):
            for elem in spec.get("elem", []):
                key = parse_elem(setkey, elem)
                if key is not None:
                    found.append(key)
        return found

    def census(self) -> tuple[dict[int, int], list[str]]:
        """One listing of our table: elements per family, and missing sets, chains or
        rules (a forward chain there with forward off counts as wrong too)."""
        held = {4: 0, 6: 0}
        items = self._listing()
        if items is None:
            return held, [f"table {FAMILY} {self.table} missing"]
        problems: list[str] = []
        sets = sets_of(items)
        present = {setkey for setkey, _ in sets}
        absent = [set_name(*k) for k in HOST_SETS if k not in present]
        if absent:
            problems.append(f"set {', '.join(absent)} missing in table {self.table}")
        nets = {k for k in present if k[2] is not None}
        for chain in self.layout.hooks():
            problems += self._chain_problems(items, chain, nets)
        if not self.settings.forward and any(self._is_chain(i, FORWARD) for i in items):
            problems.append(f"chain {self.table} {FORWARD} present, forward is off")
        for (_proto, family, _length), spec in sets:  # a count, not a parse: about once a second
            held[family] += len(spec.get("elem", []))
        return held, problems

    def _chain_problems(
        self, items: list[dict[str, Any]], chain: str, nets: Iterable[SetKey]
    ) -> list[str]:
        """A missing chain, or one without its rules (counted; the first and the network
        sets' rules compared)."""
        if not any(self._is_chain(i, chain) for i in items):
            return [f"chain {self.table} {chain} missing or not on the {chain} hook"]
        exprs = [
            i["rule"].get("expr")
            for i in items
            if isinstance(i.get("rule"), dict) and i["rule"].get("chain") == chain
        ]
        nets = sorted(nets)
        want = self.layout.rules(nets, chain)
        net_rules = want[len(HOST_SETS) : len(HOST_SETS) + len(nets)]
        if (
            len(exprs) != len(want)
            or exprs[:1] != want[:1]
            or any(rule not in exprs for rule in net_rules)
        ):
            return [f"chain {self.table} {chain} does not hold its {len(want)} rule(s)"]
        return []

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        """One transaction: the network sets the entries need made, every set flushed and
        refilled, and the network sets no entry needs deleted (after their rules)."""
        needed = {set_of(e.key) for e in entries if e.key.prefixlen is not None}
        there, forward = self._kernel_state()
        cmds = self.layout.skeleton(needed, drop_forward=forward)
        for setkey in [*HOST_SETS, *sorted(needed)]:
            cmds.append({"flush": {"set": self.layout.ref(name=set_name(*setkey))}})
            mine = [e for e in entries if set_of(e.key) == setkey]
            if mine:
                cmds.append(self.layout.elements("add", setkey, timed(mine, now)))
        stale = sorted(there - needed)
        cmds += [{"delete": {"set": self.layout.ref(name=set_name(*k))}} for k in stale]
        self._nets = None
        self.run_batch(cmds)
        self._nets = needed

    def teardown(self) -> None:
        out = self.run_batch([{"list": {"tables": None}}])
        tables = [i.get("table", {}) for i in out.get("nftables", []) if isinstance(i, dict)]
        if any(t.get("family") == FAMILY and t.get("name") == self.table for t in tables):
            self.run_batch([{"delete": {"table": {"family": FAMILY, "name": self.table}}}])
        self._nets = None

    def describe(self) -> str:
        via = "libnftables" if self.lib is not None else "nft -j"
        forward = ", forward chain" if self.settings.forward else ""
        return f"nftables (table {FAMILY} {self.table}{forward}, {via})"
