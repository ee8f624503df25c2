"""nftables backend: the exact JSON transactions it hands libnftables (or ``nft -j -f -``),
network grants in sets of their own prefix length included."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import SETTINGS, RecordingRunner
from webknock.server.firewall.base import FirewallError
from webknock.server.firewall.nftables import NftablesFirewall, table_name
from webknock.server.grants import Entry, GrantKey

V4 = GrantKey(ipaddress.ip_address("192.0.2.10"), "tcp", 22)
V4B = GrantKey(ipaddress.ip_address("192.0.2.11"), "tcp", 22)
V4U = GrantKey(ipaddress.ip_address("192.0.2.10"), "udp", 51820)
V6 = GrantKey(ipaddress.ip_address("2001:db8::10"), "tcp", 22)
NET4 = GrantKey(ipaddress.ip_address("198.51.100.0"), "tcp", 22, 24)
NET4B = GrantKey(ipaddress.ip_address("203.0.113.0"), "tcp", 22, 24)
NET6 = GrantKey(ipaddress.ip_address("2001:db8:5::"), "udp", 51820, 64)
NOW = 1_800_000_000.0
T = {"family": "inet", "table": "webknock"}
LIST_CHAIN = [{"list": {"chain": {**T, "name": "input"}}}]  # apply: the rules, to know the sets
LIST_TABLE = [{"list": {"table": {"family": "inet", "name": "webknock"}}}]  # ensure, sync


class FakeLib:
    """Records each JSON transaction; answers list commands from a canned listing."""

    def __init__(self, listing: list[dict[str, Any]] | None = None, rc: int = 0) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.listing = listing
        self.rc = rc

    def json_cmd(self, root: dict[str, Any]) -> tuple[int, Any, str]:
        self.batches.append(root["nftables"])
        if self.rc:
            return self.rc, "", "Error: Could not process rule: No such file or directory"
        if "list" in root["nftables"][0]:
            if self.listing is None:
                return 1, "", "Error: No such file or directory\nlist table inet webknock"
            return 0, {"nftables": self.listing}, ""
        return 0, "", ""


def fw(lib: FakeLib, **kw: Any) -> NftablesFirewall:
    return NftablesFirewall(dataclasses.replace(SETTINGS, **kw), RecordingRunner(), lib=lib)


def grant_rule(proto: str, family: int, length: int | None = None) -> dict[str, Any]:
    ip = "ip" if family == 4 else "ip6"
    saddr: dict[str, Any] = {"payload": {"protocol": ip, "field": "saddr"}}
    name = f"{proto}{family}"
    if length is not None:
        saddr = {"&": [saddr, MASKS[family, length]]}
        name += f"_{length}"
    left = {"concat": [saddr, {"payload": {"protocol": proto, "field": "dport"}}]}
    expr = [{"match": {"op": "==", "left": left, "right": f"@{name}"}}, {"accept": None}]
    return {"add": {"rule": {**T, "chain": "input", "expr": expr}}}


MASKS = {(4, 24): "255.255.255.0", (6, 64): "ffff:ffff:ffff:ffff::", (4, 28): "255.255.255.240"}


def protect_rules(proto: str, ports: list[int]) -> list[dict[str, Any]]:
    dport = {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": proto, "field": "dport"}},
            "right": {"set": ports},
        }
    }
    state = {
        "match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}
    }
    return [
        {"add": {"rule": {**T, "chain": "input", "expr": [dport, state, {"accept": None}]}}},
        {"add": {"rule": {**T, "chain": "input", "expr": [dport, {"drop": None}]}}},
    ]


def skeleton(
    protect: bool, nets: list[tuple[str, int, int]] | None = None, forward: bool = False
) -> list[dict[str, Any]]:
    """The table as ensure() makes it; `nets`: network sets (proto, family, length), in order;
    `forward`: with the forward chain."""
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": "webknock"}}}]
    named = [
        ("tcp4", "ipv4_addr"),
        ("tcp6", "ipv6_addr"),
        ("udp4", "ipv4_addr"),
        ("udp6", "ipv6_addr"),
    ]
    named += [(f"{p}{f}_{n}", "ipv4_addr" if f == 4 else "ipv6_addr") for p, f, n in nets or []]
    for name, addr in named:
        spec = {**T, "name": name, "type": [addr, "inet_service"], "flags": ["timeout"]}
        cmds.append({"add": {"set": spec}})
    chain = {**T, "name": "input", "type": "filter", "hook": "input", "prio": -1}
    cmds.append({"add": {"chain": {**chain, "policy": "accept"}}})
    cmds.append({"flush": {"chain": {**T, "name": "input"}}})
    cmds += [grant_rule(p, f) for p in ("tcp", "udp") for f in (4, 6)]
    cmds += [grant_rule(p, f, n) for p, f, n in nets or []]
    if protect:
        cmds += protect_rules("tcp", [22, 2222]) + protect_rules("udp", [51820])
    if forward:
        cmds += forward_chain(protect, nets or [])
    return cmds


ORIG_DPORT = {"ct": {"key": "proto-dst", "dir": "original"}}


def l4proto(proto: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}}


def forward_grant_rule(proto: str, family: int, length: int | None = None) -> dict[str, Any]:
    ip = "ip" if family == 4 else "ip6"
    saddr: dict[str, Any] = {"payload": {"protocol": ip, "field": "saddr"}}
    name = f"{proto}{family}"
    if length is not None:
        saddr = {"&": [saddr, MASKS[family, length]]}
        name += f"_{length}"
    match = {"match": {"op": "==", "left": {"concat": [saddr, ORIG_DPORT]}, "right": f"@{name}"}}
    expr = [l4proto(proto), match, {"accept": None}]
    return {"add": {"rule": {**T, "chain": "forward", "expr": expr}}}


def forward_chain(protect: bool, nets: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """The forward chain's commands: grants by the original port, then (protect) a drop of
    new DNAT'ed connections per offered port."""
    chain = {**T, "name": "forward", "type": "filter", "hook": "forward", "prio": -1}
    cmds: list[dict[str, Any]] = [{"add": {"chain": {**chain, "policy": "accept"}}}]
    cmds.append({"flush": {"chain": {**T, "name": "forward"}}})
    cmds += [forward_grant_rule(p, f) for p in ("tcp", "udp") for f in (4, 6)]
    cmds += [forward_grant_rule(p, f, n) for p, f, n in nets]
    for proto, port in [("tcp", 22), ("tcp", 2222), ("udp", 51820)] if protect else []:
        expr = [
            l4proto(proto),
            {"match": {"op": "==", "left": ORIG_DPORT, "right": port}},
            {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
            {"drop": None},
        ]
        cmds.append({"add": {"rule": {**T, "chain": "forward", "expr": expr}}})
    return cmds


def elems(op: str, name: str, elem: list[Any]) -> dict[str, Any]:
    return {op: {"element": {**T, "name": name, "elem": elem}}}


def test_table_name_per_instance() -> None:
    assert table_name("webknock") == "webknock"
    assert table_name("default") == "webknock"
    assert table_name("site-b") == "webknock_site-b"


def test_add_v4_and_v6_is_one_transaction_setting_each_timeout() -> None:
    """A new grant is not in the kernel: one `add element` with its timeout per set."""
    lib = FakeLib()
    fw(lib).apply([Entry(V4, NOW + 60), Entry(V6, NOW + 90.5), Entry(V4U, NOW + 30)], now=NOW)
    k4, k6, ku = (
        {"concat": ["192.0.2.10", 22]},
        {"concat": ["2001:db8::10", 22]},
        {"concat": ["192.0.2.10", 51820]},
    )
    assert lib.batches == [
        [
            elems("add", "tcp4", [{"elem": {"val": k4, "timeout": 60}}]),
            elems("add", "tcp6", [{"elem": {"val": k6, "timeout": 91}}]),
            elems("add", "udp4", [{"elem": {"val": ku, "timeout": 30}}]),
        ]
    ]


def test_renew_replaces_the_timeout_and_removal_tolerates_an_expired_element() -> None:
    lib = FakeLib()
    fw(lib).apply([], [Entry(V4B, NOW + 3600)], [V4], now=NOW)
    a, b = {"concat": ["192.0.2.10", 22]}, {"concat": ["192.0.2.11", 22]}
    assert lib.batches == [
        [
            elems("add", "tcp4", [a, b]),
            elems("delete", "tcp4", [a, b]),
            elems("add", "tcp4", [{"elem": {"val": b, "timeout": 3600}}]),
        ]
    ]


def test_new_and_renewed_in_one_set_share_the_timed_add() -> None:
    lib = FakeLib()
    fw(lib).apply([Entry(V4, NOW + 60)], [Entry(V4B, NOW + 120)], [], now=NOW)
    a, b = {"concat": ["192.0.2.10", 22]}, {"concat": ["192.0.2.11", 22]}
    assert lib.batches == [
        [
            elems("add", "tcp4", [b]),
            elems("delete", "tcp4", [b]),
            elems(
                "add",
                "tcp4",
                [{"elem": {"val": a, "timeout": 60}}, {"elem": {"val": b, "timeout": 120}}],
            ),
        ]
    ]


def test_empty_batch_touches_nothing() -> None:
    lib = FakeLib()
    fw(lib).apply([], [], [], now=NOW)
    assert lib.batches == []


@pytest.mark.parametrize("protect", [False, True])
def test_ensure_builds_table_sets_chain_and_rules(protect: bool) -> None:
    lib = FakeLib()
    fw(lib, protect=protect).ensure()
    assert lib.batches == [LIST_TABLE, skeleton(protect)], "no table yet: no network set"


def test_sync_is_one_transaction_flushing_and_refilling_each_set() -> None:
    lib = FakeLib()
    fw(lib).sync([Entry(V6, NOW + 10), Entry(V4, NOW + 20)], now=NOW)
    k4, k6 = {"concat": ["192.0.2.10", 22]}, {"concat": ["2001:db8::10", 22]}
    refill = [
        {"flush": {"set": {**T, "name": "tcp4"}}},
        elems("add", "tcp4", [{"elem": {"val": k4, "timeout": 20}}]),
        {"flush": {"set": {**T, "name": "tcp6"}}},
        elems("add", "tcp6", [{"elem": {"val": k6, "timeout": 10}}]),
        {"flush": {"set": {**T, "name": "udp4"}}},
        {"flush": {"set": {**T, "name": "udp6"}}},
    ]
    assert lib.batches == [LIST_TABLE, [*skeleton(False), *refill]]


def test_teardown_deletes_only_our_table() -> None:
    lib = FakeLib([{"table": {"family": "inet", "name": "webknock"}}, {"table": {"name": "x"}}])
    fw(lib).teardown()
    assert lib.batches[-1] == [{"delete": {"table": {"family": "inet", "name": "webknock"}}}]
    other = FakeLib([{"table": {"family": "inet", "name": "webknock_b"}}])
    fw(other).teardown()
    assert other.batches == [[{"list": {"tables": None}}]], "another instance's table stays"


def listing(protect: bool = False, drop_rule: bool = False) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
    items.append({"table": {"family": "inet", "name": "webknock", "handle": 1}})
    for cmd in skeleton(protect):
        kind, spec = next(iter(cmd.items()))
        if kind == "add" and "set" in spec:
            items.append({"set": dict(spec["set"])})
        if kind == "add" and "chain" in spec:
            items.append({"chain": spec["chain"]})
        if kind == "add" and "rule" in spec:
            items.append({"rule": spec["rule"]})
    if drop_rule:
        items.pop()
    items[2]["set"]["elem"] = [
        {"elem": {"val": {"concat": ["192.0.2.10", 22]}, "timeout": 60, "expires": 59}},
        {"concat": ["192.0.2.11", 22]},
        {"elem": {"val": {"concat": ["not-an-address", 22]}}},
    ]
    items[3]["set"]["elem"] = [{"elem": {"val": {"concat": ["2001:db8::10", 22]}}}]
    return items


def test_listed_parses_elements_with_and_without_timeout() -> None:
    lib = FakeLib(listing())
    assert fw(lib).listed() == [V4, V4B, V6]
    assert lib.batches == [[{"list": {"table": {"family": "inet", "name": "webknock"}}}]]
    assert fw(FakeLib(None)).listed() == [], "no table yet: nothing held"


def test_census_counts_and_checks_our_objects() -> None:
    # counted, not parsed (nft lists only valid keys; the bogus one of `listing` counts too)
    assert fw(FakeLib(listing(protect=True)), protect=True).census() == ({4: 3, 6: 1}, [])
    held, problems = fw(FakeLib(listing(protect=True, drop_rule=True)), protect=True).census()
    assert held == {4: 3, 6: 1}
    assert problems == ["chain webknock input does not hold its 8 rule(s)"]
    _, problems = fw(FakeLib(listing(protect=False)), protect=True).census()
    assert problems == ["chain webknock input does not hold its 8 rule(s)"]
    assert fw(FakeLib(None)).census() == ({4: 0, 6: 0}, ["table inet webknock missing"])


def test_failed_transaction_raises_with_the_library_error() -> None:
    with pytest.raises(FirewallError, match="libnftables: Error: Could not process rule"):
        fw(FakeLib(rc=1)).apply([Entry(V4, NOW + 60)], now=NOW)


def test_without_the_binding_the_same_json_goes_to_nft() -> None:
    runner = RecordingRunner({"nft": ""})
    firewall = NftablesFirewall(SETTINGS, runner, lib=None)
    firewall.apply([Entry(V4, NOW + 5)], now=NOW)
    assert runner.calls[0][0] == ["nft", "-j", "-f", "-"]
    lib = FakeLib()
    fw(lib).apply([Entry(V4, NOW + 5)], now=NOW)
    assert json.loads(runner.calls[0][1] or "") == {"nftables": lib.batches[0]}
    listed = RecordingRunner({"nft": json.dumps({"nftables": listing()})})
    assert NftablesFirewall(SETTINGS, listed, lib=None).listed() == [V4, V4B, V6]
    assert "nft -j" in NftablesFirewall(SETTINGS, listed, lib=None).describe()


def test_nft_failure_raises() -> None:
    runner = RecordingRunner(fail="nft")
    with pytest.raises(FirewallError, match="nft failed"):
        NftablesFirewall(SETTINGS, runner, lib=None).ensure()


def test_auto_prefers_nftables_then_iptables_with_ipset(
    monkeypatch: pytest.MonkeyPatch, instance_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from webknock import config
    from webknock.server.firewall import make_firewall, teardown_all
    from webknock.server.firewall.ipset import IpsetFirewall
    from webknock.server.firewall.iptables import IptablesFirewall

    cfg = dataclasses.replace(config.load(instance_config), backend="auto")
    usable: dict[str, str | None] = {"nft": None, "ipt": None, "ipset": None}
    monkeypatch.setattr(NftablesFirewall, "unusable", classmethod(lambda c, r=None: usable["nft"]))
    monkeypatch.setattr(IptablesFirewall, "unusable", classmethod(lambda c, r=None: usable["ipt"]))
    monkeypatch.setattr(IpsetFirewall, "unusable", classmethod(lambda c, r=None: usable["ipset"]))
    monkeypatch.setattr("webknock.server.firewall.nftables.load_binding", FakeLib)
    with caplog.at_level("INFO"):
        chosen = make_firewall(cfg, RecordingRunner())
    assert isinstance(chosen, NftablesFirewall)
    assert "backend auto: chose nftables (table inet webknock, libnftables)" in caplog.text

    usable["nft"] = "nft: command not found"
    assert type(make_firewall(cfg, RecordingRunner())) is IpsetFirewall
    usable["ipset"] = "ipset not found"
    assert type(make_firewall(cfg, RecordingRunner())) is IptablesFirewall
    usable["ipt"] = "iptables-save not found"
    with pytest.raises(FirewallError, match="no usable firewall backend"):
        make_firewall(cfg, RecordingRunner())

    torn: list[str] = []
    for cls in (NftablesFirewall, IptablesFirewall, IpsetFirewall):
        monkeypatch.setattr(cls, "teardown", lambda self: torn.append(self.describe()))
    usable.update(nft=None, ipt=None, ipset=None)
    assert teardown_all(dataclasses.replace(cfg, ipset="no"), RecordingRunner()) == torn
    assert [t.split(" ")[0] for t in torn] == ["nftables", "iptables+ipset"]


def table_listing(
    nets: list[tuple[str, int, int]],
    elements: dict[str, list[Any]] | None = None,
    protect: bool = False,
    forward: bool = False,
) -> list[dict[str, Any]]:
    """Our table as nft lists it, with network sets `nets` and set elements by set name."""
    items: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
    items.append({"table": {"family": "inet", "name": "webknock", "handle": 1}})
    for cmd in skeleton(protect, nets, forward):
        kind, spec = next(iter(cmd.items()))
        if kind == "add" and "set" in spec:
            elem = (elements or {}).get(spec["set"]["name"])
            items.append({"set": {**spec["set"], **({"elem": elem} if elem else {})}})
        if kind == "add" and ("chain" in spec or "rule" in spec):
            items.append(dict(spec))
    return items


def timed(key: dict[str, Any], seconds: int) -> dict[str, Any]:
    return {"elem": {"val": key, "timeout": seconds}}


def test_the_first_network_grant_of_its_length_brings_its_set_and_rule() -> None:
    """One transaction: the set tcp4_24 and its rule (the chain rebuilt, protect rules last),
    then the element: the network's address, matched by the masked source address."""
    lib = FakeLib()  # no table yet
    firewall = fw(lib)
    firewall.apply([Entry(NET4, NOW + 60), Entry(V4, NOW + 60)], now=NOW)
    k4, n4 = {"concat": ["192.0.2.10", 22]}, {"concat": ["198.51.100.0", 22]}
    assert lib.batches == [
        LIST_CHAIN,
        [
            *skeleton(False, [("tcp", 4, 24)]),
            elems("add", "tcp4", [timed(k4, 60)]),
            elems("add", "tcp4_24", [timed(n4, 60)]),
        ],
    ]
    lib.batches.clear()
    firewall.apply([Entry(NET4B, NOW + 30)], [Entry(NET4, NOW + 90)], now=NOW)
    m4 = {"concat": ["203.0.113.0", 22]}
    assert lib.batches == [
        [
            elems("add", "tcp4_24", [n4]),
            elems("delete", "tcp4_24", [n4]),
            elems("add", "tcp4_24", [timed(n4, 90), timed(m4, 30)]),
        ]
    ], "the set is known now: no listing, no rebuild, a renewal as for an address"


def test_a_network_set_another_process_made_keeps_its_rule() -> None:
    """The chain is listed on a miss, so a rebuild never drops another process's set."""
    lib = FakeLib(table_listing([("udp", 6, 64)]))
    fw(lib, protect=True).apply([Entry(NET4, NOW + 60)], now=NOW)
    assert lib.batches[0] == LIST_CHAIN
    rebuilt = skeleton(True, [("tcp", 4, 24), ("udp", 6, 64)])
    assert lib.batches[1] == [
        *rebuilt,
        elems("add", "tcp4_24", [timed({"concat": ["198.51.100.0", 22]}, 60)]),
    ]


def test_removing_a_network_grant_whose_set_is_gone_touches_nothing() -> None:
    lib = FakeLib(table_listing([]))
    fw(lib).apply([], [], [NET6], now=NOW)
    assert lib.batches == [LIST_CHAIN], "no set udp6_64: its element is not there either"
    lib = FakeLib(table_listing([("udp", 6, 64)]))
    fw(lib).apply([], [], [NET6], now=NOW)
    n6 = {"concat": ["2001:db8:5::", 51820]}
    assert lib.batches[1] == [elems("add", "udp6_64", [n6]), elems("delete", "udp6_64", [n6])]


def test_a_failed_batch_forgets_the_known_sets() -> None:
    lib = FakeLib()
    firewall = fw(lib)
    firewall.apply([Entry(NET4, NOW + 60)], now=NOW)
    lib.rc = 1
    with pytest.raises(FirewallError):
        firewall.apply([Entry(NET4, NOW + 60)], now=NOW)
    lib.rc, lib.listing = 0, table_listing([])
    lib.batches.clear()
    firewall.apply([Entry(NET4, NOW + 60)], now=NOW)
    assert lib.batches[0] == LIST_CHAIN and lib.batches[1][0] == skeleton(False)[0]


def test_ensure_keeps_the_network_sets_and_their_rules() -> None:
    lib = FakeLib(table_listing([("tcp", 4, 24), ("udp", 6, 64)]))
    fw(lib, protect=True).ensure()
    assert lib.batches == [LIST_TABLE, skeleton(True, [("tcp", 4, 24), ("udp", 6, 64)])]


def test_sync_makes_the_network_sets_it_needs_and_drops_the_others() -> None:
    lib = FakeLib(table_listing([("tcp", 4, 28), ("udp", 6, 64)]))
    fw(lib).sync([Entry(NET4, NOW + 20), Entry(NET6, NOW + 10), Entry(V4, NOW + 5)], now=NOW)
    n4, n6 = {"concat": ["198.51.100.0", 22]}, {"concat": ["2001:db8:5::", 51820]}
    assert lib.batches == [
        LIST_TABLE,
        [
            *skeleton(False, [("tcp", 4, 24), ("udp", 6, 64)]),
            {"flush": {"set": {**T, "name": "tcp4"}}},
            elems("add", "tcp4", [timed({"concat": ["192.0.2.10", 22]}, 5)]),
            {"flush": {"set": {**T, "name": "tcp6"}}},
            {"flush": {"set": {**T, "name": "udp4"}}},
            {"flush": {"set": {**T, "name": "udp6"}}},
            {"flush": {"set": {**T, "name": "tcp4_24"}}},
            elems("add", "tcp4_24", [timed(n4, 20)]),
            {"flush": {"set": {**T, "name": "udp6_64"}}},
            elems("add", "udp6_64", [timed(n6, 10)]),
            {"delete": {"set": {**T, "name": "tcp4_28"}}},  # after its rule went
        ],
    ]


def test_listed_and_census_read_network_sets() -> None:
    nets = [("tcp", 4, 24), ("udp", 6, 64)]
    elements: dict[str, list[Any]] = {
        "tcp4": [{"concat": ["198.51.100.7", 22]}],
        "tcp4_24": [{"elem": {"val": {"concat": ["198.51.100.0", 22]}, "timeout": 9}}],
        "udp6_64": [{"concat": ["2001:db8:5::", 51820]}, {"concat": ["2001:db8:5::1", 51820]}],
    }
    lib = FakeLib(table_listing(nets, elements))
    inner = GrantKey(ipaddress.ip_address("198.51.100.7"), "tcp", 22)
    assert fw(lib).listed() == [inner, NET4, NET6], "an element with host bits set is not ours"
    assert fw(lib).census() == ({4: 2, 6: 2}, [])
    broken = table_listing(nets, elements)
    broken.remove({"rule": grant_rule("tcp", 4, 24)["add"]["rule"]})
    broken.append({"rule": grant_rule("tcp", 4)["add"]["rule"]})  # the count alone is right
    _, problems = fw(FakeLib(broken)).census()
    assert problems == ["chain webknock input does not hold its 6 rule(s)"]


def test_set_names() -> None:
    from webknock.server.firewall.nftables import mask, parse_set_name, set_name

    assert set_name("tcp", 4) == "tcp4" and set_name("udp", 6, 64) == "udp6_64"
    assert parse_set_name("udp6_64") == ("udp", 6, 64)
    assert parse_set_name("tcp4") == ("tcp", 4, None)
    for other in ("tcp4_32", "tcp4_0", "udp6_128", "tcp4_024", "icmp4_8", "tcp4_", "x"):
        assert parse_set_name(other) is None, other
    assert {k: mask(*k) for k in MASKS} == MASKS
    assert mask(6, 124) == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0"


def test_a_network_set_left_without_its_rule_is_repaired_not_looped_on() -> None:
    """Someone flushed our chain: census names the set's missing rule, ensure gives it back,
    and a sync that needs no such set deletes it."""
    orphaned = [i for i in table_listing([("tcp", 4, 24)]) if "rule" not in i]
    _, problems = fw(FakeLib(orphaned)).census()
    assert problems == ["chain webknock input does not hold its 5 rule(s)"]
    lib = FakeLib(orphaned)
    fw(lib).ensure()
    assert lib.batches == [LIST_TABLE, skeleton(False, [("tcp", 4, 24)])]
    lib = FakeLib(orphaned)
    fw(lib).sync([], now=NOW)
    assert lib.batches[1][-1] == {"delete": {"set": {**T, "name": "tcp4_24"}}}


# -- forward on: container ports published through DNAT ----------------------------------


def test_ensure_with_forward_builds_the_forward_chain_after_the_input_chain() -> None:
    lib = FakeLib()
    fw(lib, protect=True, forward=True).ensure()
    assert lib.batches == [LIST_TABLE, skeleton(True, forward=True)]
    assert lib.batches[1][-1]["add"]["rule"]["chain"] == "forward"


def test_the_first_network_grant_brings_its_rule_to_both_chains() -> None:
    lib = FakeLib()
    fw(lib, protect=True, forward=True).apply([Entry(NET4, NOW + 60)], now=NOW)
    n4 = {"concat": ["198.51.100.0", 22]}
    assert lib.batches[1] == [
        *skeleton(True, [("tcp", 4, 24)], forward=True),
        elems("add", "tcp4_24", [timed(n4, 60)]),
    ]
    assert forward_grant_rule("tcp", 4, 24) in lib.batches[1]


def test_forward_off_deletes_a_forward_chain_left_from_before() -> None:
    """ensure and sync, which list the whole table, delete it; nothing else does."""
    left = table_listing([], protect=True, forward=True)
    lib = FakeLib(left)
    fw(lib, protect=True).ensure()
    drop = {"delete": {"chain": {**T, "name": "forward"}}}
    assert lib.batches == [LIST_TABLE, [*skeleton(True), drop]]
    lib = FakeLib(left)
    fw(lib, protect=True).sync([], now=NOW)
    assert drop in lib.batches[1] and lib.batches[1].index(drop) == len(skeleton(True))
    lib = FakeLib(table_listing([], protect=True))
    fw(lib, protect=True).ensure()
    assert drop not in lib.batches[1], "no forward chain there: nothing to delete"


def test_census_checks_the_forward_chain() -> None:
    with_forward = table_listing([("tcp", 4, 24)], protect=True, forward=True)
    assert fw(FakeLib(with_forward), protect=True, forward=True).census() == ({4: 0, 6: 0}, [])
    _, problems = fw(FakeLib(with_forward), protect=True).census()
    assert problems == ["chain webknock forward present, forward is off"]
    without = table_listing([("tcp", 4, 24)], protect=True)
    _, problems = fw(FakeLib(without), protect=True, forward=True).census()
    assert problems == ["chain webknock forward missing or not on the forward hook"]
    short = with_forward[:-1]  # the last drop rule gone
    _, problems = fw(FakeLib(short), protect=True, forward=True).census()
    assert problems == ["chain webknock forward does not hold its 8 rule(s)"]


def test_docker_user_is_the_container_chain_nftables_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    found = FakeLib([{"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER"}}])
    monkeypatch.setattr("webknock.server.firewall.nftables.load_binding", lambda: found)
    assert NftablesFirewall.container_chain() == "chain ip filter DOCKER-USER exists"
    chain = {"family": "ip", "table": "filter", "name": "DOCKER-USER"}
    assert found.batches == [[{"list": {"chain": chain}}]]
    monkeypatch.setattr("webknock.server.firewall.nftables.load_binding", lambda: FakeLib(None))
    assert NftablesFirewall.container_chain() is None
