"""Grant engine with an in-memory firewall: open, renew, reap, revoke, failure handling,
the grant limits, and who asked (source) in every event."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.fakes import MemoryFirewall
from webknock.addresses import Address
from webknock.server.engine import GrantEngine, Limits
from webknock.server.events import Event, EventBus
from webknock.server.grants import Entry, GrantKey, GrantRequest
from webknock.server.state import StateStore

A = ipaddress.ip_address("192.0.2.10")
B = ipaddress.ip_address("2001:db8::10")
NOW = 1_800_000_000.0


def req(
    ip: Address = A,
    ports: tuple[tuple[str, int], ...] = (("tcp", 22),),
    time: int = 60,
    rid: str = "a" * 32,
    source: str = "knock",
) -> GrantRequest:
    return GrantRequest(rid, ip, ports, time, source, user_agent="test-agent")


def engine_with(
    tmp_path: Path, limits: Limits | None = None
) -> tuple[GrantEngine, MemoryFirewall, list[Event]]:
    fw = MemoryFirewall()
    events: list[Event] = []
    store = StateStore(tmp_path / "s.db")
    return GrantEngine("webknock", store, fw, EventBus(events.append), limits), fw, events


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GrantEngine, MemoryFirewall, list[Event]]:
    return engine_with(tmp_path)


def test_open_adds_rule_state_and_event(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    out = engine.open([req(ports=(("tcp", 22), ("udp", 51820)))], NOW)
    assert out["a" * 32].ok and out["a" * 32].expires == int(NOW + 60)
    assert set(fw.held) == {GrantKey(A, "tcp", 22), GrantKey(A, "udp", 51820)}
    assert len(fw.batches) == 1 and len(fw.batches[0][0]) == 2
    grants = engine.store.read().live(NOW)
    assert {(g.key.proto, g.key.port, g.expires, g.renew_count) for g in grants} == {
        ("tcp", 22, NOW + 60, 0),
        ("udp", 51820, NOW + 60, 0),
    }
    assert [e.kind for e in events] == ["open", "open"]
    assert events[0].user_agent == "test-agent"
    assert {(e.source, e.client) for e in events} == {("knock", None)}


def test_renewal_extends_without_adding(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    engine.open([req()], NOW)
    out = engine.open([req(time=100)], NOW + 30)
    assert out["a" * 32].expires == int(NOW + 130)
    add, renew, _ = fw.batches[-1]
    assert add == [] and [e.key for e in renew] == [GrantKey(A, "tcp", 22)]
    (grant,) = engine.store.read().live(NOW + 30)
    assert grant.renew_count == 1 and grant.first_opened == NOW and grant.last_renewed == NOW + 30
    assert [e.kind for e in events] == ["open", "renew"]


def test_shorter_renewal_never_shortens(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, _, _ = setup
    engine.open([req(time=600)], NOW)
    out = engine.open([req(time=10)], NOW + 1)
    assert out["a" * 32].expires == int(NOW + 600)


def test_batch_of_many_requests_is_one_firewall_batch(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    reqs = [req(ip=ipaddress.ip_address(f"198.51.100.{i}"), rid=f"{i:032x}") for i in range(1, 51)]
    out = engine.open(reqs, NOW)
    assert all(o.ok for o in out.values()) and len(out) == 50
    assert len(fw.batches) == 1 and len(fw.batches[0][0]) == 50


def test_failed_batch_rolls_back_and_reports(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    fw.fail_apply = fw.fail_sync = True
    out = engine.open([req()], NOW)
    assert not out["a" * 32].ok and out["a" * 32].errorcode == "FIREWALL"
    assert engine.store.read().all() == []
    assert fw.held == {} and events == []


def test_failed_batch_repaired_by_full_sync(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    engine.open([req(rid="b" * 32, ip=B)], NOW)
    fw.fail_apply = True
    out = engine.open([req()], NOW)
    assert out["a" * 32].ok
    assert set(fw.held) == {GrantKey(A, "tcp", 22), GrantKey(B, "tcp", 22)}


def test_reap_removes_only_expired(setup: tuple[GrantEngine, MemoryFirewall, list[Event]]) -> None:
    engine, fw, events = setup
    engine.open([req(time=10), req(ip=B, time=100, rid="b" * 32)], NOW)
    gone = engine.reap(NOW + 10)
    assert [g.key.ip for g in gone] == [A]
    assert set(fw.held) == {GrantKey(B, "tcp", 22)}
    assert [g.key.ip for g in engine.store.read().all()] == [B]
    assert events[-1].kind == "expire"
    assert engine.reap(NOW + 11) == []


def test_revoke_filters(setup: tuple[GrantEngine, MemoryFirewall, list[Event]]) -> None:
    engine, fw, _ = setup
    engine.open([req(ports=(("tcp", 22), ("tcp", 2222), ("udp", 51820)))], NOW)
    assert [g.key.port for g in engine.revoke(A, "tcp", 2222, NOW)] == [2222]
    assert sorted(g.key.port for g in engine.revoke(A, None, None, NOW)) == [22, 51820]
    assert fw.held == {}
    assert engine.revoke(A, None, None, NOW) == []


def test_only_a_revoke_is_a_durable_commit(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoke must not come back after a power loss; a grant or an expiry lost that way
    fails closed (the kernel lost it too; reconcile repeats an expiry)."""
    engine, _, _ = setup
    durable: list[tuple[str, bool]] = []
    real = engine.store.transaction

    def transaction(**kw: bool) -> object:
        durable.append((step, kw.get("durable", False)))
        return real(**kw)

    monkeypatch.setattr(engine.store, "transaction", transaction)
    step = "open"
    engine.open([req(ports=(("tcp", 22), ("tcp", 2222)))], NOW)
    step = "reap"
    engine.reap(NOW + 1)
    step = "revoke"
    engine.revoke(A, "tcp", 2222, NOW)
    step = "expire"
    engine.reap(NOW + 100)
    assert durable == [("open", False), ("reap", False), ("revoke", True), ("expire", False)]


def test_reconcile_restores_live_and_drops_expired(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    engine.open([req(time=10), req(ip=B, time=100, rid="b" * 32)], NOW)
    fw.held.clear()  # kernel lost everything (reboot)
    fw.held[GrantKey(ipaddress.ip_address("203.0.113.9"), "tcp", 22)] = NOW + 5  # a stray
    assert engine.reconcile(NOW + 20) == 1
    assert set(fw.held) == {GrantKey(B, "tcp", 22)}
    assert [g.key.ip for g in engine.store.read().all()] == [B]


def test_drift_reports_missing_extra(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    engine.open([req()], NOW)
    assert engine.drift(NOW).clean
    stray = GrantKey(B, "udp", 51820)
    fw.held = {stray: NOW + 10}
    drift = engine.drift(NOW)
    assert drift.missing == [GrantKey(A, "tcp", 22)] and drift.extra == [stray]


def test_held_events_are_delivered_in_order_at_the_end_even_on_error() -> None:
    got: list[str] = []
    bus = EventBus(lambda e: got.append(e.ip))

    def ev(ip: str) -> Event:
        return Event("open", NOW, "webknock", ip)

    with pytest.raises(RuntimeError), bus.held():
        bus.emit(ev("192.0.2.1"))
        with bus.held():  # nested: delivered at the outermost end
            bus.emit(ev("192.0.2.2"))
        assert got == []
        raise RuntimeError("after the commit, writing an answer failed")
    assert got == ["192.0.2.1", "192.0.2.2"]
    bus.emit(ev("192.0.2.3"))
    assert got[-1] == "192.0.2.3", "not held any more"


def test_events_say_who_asked(setup: tuple[GrantEngine, MemoryFirewall, list[Event]]) -> None:
    """The source is what root knows asked: a knock (webknockd) or an admin (webknockctl);
    a v2 request names its enrolled client."""
    engine, _, events = setup
    engine.open([req(source="admin")], NOW)
    v2 = GrantRequest("b" * 32, B, (("tcp", 22),), 60, "knock", client="alice")
    engine.open([v2], NOW)
    assert [(e.kind, e.ip, e.source, e.client) for e in events] == [
        ("open", "192.0.2.10", "admin", None),
        ("open", "2001:db8::10", "knock", "alice"),
    ]
    assert events[1].to_dict()["client"] == "alice" and "(client alice)" in events[1].describe()
    with pytest.raises(ValueError, match="source must be one of knock, admin"):
        GrantRequest("c" * 32, A, (("tcp", 22),), 60, "webknockctl")


# -- limits ------------------------------------------------------------------------------


def ip(text: str) -> Address:
    return ipaddress.ip_address(text)


def test_instance_limit_refuses_only_the_request_beyond_it(tmp_path: Path) -> None:
    engine, fw, events = engine_with(tmp_path, Limits(total=3, per_prefix=256))
    reqs = [req(ip(f"198.51.100.{i}"), rid=f"{i:032x}") for i in range(1, 5)]
    out = engine.open(reqs, NOW)
    assert [out[r.id].ok for r in reqs] == [True, True, True, False]
    refused = out[reqs[3].id]
    assert refused.errorcode == "LIMIT" and refused.error == (
        "this server holds its limit of 3 grants"
    )
    assert len(fw.held) == 3 and len(fw.batches) == 1 and len(events) == 3
    assert len(engine.store.read().all()) == 3


def test_a_request_of_several_ports_counts_each(tmp_path: Path) -> None:
    engine, fw, _ = engine_with(tmp_path, Limits(total=3, per_prefix=256))
    two = (("tcp", 22), ("udp", 51820))
    out = engine.open([req(A, two, rid="1" * 32), req(B, two, rid="2" * 32)], NOW)
    assert out["1" * 32].ok and out["2" * 32].errorcode == "LIMIT", "2 + 2 > 3: all or none"
    assert sorted(map(str, fw.held)) == ["192.0.2.10:tcp/22", "192.0.2.10:udp/51820"]
    out = engine.open([req(B, (("tcp", 22),), rid="3" * 32)], NOW)
    assert out["3" * 32].ok, "one more fits"


def test_prefix_limit_counts_an_ipv6_64_together(tmp_path: Path) -> None:
    engine, fw, _ = engine_with(tmp_path, Limits(total=100, per_prefix=2))
    reqs = [
        req(ip("2001:db8::1"), rid="1" * 32),
        req(ip("2001:db8::ffff:1"), rid="2" * 32),
        req(ip("2001:db8::2:0:0:3"), rid="3" * 32),  # still 2001:db8::/64
        req(ip("2001:db8:0:1::1"), rid="4" * 32),  # the next /64
        req(ip("192.0.2.1"), rid="5" * 32),  # an IPv4 address is a prefix of its own
        req(ip("192.0.2.2"), rid="6" * 32),
    ]
    out = engine.open(reqs, NOW)
    assert [r.id[0] for r in reqs if not out[r.id].ok] == ["3"]
    assert out["3" * 32].error == "2001:db8::/64 holds its limit of 2 grants"
    assert len(fw.held) == 5
    out = engine.open([req(ip("192.0.2.1"), (("tcp", 2222), ("udp", 51820)), rid="7" * 32)], NOW)
    assert out["7" * 32].errorcode == "LIMIT", "192.0.2.1/32 has 1, 1 + 2 > 2"


def test_renewals_are_never_refused_and_expired_grants_do_not_count(tmp_path: Path) -> None:
    engine, _, events = engine_with(tmp_path, Limits(total=2, per_prefix=1))
    out = engine.open([req(A, rid="1" * 32), req(B, rid="2" * 32, time=10)], NOW)
    assert all(o.ok for o in out.values())
    out = engine.open([req(A, rid="3" * 32, time=600), req(ip("192.0.2.99"), rid="4" * 32)], NOW)
    assert out["3" * 32].ok and out["3" * 32].expires == int(NOW + 600), "a renewal at the limit"
    assert out["4" * 32].errorcode == "LIMIT"
    out = engine.open([req(ip("192.0.2.99"), rid="5" * 32)], NOW + 11)  # B has expired
    assert out["5" * 32].ok, "an expired grant, not reaped yet, takes no place"
    assert [e.kind for e in events] == ["open", "open", "renew", "open"]


def test_the_same_grant_twice_in_a_batch_counts_once(tmp_path: Path) -> None:
    engine, fw, _ = engine_with(tmp_path, Limits(total=1, per_prefix=1))
    out = engine.open([req(rid="1" * 32), req(rid="2" * 32, time=120)], NOW)
    assert out["1" * 32].ok and out["2" * 32].ok
    assert out["1" * 32].expires == out["2" * 32].expires == int(NOW + 120)
    assert len(fw.held) == 1


def test_a_batch_all_beyond_the_limits_changes_nothing(tmp_path: Path) -> None:
    engine, fw, events = engine_with(tmp_path, Limits(total=1, per_prefix=1))
    engine.open([req()], NOW)
    batches = len(fw.batches)
    out = engine.open([req(B, rid="b" * 32)], NOW)
    assert out["b" * 32].errorcode == "LIMIT"
    assert len(fw.batches) == batches and len(events) == 1, "no empty firewall batch"


# -- the enrolled client of a grant (protocol v2) ----------------------------------------


def client_req(
    client: str | None, ip: Address = A, rid: str = "c" * 32, time: int = 60, port: int = 22
) -> GrantRequest:
    return GrantRequest(rid, ip, (("tcp", port),), time, "knock", client)


def test_revoke_client_closes_only_that_clients_grants(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    engine.open(
        [
            client_req("alice", A, "1" * 32),
            client_req("alice", B, "2" * 32, port=2222),
            client_req("bob", ip("192.0.2.20"), "3" * 32),
            client_req(None, ip("192.0.2.30"), "4" * 32),
        ],
        NOW,
    )
    gone = engine.revoke_client("alice", NOW + 1)
    assert sorted(str(g.key) for g in gone) == ["192.0.2.10:tcp/22", "[2001:db8::10]:tcp/2222"]
    assert {g.client for g in gone} == {"alice"}
    assert {str(k.ip) for k in fw.held} == {"192.0.2.20", "192.0.2.30"}
    assert {(str(g.key.ip), g.client) for g in engine.store.read().all()} == {
        ("192.0.2.20", "bob"),
        ("192.0.2.30", None),
    }
    revoked = [e for e in events if e.kind == "revoke"]
    assert [(e.client, e.reason) for e in revoked] == [("alice", "client revoked by admin")] * 2
    assert engine.revoke_client("alice", NOW + 2) == []
    assert engine.revoke_client("carol", NOW + 2) == []


def test_revoke_client_is_a_durable_commit(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _, _ = setup
    engine.open([client_req("alice")], NOW)
    durable: list[bool] = []
    real = engine.store.transaction

    def transaction(**kw: bool) -> object:
        durable.append(kw.get("durable", False))
        return real(**kw)

    monkeypatch.setattr(engine.store, "transaction", transaction)
    assert len(engine.revoke_client("alice", NOW, reason="key leaked")) == 1
    assert durable == [True]


def test_revoke_client_closes_expired_grants_not_reaped_yet(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    engine.open([client_req("alice", time=10)], NOW)
    assert len(engine.revoke_client("alice", NOW + 20)) == 1
    assert fw.held == {} and engine.store.read().all() == []


def test_a_grant_records_who_opened_or_renewed_it_last(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, _, events = setup
    engine.open([client_req("alice", time=600)], NOW)
    engine.open([client_req("bob", time=60)], NOW + 1)  # renewal: the expiry stays
    (grant,) = engine.store.read().all()
    assert (grant.client, grant.expires, grant.renew_count) == ("bob", NOW + 600, 1)
    assert [(e.kind, e.client) for e in events] == [("open", "alice"), ("renew", "bob")]
    assert engine.revoke_client("alice", NOW + 2) == []
    engine.open([client_req(None)], NOW + 3)  # renewed by v1 (or an admin): no client
    assert [g.client for g in engine.store.read().all()] == [None]


def test_in_one_batch_the_longer_request_names_the_client(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, _, _ = setup
    out = engine.open(
        [client_req("alice", rid="1" * 32, time=60), client_req("bob", rid="2" * 32, time=120)],
        NOW,
    )
    assert out["1" * 32].ok and out["2" * 32].ok
    assert [g.client for g in engine.store.read().all()] == ["bob"]


# -- network grants (a v2 client's open_prefix) ------------------------------------------

NET4 = GrantKey(ipaddress.ip_address("198.51.100.0"), "tcp", 22, 24)


def net_req(
    addr: str, prefixlen: int | None = 24, rid: str = "n" * 32, time: int = 60
) -> GrantRequest:
    return GrantRequest(rid, ip(addr), (("tcp", 22),), time, "knock", "alice", prefixlen=prefixlen)


def test_a_network_grant_opens_the_network_and_says_who_knocked(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    out = engine.open([net_req("198.51.100.7")], NOW)
    assert out["n" * 32].ok and out["n" * 32].expires == int(NOW + 60)
    assert set(fw.held) == {NET4}
    ((grant),) = engine.store.read().live(NOW)
    assert grant.key == NET4 and grant.client == "alice"
    (event,) = events
    assert (event.kind, event.ip, event.extra) == (
        "open",
        "198.51.100.0/24",
        {"peer": "198.51.100.7"},
    )
    assert event.describe().startswith(
        "open 198.51.100.0/24 tcp/22 (client alice, from 198.51.100.7)"
    )


def test_another_address_of_the_network_renews_the_same_grant(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    engine.open([net_req("198.51.100.7")], NOW)
    out = engine.open([net_req("198.51.100.200", rid="m" * 32, time=600)], NOW + 5)
    assert out["m" * 32].expires == int(NOW + 605)
    assert fw.batches[-1][1] == [Entry(NET4, NOW + 605)] and set(fw.held) == {NET4}
    assert [(e.kind, e.extra.get("peer")) for e in events] == [
        ("open", "198.51.100.7"),
        ("renew", "198.51.100.200"),
    ]


def test_an_address_grant_and_a_network_grant_around_it_are_two_grants(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    engine.open([net_req("198.51.100.7"), net_req("198.51.100.7", None, rid="h" * 32)], NOW)
    assert set(fw.held) == {NET4, GrantKey(ip("198.51.100.7"), "tcp", 22)}
    assert sorted((e.ip, e.extra.get("peer")) for e in events) == [
        ("198.51.100.0/24", "198.51.100.7"),
        ("198.51.100.7", None),  # the address alone: who knocked is the address itself
    ]


def test_a_network_grant_counts_once_under_its_network(tmp_path: Path) -> None:
    engine, fw, _ = engine_with(tmp_path, Limits(total=100, per_prefix=1))
    out = engine.open([net_req("198.51.100.7"), net_req("198.51.100.8", rid="m" * 32)], NOW)
    assert out["n" * 32].ok and out["m" * 32].ok, "the same network grant: counted once"
    out = engine.open([net_req("198.51.100.7", None, rid="h" * 32)], NOW)
    assert out["h" * 32].ok, "the address alone is counted under 198.51.100.7/32"
    out = engine.open([net_req("198.51.100.9", 25, rid="w" * 32)], NOW)
    assert out["w" * 32].ok, "198.51.100.0/25 is a prefix of its own"
    v6 = [net_req(f"2001:db8::{i}", 64, rid=f"{i:032x}") for i in (1, 2)]
    v6.append(net_req("2001:db8::3", None, rid="3" * 32))  # counted under the same /64
    out = engine.open(v6, NOW)
    assert [out[r.id].ok for r in v6] == [True, True, False]
    assert out["3" * 32].error == "2001:db8::/64 holds its limit of 1 grants"
    assert len(fw.held) == 4


def test_revoke_an_address_closes_the_network_grants_containing_it(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    inner = GrantKey(ip("198.51.100.7"), "tcp", 22)
    other = GrantKey(ip("203.0.113.0"), "tcp", 22, 24)
    engine.open(
        [
            net_req("198.51.100.7"),
            net_req("198.51.100.7", None, rid="h" * 32),
            net_req("203.0.113.5", rid="o" * 32),
        ],
        NOW,
    )
    assert engine.revoke(ip("198.51.100.9"), "udp", None, NOW) == [], "another protocol"
    gone = engine.revoke(ip("198.51.100.9"), None, None, NOW)
    assert [g.key for g in gone] == [NET4], "the network contains it; the other address stays"
    assert set(fw.held) == {inner, other}
    assert (events[-1].kind, events[-1].ip) == ("revoke", "198.51.100.0/24")
    engine.open([net_req("198.51.100.7")], NOW)
    gone = engine.revoke(ip("198.51.100.7"), None, None, NOW)
    assert {g.key for g in gone} == {NET4, inner}
    assert set(fw.held) == {other}


def test_revoke_a_network_closes_every_grant_overlapping_it(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, _ = setup
    engine.open(
        [
            net_req("198.51.100.7"),
            net_req("198.51.100.7", None, rid="h" * 32),
            net_req("198.51.101.7", None, rid="x" * 32),
            net_req("2001:db8::7", 64, rid="6" * 32),
        ],
        NOW,
    )
    net = ipaddress.ip_network("198.51.100.0/24")
    gone = engine.revoke(net, None, None, NOW)
    assert sorted(g.key.ip_text for g in gone) == ["198.51.100.0/24", "198.51.100.7"]
    gone = engine.revoke(ipaddress.ip_network("198.51.101.0/28"), None, None, NOW)
    assert [g.key.ip_text for g in gone] == ["198.51.101.7"]
    gone = engine.revoke(ipaddress.ip_network("2001:db8::4/126"), None, None, NOW)
    assert [g.key.ip_text for g in gone] == ["2001:db8::/64"], "inside the network grant"
    assert fw.held == {}


def test_revoke_client_reap_reconcile_and_drift_handle_network_grants(
    setup: tuple[GrantEngine, MemoryFirewall, list[Event]],
) -> None:
    engine, fw, events = setup
    engine.open([net_req("198.51.100.7", time=10), net_req("2001:db8::7", 64, rid="6" * 32)], NOW)
    fw.held.clear()
    drift = engine.drift(NOW)
    assert [str(k) for k in drift.missing] == ["198.51.100.0/24:tcp/22", "[2001:db8::/64]:tcp/22"]
    assert engine.check(NOW) is not None
    assert engine.reconcile(NOW) == 2 and engine.drift(NOW).clean
    assert [g.key for g in engine.reap(NOW + 10)] == [NET4]
    assert [(e.kind, e.ip) for e in events[-1:]] == [("expire", "198.51.100.0/24")]
    assert [g.key.ip_text for g in engine.revoke_client("alice", NOW)] == ["2001:db8::/64"]
    assert fw.held == {} and engine.check(NOW) is None
