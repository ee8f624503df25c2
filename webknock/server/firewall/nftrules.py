"""Our nftables table as data: names of the table, sets and chains, and the commands that
build them (layout and rationale: the docstring of :mod:`.nftables`). Nothing here talks to
the kernel."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any, Final

from webknock.addresses import full_length, parse_address
from webknock.server.firewall.base import FirewallSettings
from webknock.server.firewall.nftlib import Cmd
from webknock.server.grants import PROTOS, Entry, GrantKey

FAMILY: Final = "inet"
CHAIN: Final = "input"
FORWARD: Final = "forward"  # the forward-hook chain of container ports (forward on)
PRIORITY: Final = -1  # "filter - 1": before a filter-priority chain of the admin's or Docker's
ADDR_TYPE: Final = {4: "ipv4_addr", 6: "ipv6_addr"}
PAYLOAD: Final = {4: "ip", 6: "ip6"}

Expr = dict[str, Any]


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


def timed(entries: Iterable[Entry], now: float) -> list[Any]:
    """Elements of `entries`, each with its remaining lifetime."""
    return [
        {"elem": {"val": elem_key(e.key), "timeout": e.remaining(now)}}
        for e in sorted(entries, key=lambda e: e.key)
    ]


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


def nets_of(items: Iterable[Any]) -> set[SetKey]:
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


def sets_of(items: list[dict[str, Any]]) -> list[tuple[SetKey, dict[str, Any]]]:
    """Our sets in a listing of our table, with their specs."""
    found = []
    for item in items:
        spec = item.get("set")
        setkey = parse_set_name(str(spec.get("name"))) if isinstance(spec, dict) else None
        if setkey is not None and isinstance(spec, dict):
            found.append((setkey, spec))
    return found


def _match(left: Any, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


class TableLayout:
    """The table of one instance's settings as nft JSON commands: its sets, its input
    chain and, with forward on, its forward chain, each with its rules in order."""

    def __init__(self, settings: FirewallSettings) -> None:
        self.settings = settings
        self.table = table_name(settings.instance)

    def ref(self, **more: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": self.table, **more}

    def hooks(self) -> list[str]:
        """Our chains, each on the hook of its name."""
        return [CHAIN, FORWARD] if self.settings.forward else [CHAIN]

    def grant_rule(self, setkey: SetKey, chain: str = CHAIN) -> list[Expr]:
        """The rule of `chain` that accepts what the set `setkey` holds: on input by the
        destination port, on forward by the connection's original one (before DNAT)."""
        proto, family, length = setkey
        saddr: dict[str, Any] = {"payload": {"protocol": PAYLOAD[family], "field": "saddr"}}
        if length is not None:
            saddr = {"&": [saddr, mask(family, length)]}
        right = f"@{set_name(*setkey)}"
        if chain == CHAIN:
            dport = {"payload": {"protocol": proto, "field": "dport"}}
            return [_match({"concat": [saddr, dport]}, right), {"accept": None}]
        orig = {"ct": {"key": "proto-dst", "dir": "original"}}
        l4proto = _match({"meta": {"key": "l4proto"}}, proto)
        return [l4proto, _match({"concat": [saddr, orig]}, right), {"accept": None}]

    def protect_rules(self, chain: str = CHAIN) -> list[list[Expr]]:
        """[protect] On input: established/related to offered ports accepted, the rest
        dropped. On forward: new DNAT'ed connections to an offered original port dropped
        (one rule per port: nft lists a set of original ports as "invalid type")."""
        rules: list[list[Expr]] = []
        for proto in PROTOS if self.settings.protect else ():
            ports = self.settings.ports(proto)
            if not ports:
                continue
            if chain == CHAIN:
                dport = _match({"payload": {"protocol": proto, "field": "dport"}}, {"set": ports})
                state = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
                rules += [[dport, state, {"accept": None}], [dport, {"drop": None}]]
                continue
            for port in ports:
                rules.append(
                    [
                        _match({"meta": {"key": "l4proto"}}, proto),
                        _match({"ct": {"key": "proto-dst", "dir": "original"}}, port),
                        _match({"ct": {"key": "status"}}, "dnat", "in"),
                        _match({"ct": {"key": "state"}}, "new", "in"),
                        {"drop": None},
                    ]
                )
        return rules

    def rules(self, nets: Iterable[SetKey] = (), chain: str = CHAIN) -> list[list[Expr]]:
        """The expressions of each rule of `chain`, in order, with network sets `nets`."""
        grants = [self.grant_rule(k, chain) for k in [*HOST_SETS, *sorted(nets)]]
        return grants + self.protect_rules(chain)

    def skeleton(self, nets: Iterable[SetKey] = (), *, drop_forward: bool = False) -> list[Cmd]:
        """Create table, sets (the network sets `nets` too) and chains if missing; rebuild
        the chains' rules; keep elements. `drop_forward`: delete the forward chain (there
        from a run with forward on, off now)."""
        nets = sorted(nets)
        cmds: list[Cmd] = [{"add": {"table": {"family": FAMILY, "name": self.table}}}]
        for proto, family, length in [*HOST_SETS, *nets]:
            spec = self.ref(
                name=set_name(proto, family, length),
                type=[ADDR_TYPE[family], "inet_service"],
                flags=["timeout"],
            )
            cmds.append({"add": {"set": spec}})
        for chain in self.hooks():
            spec = self.ref(name=chain, type="filter", hook=chain, prio=PRIORITY, policy="accept")
            cmds.append({"add": {"chain": spec}})
            cmds.append({"flush": {"chain": self.ref(name=chain)}})
            cmds += [
                {"add": {"rule": self.ref(chain=chain, expr=e)}} for e in self.rules(nets, chain)
            ]
        if drop_forward and not self.settings.forward:
            cmds.append({"delete": {"chain": self.ref(name=FORWARD)}})
        return cmds

    def elements(self, op: str, setkey: SetKey, elems: list[Any]) -> Cmd:
        return {op: {"element": self.ref(name=set_name(*setkey), elem=elems)}}
