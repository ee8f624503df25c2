"""Grant engine with an in-memory firewall: open, renew, reap, revoke, failure handling."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.fakes import MemoryFirewall
from webknock.engine import GrantEngine
from webknock.events import Event, EventBus
from webknock.grants import GrantKey
from webknock.spool_reader import GrantRequest
from webknock.state import StateStore

A = ipaddress.ip_address("192.0.2.10")
B = ipaddress.ip_address("2001:db8::10")
NOW = 1_800_000_000.0


def req(
    ip: object = A,
    ports: tuple[tuple[str, int], ...] = (("tcp", 22),),
    time: int = 60,
    rid: str = "a" * 32,
) -> GrantRequest:
    return GrantRequest(rid, ip, ports, time, NOW, "test-agent")  # type: ignore[arg-type]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GrantEngine, MemoryFirewall, list[Event]]:
    fw = MemoryFirewall()
    events: list[Event] = []
    engine = GrantEngine("webknock", StateStore(tmp_path / "s.db"), fw, EventBus(events.append))
    return engine, fw, events


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
