"""nftables backend: one table of our own, four timeout sets, one JSON transaction per batch.

Layout (table ``inet webknock``, or ``inet webknock_<instance>`` for another instance)::

    set tcp4 { type ipv4_addr . inet_service; flags timeout; }   (tcp6, udp4, udp6 alike)
    chain input { type filter hook input priority filter - 1; policy accept;
        ip saddr . tcp dport @tcp4 accept        (ip6/udp alike)
        [protect] tcp dport { OFFERED } ct state established,related accept
        [protect] tcp dport { OFFERED } drop     (udp alike)
    }

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

import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from typing import Any, Final, Protocol

from webknock.addresses import parse_address
from webknock.firewall.base import Firewall, FirewallError, FirewallSettings, Runner, run_command
from webknock.grants import PROTOS, Entry, GrantKey

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


def set_name(proto: str, family: int) -> str:
    return f"{proto}{family}"


SET_KEYS: Final = [(proto, family) for proto in PROTOS for family in (4, 6)]


def elem_key(key: GrantKey) -> dict[str, Any]:
    return {"concat": [str(key.ip), key.port]}


def parse_elem(proto: str, elem: Any) -> GrantKey | None:
    """The grant of one listed set element: ``{"elem": {"val": {"concat": ...}, ...}}``
    or a bare ``{"concat": ...}``."""
    if isinstance(elem, dict) and isinstance(elem.get("elem"), dict):
        elem = elem["elem"].get("val")  # an element with a timeout
    concat = elem.get("concat") if isinstance(elem, dict) else None
    if not (isinstance(concat, list) and len(concat) == 2):
        return None
    try:
        return GrantKey(parse_address(str(concat[0])), proto, int(concat[1]))
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

    def rules(self) -> list[list[dict[str, Any]]]:
        """The expressions of each rule of our chain, in order."""
        rules: list[list[dict[str, Any]]] = []
        for proto, family in SET_KEYS:
            left = {
                "concat": [
                    {"payload": {"protocol": PAYLOAD[family], "field": "saddr"}},
                    {"payload": {"protocol": proto, "field": "dport"}},
                ]
            }
            right = f"@{set_name(proto, family)}"
            rules.append([{"match": {"op": "==", "left": left, "right": right}}, {"accept": None}])
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

    def skeleton(self) -> list[Cmd]:
        """Create table, sets and chain if missing; rebuild the chain's rules; keep elements."""
        cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": self.table}}}]
        for proto, family in SET_KEYS:
            spec = self._ref(
                name=set_name(proto, family),
                type=[ADDR_TYPE[family], "inet_service"],
                flags=["timeout"],
            )
            cmds.append({"add": {"set": spec}})
        chain = self._ref(name=CHAIN, type="filter", hook="input", prio=PRIORITY, policy="accept")
        cmds.append({"add": {"chain": chain}})
        cmds.append({"flush": {"chain": self._ref(name=CHAIN)}})
        cmds += [{"add": {"rule": self._ref(chain=CHAIN, expr=e)}} for e in self.rules()]
        return cmds

    def _elements(self, op: str, proto: str, family: int, elems: list[Any]) -> Cmd:
        return {op: {"element": self._ref(name=set_name(proto, family), elem=elems)}}

    @staticmethod
    def _timed(entries: Iterable[Entry], now: float) -> list[Any]:
        return [
            {"elem": {"val": elem_key(e.key), "timeout": e.remaining(now)}}
            for e in sorted(entries, key=lambda e: e.key)
        ]

    # -- interface --------------------------------------------------------------------------

    def ensure(self) -> None:
        self.run_batch(self.skeleton())

    def apply(
        self,
        add: Sequence[Entry] = (),
        renew: Sequence[Entry] = (),
        remove: Sequence[GrantKey] = (),
        *,
        now: float,
    ) -> None:
        cmds: list[Cmd] = []
        for proto, family in SET_KEYS:
            fresh = {e.key: e for e in add if (e.key.proto, e.key.family) == (proto, family)}
            setting = {e.key: e for e in renew if (e.key.proto, e.key.family) == (proto, family)}
            gone = {k for k in remove if (k.proto, k.family) == (proto, family)}
            gone -= {*setting, *fresh}
            touched = sorted({*setting, *gone})
            if touched:  # present or not: make it absent first (see the module's docstring)
                keys = [elem_key(k) for k in touched]
                cmds.append(self._elements("add", proto, family, keys))
                cmds.append(self._elements("delete", proto, family, keys))
            timed = {**fresh, **setting}
            if timed:
                cmds.append(self._elements("add", proto, family, self._timed(timed.values(), now)))
        if cmds:
            self.run_batch(cmds)

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

    def _held(self, items: list[dict[str, Any]]) -> list[GrantKey]:
        found: list[GrantKey] = []
        wanted = {set_name(p, f): p for p, f in SET_KEYS}
        for item in items:
            spec = item.get("set")
            if not isinstance(spec, dict) or spec.get("name") not in wanted:
                continue
            proto = wanted[spec["name"]]
            for elem in spec.get("elem", []):
                key = parse_elem(proto, elem)
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
        sets = {i["set"].get("name") for i in items if isinstance(i.get("set"), dict)}
        missing = [set_name(p, f) for p, f in SET_KEYS if set_name(p, f) not in sets]
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
        want = self.rules()
        if len(exprs) != len(want) or exprs[:1] != want[:1]:
            problems.append(f"chain {self.table} {CHAIN} does not hold its {len(want)} rule(s)")
        family_of = {set_name(p, f): f for p, f in SET_KEYS}
        for item in items:  # a count, not a parse: this runs about once a second
            spec = item.get("set")
            if isinstance(spec, dict) and spec.get("name") in family_of:
                held[family_of[spec["name"]]] += len(spec.get("elem", []))
        return held, problems

    def sync(self, entries: Sequence[Entry], *, now: float) -> None:
        cmds = self.skeleton()
        for proto, family in SET_KEYS:
            cmds.append({"flush": {"set": self._ref(name=set_name(proto, family))}})
            mine = [e for e in entries if e.key.proto == proto and e.key.family == family]
            if mine:
                cmds.append(self._elements("add", proto, family, self._timed(mine, now)))
        self.run_batch(cmds)

    def teardown(self) -> None:
        out = self.run_batch([{"list": {"tables": None}}])
        tables = [i.get("table", {}) for i in out.get("nftables", []) if isinstance(i, dict)]
        if any(t.get("family") == FAMILY and t.get("name") == self.table for t in tables):
            self.run_batch([{"delete": {"table": {"family": FAMILY, "name": self.table}}}])

    def describe(self) -> str:
        via = "libnftables" if self.lib is not None else "nft -j"
        return f"nftables (table {FAMILY} {self.table}, {via})"
