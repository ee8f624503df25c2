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

Network grants (a client's ``open_prefix``) go into one set per protocol, family and prefix
length, ``<proto><family>_<length>``, whose elements are network addresses, matched by the
source address masked to that length. The set and its rule are added, in the batch that
first needs them, and dropped by a full sync once no grant uses them. Not one interval
set (``flags interval``) for all networks: its kernel refuses an element that starts
inside another one (a host grant inside a live /24), so nested grants, which two clients
behind one carrier-grade NAT make, would fail or succeed by the order they came in.
Exact sets never overlap, and a table of an earlier version is this layout without
network sets: nothing to replace.

Every element carries its remaining lifetime, so the kernel closes a grant on time even
with the daemon and cron dead. A new grant (none in the state file) is one ``add element``
with its timeout. Older kernels keep the old timeout when ``add element`` names an
element that exists (recent ones, e.g. 6.18, replace it), so a renewal sets it by
``add`` (a no-op if present), ``delete``, ``add`` with the timeout, in one transaction:
the same result on every kernel, atomic (no instant without the element), no duplicate,
and no error whether or not the kernel still held it (a grant that expired in the state
file is renewed this way too). A removal is ``add`` then ``delete``. (A new grant whose
element someone else put there keeps that element's timeout on an older kernel; the
reaper still deletes it when our grant ends.)

Batches go through libnftables in-process (Debian's python3-nftables) as JSON; without
the binding the same JSON is fed to ``nft -j -f -`` through the injected runner.

Note for admins: an ``accept`` here ends only this chain. Every base chain on the input
hook is evaluated, and a packet must be accepted by all of them; a drop in another table
(say an iptables-nft INPUT policy DROP) still drops it. Let your own ruleset accept the
offered ports and set ``protect = yes``: then this table is what keeps them closed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

from webknock.addresses import full_length, parse_address
from webknock.server.firewall.base import (
    Firewall,
    FirewallError,
    FirewallSettings,
    Runner,
    run_command,
)
from webknock.server.grants import PROTOS, Entry, GrantKey

log = logging.getLogger(__name__)

FAMILY: Final = "inet"
CHAIN: Final = "input"
PRIORITY: Final = -1  # "filter - 1": before a filter-priority chain of the admin's
ADDR_TYPE: Final = {4: "ipv4_addr", 6: "ipv6_addr"}
PAYLOAD: Final = {4: "ip", 6: "ip6"}
NFT: Final = "nft"

Cmd = dict[str, Any]


class NftLib(Protocol):
    """The part of ``nftables.Nftables`` we use."""

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...


class _Auto:
    """Marker: load the python3-nftables binding if it is installed."""


AUTO: Final = _Auto()


def load_binding() -> NftLib | None:
    """A libnftables context, or None when python3-nftables is missing."""
    try:
        import nftables  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    lib: NftLib = nft
    return lib


def table_name(instance: str) -> str:
    return "webknock" if instance in ("webknock", "default") else f"webknock_{instance}"


#: One set: (proto, family, prefix length), the length None for the addresses alone.
SetKey = tuple[str, int, int | None]
_NET_SET: Final = re.compile(r"(tcp|udp)([46])_([1-9][0-9]{0,2})")


def set_name(proto: str, family: int, length: int | None = None) -> str:
    return f"{proto}{family}" if length is None else f"{proto}{family}_{length}"


def parse_set_name(name: str) -> SetKey | None:
    """The set of one of our set names, or None for another name."""
    if name in HOST_SET_NAMES:
        return HOST_SET_NAMES[name]
    m = _NET_SET.fullmatch(name)
    if m is None or not 1 <= int(m[3]) < full_length(int(m[2])):
        return None
    return m[1], int(m[2]), int(m[3])


SET_KEYS: Final = [(proto, family) for proto in PROTOS for family in (4, 6)]
HOST_SETS: Final[list[SetKey]] = [(proto, family, None) for proto, family in SET_KEYS]
HOST_SET_NAMES: Final = {set_name(p, f): (p, f, None) for p, f in SET_KEYS}


def set_of(key: GrantKey) -> SetKey:
    return key.proto, key.family, key.prefixlen


def mask(family: int, length: int) -> str:
    """The netmask of a prefix length, as nft lists it (``255.255.255.0``, ``ffff::``)."""
    net = ipaddress.IPv4Network((0, length)) if family == 4 else ipaddress.IPv6Network((0, length))
    return str(net.netmask)


def elem_key(key: GrantKey) -> dict[str, Any]:
    """The element of a grant in its set: the address, or the network's address."""
    return {"concat": [str(key.ip), key.port]}


def parse_elem(setkey: SetKey, elem: Any) -> GrantKey | None:
    """The grant of one listed element of the set `setkey`:
    ``{"elem": {"val": {"concat": ...}, ...}}`` or a bare ``{"concat": ...}``."""
    if isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
        elem = elem["elem"].get("val")  # an element with a timeout
    concat = elem.get("concat") if isinstance(elem, dict) else None
    if not (isinstance(concat, list) and len(concat) == 2):
        return None
    proto, _family, length = setkey
    try:
        return GrantKey(parse_address(str(concat[0])), proto, int(concat[1]), length)
    except (TypeError, ValueError):
        return None


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
        self.table = table_name(settings.instance)
        self._nets: set[SetKey] | None = None  # network sets (and rules) known to be there

    @classmethod
    def unusable(cls, runner: Runner = run_command) -> str | None:
        lib = load_binding()
        if lib is None and shutil.which(NFT) is None:
            return "neither python3-nftables nor nft found (apt-get install python3-nftables)"
        try:
            cls.transact(lib, runner, [{"list": {"tables": None}}])
        except FirewallError as exc:
            return f"nftables does not work here: {exc}"
        return None

    # -- transport ------------------------------------------------------------------------------

    @staticmethod
    def transact(lib: NftLib | None, runner: Runner, cmds: list[Cmd]) -> dict[str, Any]:
        """Run commands as one transaction; return the JSON output ({} when none)."""
        root = {"nftables": cmds}
        if lib is not None:
            rc, out, err = lib.json_cmd(root)
            if rc != 0:
                raise FirewallError(
                    "libnftables: " + (" ".join(str(err).split())[:400] or f"rc {rc}")
                )
        else:
            text = runner([NFT, "-j", "-f", "-"], json.dumps(root))
            try:
                out = json.loads(text) if text.strip() else {}
            except ValueError as exc:
                raise FirewallError(f"nft -j printed no JSON: {exc}") from None
        return out if isinstance(out, dict) else {}

    def run_batch(self, cmds: list[Cmd]) -> dict[str, Any]:
        return self.transact(self.lib, self.run, cmds)

    # -- objects as data ----------------------------------------------------------------------

    def _ref(self, **more: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": self.table, **more}

    def grant_rule(self, setkey: SetKey) -> list[dict[str, Any]]:
        """The rule that accepts what the set `setkey` holds."""
        proto, family, length = setkey
        saddr: dict[str, Any] = {"payload": {"protocol": PAYLOAD[family], "field": "saddr"}}
        if length is not None:
            saddr = {"&": [saddr, mask(family, length)]}
        left = {"concat": [saddr, {"payload": {"protocol": proto, "field": "dport"}}]}
        right = f"@{set_name(*setkey)}"
        return [{"match": {"op": "==", "left": left, "right": right}}, {"accept": None}]

    def rules(self, nets: Iterable[SetKey] = ()) -> list[list[dict[str, Any]]]:
        """The expressions of each rule of our chain, in order, with network sets `nets`."""
        rules = [self.grant_rule(k) for k in [*HOST_SETS, *sorted(nets)]]
        if self.settings.protect:
            for proto in PROTOS:
                ports = self.settings.ports(proto)
                if not ports:
                    continue
                dport = {
                    "match": {
                        "op": "==",
                        "left": {"payload": {"protocol": proto, "field": "dport"}},
                        "right": {"set": ports},
                    }
                }
                state = {
                    "match": {
                        "op": "in",
                        "left": {"ct": {"key": "state"}},
                        "right": ["established", "related"],
                    }
                }
                rules.append([dport, state, {"accept": None}])
                rules.append([dport, {"drop": None}])
        return rules

    def skeleton(self, nets: Iterable[SetKey] = ()) -> list[Cmd]:
        """Create table, sets (the network sets `nets` too) and chain if missing; rebuild
        the chain's rules; keep elements."""
        nets = sorted(nets)
        cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": self.table}}}]
        for proto, family, length in [*HOST_SETS, *nets]:
            spec = self._ref(
                name=set_name(proto, family, length),
                type=[ADDR_TYPE[family], "inet_service"],
                flags=["timeout"],
            )
            cmds.append({"add": {"set": spec}})
        chain = self._ref(name=CHAIN, type="filter", hook="input", prio=PRIORITY, policy="accept")
        cmds.append({"add": {"chain": chain}})
        cmds.append({"flush": {"chain": self._ref(name=CHAIN)}})
        cmds += [{"add": {"rule": self._ref(chain=CHAIN, expr=e)}} for e in self.rules(nets)]
        return cmds

    @staticmethod
    def _nets_of(items: Iterable[Any]) -> set[SetKey]:
        """The network sets the rules of a listing match."""
        nets: set[SetKey] = set()
        for item in items:
            rule = item.get("rule") if isinstance(item, dict) else None
            exprs = rule.get("expr") if isinstance(rule, dict) else None
            for expr in exprs if isinstance(exprs, list) else []:
                match = expr.get("match") if isinstance(expr, dict) else None
                right = match.get("right") if isinstance(match, dict) else None
                if isinstance(right, str) and right.startswith("@"):
                    setkey = parse_set_name(right[1:])
                    if setkey is not None and setkey[2] is not None:
                        nets.add(setkey)
        return nets

    def kernel_nets(self, *, unmatched: bool = False) -> set[SetKey]:
        """The network sets our chain matches now (one listing of the chain's rules, not of
        any set's elements); none when there is no table yet. `unmatched`: also the network
        sets no rule matches (left by someone flushing our chain), from a listing of the
        whole table, elements included: for ensure and sync, which are rare."""
        if unmatched:
            items = self._listing() or []
            return self._nets_of(items) | {k for k, _ in self._sets(items) if k[2] is not None}
        try:
            out = self.run_batch([{"list": {"chain": self._ref(name=CHAIN)}}])
        except FirewallError as exc:
            if "No such file or directory" in str(exc):
                return set()
            raise
        return self._nets_of(out.get("nftables", []))

    def _elements(self, op: str, setkey: SetKey, elems: list[Any]) -> Cmd:
        return {op: {"element": self._ref(name=set_name(*setkey), elem=elems)}}

    @staticmethod
    def _timed(entries: Iterable[Entry], now: float) -> list[Any]:
        return [
            {"elem": {"val": elem_key(e.key), "timeout": e.remaining(now)}}
            for e in sorted(entries, key=lambda e: e.key)
        ]

    # -- interface --------------------------------------------------------------------------

    def ensure(self) -> None:
        nets = self.kernel_nets(unmatched=True)  # a set without its rule gets it back
        self.run_batch(self.skeleton(nets))
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
            cmds += self.skeleton(known | timed_nets)
        there = known | timed_nets
        for setkey in [*HOST_SETS, *sorted(there & nets)]:
            fresh = {e.key: e for e in add if set_of(e.key) == setkey}
            setting = {e.key: e for e in renew if set_of(e.key) == setkey}
            gone = {k for k in remove if set_of(k) == setkey}
            gone -= {*setting, *fresh}
            touched = sorted({*setting, *gone})
            if touched:  # present or not: make it absent first (see the module's docstring)
                keys = [elem_key(k) for k in touched]
                cmds.append(self._elements("add", setkey, keys))
                cmds.append(self._elements("delete", setkey, keys))
            timed = {**fresh, **setting}
            if timed:
                cmds.append(self._elements("add", setkey, self._timed(timed.values(), now)))
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
            if "No such file or directory" in str(exc):
                return None
            raise
        items = out.get("nftables", [])
        return [i for i in items if isinstance(i, dict)]

    @staticmethod
    def _sets(items: list[dict[str, Any]]) -> list[tuple[SetKey, dict[str, Any]]]:
        """Our sets in a listing of our table, with their specs."""
        found = []
        for item in items:
            spec = item.get("set")
            setkey = parse_set_name(str(spec.get("name"))) if isinstance(spec, dict) else None
            if setkey is not None and isinstance(spec, dict):
                found.append((setkey, spec))
        return found

    def _held(self, items: list[dict[str, Any]]) -> list[GrantKey]:
        found: list[GrantKey] = []
        for setkey, spec in self._sets(items):
            for elem in spec.get("elem", []):
                key = parse_elem(setkey, elem)
                if key is not None:
                    found.append(key)
        return found

    def listed(self) -> list[GrantKey]:
        items = self._listing()
        return [] if items is None else self._held(items)

    def census(self) -> tuple[dict[int, int], list[str]]:
        """One listing of our table: elements per family, and missing sets, chain or rules."""
        held = {4: 0, 6: 0}
        items = self._listing()
        if items is None:
            return held, [f"table {FAMILY} {self.table} missing"]
        problems: list[str] = []
        sets = self._sets(items)
        present = {setkey for setkey, _ in sets}
        missing = [set_name(*k) for k in HOST_SETS if k not in present]
        if missing:
            problems.append(f"set {', '.join(missing)} missing in table {self.table}")
        chains = [i["chain"] for i in items if isinstance(i.get("chain"), dict)]
        if not any(c.get("name") == CHAIN and c.get("hook") == "input" for c in chains):
            problems.append(f"chain {self.table} {CHAIN} missing or not on the input hook")
        exprs = [
            i["rule"].get("expr")
            for i in items
            if isinstance(i.get("rule"), dict) and i["rule"].get("chain") == CHAIN
        ]
        nets = {k for k in present if k[2] is not None}
        want = self.rules(nets)
        net_rules = want[len(HOST_SETS) : len(HOST_SETS) + len(nets)]
        if (
            len(exprs) != len(want)
            or exprs[:1] != want[:1]
            or any(rule not in exprs for rule in net_rules)
        ):
            problems.append(f"chain {self.table} {CHAIN} does not hold its {len(want)} rule(s)")
        for (_proto, family, _length), spec in sets:  # a count, not a parse: about once a second
            held[family] += len(spec.get("elem", []))
        return held, problems

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        """One transaction: the network sets the entries need made, every set flushed and
        refilled, and the network sets no entry needs deleted (after their rules)."""
        needed = {set_of(e.key) for e in entries if e.key.prefixlen is not None}
        stale = self.kernel_nets(unmatched=True) - needed
        cmds = self.skeleton(needed)
        for setkey in [*HOST_SETS, *sorted(needed)]:
            cmds.append({"flush": {"set": self._ref(name=set_name(*setkey))}})
            mine = [e for e in entries if set_of(e.key) == setkey]
            if mine:
                cmds.append(self._elements("add", setkey, self._timed(mine, now)))
        cmds += [{"delete": {"set": self._ref(name=set_name(*k))}} for k in sorted(stale)]
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
        return f"nftables (table {FAMILY} {self.table}, {via})"
