"""Replay marks and the bad-packet throttle (webknock.server.guard), root's alone in the state file:
a packet applies once, a copy relayed from elsewhere first spoils nothing, junk from one
address prefix is throttled without locking out a valid client, and all of it survives a
restart of webknockd."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from tests.cgi_side import (
    Waiting,
    frame,
    getinfo_packet,
    openports_packet,
    reply,
    submit,
)
from tests.conftest import MemoryInstance, spool_as
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.addresses import parse_address
from webknock.config import ServerConfig
from webknock.protocol import messages, v1
from webknock.protocol.v1 import Keys
from webknock.server import guard as guard_mod
from webknock.server.engine import Outcome
from webknock.server.events import Event
from webknock.server.grants import GrantRequest
from webknock.server.guard import Guard
from webknock.server.loop import Daemon
from webknock.server.state import StateStore

GRANTED = {"success": True, "expires": ANY}
REPLAYED = (403, "", b"")
BAD = (403, "", b"")
THROTTLED = (429, "", b"")
NOW = 1_800_000_000.0


class Clock:
    """The daemon's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cfg(instance_cfg: ServerConfig) -> ServerConfig:
    return instance_cfg


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def daemon_clock(clock: Clock) -> Clock:
    """memory_instance's webknockd runs on the test's clock."""
    return clock


@pytest.fixture
def daemon(memory_instance: MemoryInstance) -> Iterator[tuple[Daemon, MemoryFirewall, list[Event]]]:
    m = memory_instance
    yield m.daemon, m.fw, m.events
    m.daemon.engine.store.close()


def restarted(cfg: ServerConfig, clock: Clock) -> Daemon:
    """A new webknockd on the same state file, as main() starts it."""
    d, _ = memory_daemon(cfg, clock=clock)
    d.guard.load(clock())
    return d


def forged(ip: str = "192.0.2.10") -> bytes:
    """A frame from `ip` whose packet is not sealed with the instance's keys."""
    data = messages.openports_request(ip, [("tcp", 22)], 60, int(time.time()))
    return frame(v1.encode(Keys.generate(), data), ip)


def answers(waitings: list[Waiting]) -> list[tuple[int, str, bytes]]:
    """Every answer (each must have come), in order of status."""
    got = [w.result() for w in waitings]
    assert None not in got, "every request is answered"
    return sorted(a for a in got if a is not None)


# -- replay ------------------------------------------------------------------------------


def test_the_same_packet_twice_applies_once(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    d, fw, events = daemon
    copy = frame(openports_packet(vector_keys))
    first = submit(cfg, payload=copy)
    d.drain()
    second = submit(cfg, payload=copy)
    d.drain()
    assert reply(vector_keys, first.result()) == GRANTED
    assert second.result() == REPLAYED, "v1: a bare 403, nothing the sender can read"
    assert len(fw.batches) == 1 and [e.kind for e in events] == ["open"], "no renewal either"


def test_two_copies_in_one_batch_apply_once(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    d, _, events = daemon
    copy = frame(openports_packet(vector_keys))
    both = [submit(cfg, payload=copy), submit(cfg, payload=copy)]
    d.drain()
    got = answers(both)
    assert got[1] == REPLAYED and reply(vector_keys, got[0]) == GRANTED
    assert [e.kind for e in events] == ["open"]


def test_a_resealed_copy_is_a_replay(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    """The mark is the authenticated content, not the bytes on the wire: the same request
    sealed again (other random padding) is the same request."""
    d, fw, _ = daemon
    data = messages.openports_request("192.0.2.10", [("tcp", 22)], 60, int(time.time()))
    first = submit(cfg, payload=frame(v1.encode(vector_keys, data)))
    d.drain()
    second = submit(cfg, payload=frame(v1.encode(vector_keys, data)))
    d.drain()
    assert reply(vector_keys, first.result()) == GRANTED and second.result() == REPLAYED
    assert len(fw.batches) == 1


def test_a_copy_relayed_first_from_elsewhere_does_not_burn_the_mark(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    """Whoever sees the packet on its way (a proxy, the web user) and sends it first from
    another address gets an address mismatch, and the client's own delivery still works."""
    d, fw, _ = daemon
    packet = openports_packet(vector_keys, "192.0.2.10")
    thief = submit(cfg, payload=frame(packet, "198.51.100.66"))
    d.drain()
    own = submit(cfg, payload=frame(packet, "192.0.2.10"))
    d.drain()
    assert thief.result() == (403, "address mismatch: the server sees another address", b"")
    assert reply(vector_keys, own.result()) == GRANTED
    assert [str(k.ip) for k in fw.held] == ["192.0.2.10"]


def test_marks_survive_a_restart_within_the_window(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]],
    cfg: ServerConfig,
    clock: Clock,
    vector_keys: Keys,
) -> None:
    d, _, _ = daemon
    copy = frame(openports_packet(vector_keys))
    first = submit(cfg, payload=copy)
    d.drain()
    d.engine.store.close()
    assert reply(vector_keys, first.result()) == GRANTED
    clock.now += 10  # the packet's timestamp still passes (ts_window 15)
    d2 = restarted(cfg, clock)
    d2.housekeeping()  # forgets only what expired
    again = submit(cfg, payload=copy)
    d2.drain()
    assert again.result() == REPLAYED
    assert len(d2.engine.firewall.listed()) == 0, "the new daemon applied nothing"


def test_a_replay_under_the_original_request_id_is_refused_after_a_tick(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    """The web user names the request files: a copy under the name of the request that
    burnt the mark, claimed by the drain after a tick (which looks through claimed/ for
    leftovers), is still a replay."""
    d, fw, _ = daemon
    copy = frame(openports_packet(vector_keys))
    rid = "c" * 32
    first = spool_as(cfg, rid, copy)
    d.drain()
    first.close()
    d.tick()
    second = spool_as(cfg, rid, copy)
    d.drain()
    assert second.result() == REPLAYED
    assert len(fw.batches) == 1


def test_a_leftover_of_a_failed_batch_is_no_replay_of_itself(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    """The batch burnt the marks, then failed: its requests stay in claimed/ (root's), and
    the next look there applies them, once."""
    d, fw, _ = daemon
    waiting = submit(cfg, vector_keys)
    real_open = d.engine.open

    def failing(requests: list[GrantRequest], now: float) -> dict[str, Outcome]:
        raise OSError(5, "Input/output error")

    d.engine.open = failing  # type: ignore[method-assign,assignment]
    with pytest.raises(OSError):
        d.drain()
    assert os.listdir(cfg.spool.claimed) == [f"{waiting.rid}.req"]
    d.engine.open = real_open  # type: ignore[method-assign]
    d.tick()
    d.drain()
    assert reply(vector_keys, waiting.result()) == GRANTED
    assert len(fw.batches) == 1


def test_guard_commit_burns_each_mark_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    g = Guard(store, ts_window=15, limit=20, window=60)
    a, b = (b"v1:" + bytes([n]) * 20 for n in (1, 2))
    assert g.commit([(a, "1" * 32), (b, "2" * 32), (a, "3" * 32)], NOW) == [True, True, False]
    assert g.commit([(a, "4" * 32)], NOW) == [False]
    assert g.commit([(a, "1" * 32)], NOW) == [False], "the same id is no retry by itself"
    assert g.commit([(a, "1" * 32)], NOW, frozenset({"1" * 32})) == [True], "a leftover"
    assert g.commit([(a, "4" * 32)], NOW, frozenset({"4" * 32})) == [False], "not its mark"
    assert g.commit([], NOW) == []
    again = Guard(StateStore(tmp_path / "s.db"), ts_window=15, limit=20, window=60)
    assert again.commit([(b, "5" * 32)], NOW) == [False], "in the file, not in memory"


def test_marks_live_as_long_as_a_copy_could_pass_the_time_check(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    g = Guard(store, ts_window=15, limit=20, window=60)
    assert g.mark_ttl == 2 * 15 + 5
    mark = b"v1:" + b"\1" * 20
    g.commit([(mark, "1" * 32)], NOW)
    g.forget(NOW + g.mark_ttl - 1)
    assert g.commit([(mark, "2" * 32)], NOW + g.mark_ttl - 1) == [False]
    g.forget(NOW + g.mark_ttl)
    assert g.commit([(mark, "2" * 32)], NOW + g.mark_ttl) == [True], "forgotten when due"


# -- throttle ----------------------------------------------------------------------------


def test_bad_packets_are_throttled_and_a_valid_one_still_succeeds(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]],
    cfg: ServerConfig,
    vector_keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d, fw, _ = daemon
    assert cfg.throttle_failures == 20
    with caplog.at_level(logging.INFO):
        bad = [submit(cfg, payload=forged()) for _ in range(25)]
        d.drain()
        assert answers(bad) == [BAD] * 20 + [THROTTLED] * 5
        refused = [r for r in caplog.records if r.getMessage().startswith("refused ")]
        assert len(refused) == 20, "no log line per throttled packet"
        valid = submit(cfg, vector_keys)
        info = submit(cfg, payload=frame(getinfo_packet(vector_keys)))
        d.drain()
        assert reply(vector_keys, valid.result()) == GRANTED, "a valid packet is never throttled"
        assert reply(vector_keys, info.result())["ip"] == "192.0.2.10"
        more = submit(cfg, payload=forged())
        d.drain()
        assert more.result() == THROTTLED, "the valid one did not reset the count"
        caplog.clear()
        d.housekeeping()
        d.housekeeping()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "throttled 192.0.2.10/32: 6 more bad packet(s) refused with 429"
    ]
    assert [str(k.ip) for k in fw.held] == ["192.0.2.10"]


def test_an_ipv6_64_is_counted_together(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig
) -> None:
    d, _, _ = daemon
    for i in range(20):
        submit(cfg, payload=forged(f"2001:db8::{i + 1:x}"))  # privacy addresses, one /64
    d.drain()
    neighbour = submit(cfg, payload=forged("2001:db8::ffff:1"))
    other = submit(cfg, payload=forged("2001:db8:0:1::1"))
    v4 = submit(cfg, payload=forged("192.0.2.10"))
    d.drain()
    assert neighbour.result() == THROTTLED
    assert other.result() == BAD and v4.result() == BAD


def test_an_ipv4_address_is_counted_alone(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig
) -> None:
    d, _, _ = daemon
    for _ in range(20):
        submit(cfg, payload=forged("192.0.2.10"))
    d.drain()
    same, next_door = (
        submit(cfg, payload=forged("192.0.2.10")),
        submit(cfg, payload=forged("192.0.2.11")),
    )
    d.drain()
    assert same.result() == THROTTLED and next_door.result() == BAD


def test_a_packet_that_verifies_but_is_refused_is_not_counted(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    """Clock skew, an address mismatch, a port not offered: the client holds the keys; it
    is told why, every time."""
    d, _, _ = daemon
    waitings = [
        submit(cfg, payload=frame(openports_packet(vector_keys, ts=time.time() - 600)))
        for _ in range(15)
    ]
    waitings += [submit(cfg, vector_keys, "192.0.2.10", remote="192.0.2.99") for _ in range(5)]
    waitings += [submit(cfg, vector_keys, ports=[("tcp", 23)]) for _ in range(5)]
    d.drain()
    assert THROTTLED not in answers(waitings)
    assert d.guard.counts == {}


def test_replays_count_as_bad_packets(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, vector_keys: Keys
) -> None:
    d, _, _ = daemon
    copy = frame(openports_packet(vector_keys))
    submit(cfg, payload=copy)
    d.drain()
    replays = [submit(cfg, payload=copy) for _ in range(21)]
    d.drain()
    assert answers(replays) == [REPLAYED] * 20 + [THROTTLED]


def test_counts_survive_a_restart_and_end_with_their_window(
    daemon: tuple[Daemon, MemoryFirewall, list[Event]], cfg: ServerConfig, clock: Clock
) -> None:
    d, _, _ = daemon
    clock.now -= cfg.throttle_window + 1  # (a request may not look older than its CGI waits)
    for _ in range(20):
        submit(cfg, payload=forged())
    d.drain()
    d.engine.store.close()
    d2 = restarted(cfg, clock)
    first = submit(cfg, payload=forged())
    d2.drain()
    assert first.result() == THROTTLED, "read back at start"
    clock.now += cfg.throttle_window + 1
    d2.housekeeping()
    d3 = restarted(cfg, clock)
    later = submit(cfg, payload=forged())
    d3.drain()
    assert later.result() == BAD, "the window has passed"


def test_guard_counts_per_prefix_within_the_window(tmp_path: Path) -> None:
    g = Guard(StateStore(tmp_path / "s.db"), ts_window=15, limit=3, window=60)
    a, a2, b = (parse_address(t) for t in ("2001:db8::1", "2001:db8::2", "2001:db8:1::1"))
    for i in range(10):
        g.failed(a if i % 2 else a2, NOW)
    assert g.counts == {"2001:db8::/64": (4, NOW)}, "capped at the limit + 1"
    assert g.throttled(a, NOW + 59) and not g.throttled(b, NOW)
    assert not g.throttled(a, NOW + 60), "the window has passed"
    g.failed(a, NOW + 60)
    assert g.counts["2001:db8::/64"] == (1, NOW + 60), "a new window starts from one"


def test_guard_saves_counts_with_the_next_commit_and_loads_them(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    g = Guard(StateStore(path), ts_window=15, limit=3, window=60)
    g.failed(parse_address("192.0.2.1"), NOW)
    g.failed(parse_address("192.0.2.2"), NOW - 59)
    fresh = Guard(StateStore(path), ts_window=15, limit=3, window=60)
    fresh.load(NOW)
    assert fresh.counts == {}, "not saved before a commit"
    assert g.commit([], NOW) == []
    fresh.load(NOW + 1)
    assert fresh.counts == {"192.0.2.1/32": (1, NOW)}, "192.0.2.2's window has passed"


def test_a_failed_commit_keeps_the_counts_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    store = StateStore(path)
    g = Guard(store, ts_window=15, limit=3, window=60)
    g.failed(parse_address("192.0.2.1"), NOW)
    from webknock.server.state import StateError, StateTx

    def refuse(self: StateTx, counts: object) -> None:
        raise StateError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(StateTx, "save_failures", refuse)
        with pytest.raises(StateError):
            g.commit([(b"v1:x", "1" * 32)], NOW)
    assert g.commit([(b"v1:x", "1" * 32)], NOW) == [True], "the mark was not recorded"
    fresh = Guard(StateStore(path), ts_window=15, limit=3, window=60)
    fresh.load(NOW)
    assert fresh.counts == {"192.0.2.1/32": (1, NOW)}


def test_forget_bounds_the_counts_keeping_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_mod, "MAX_COUNTED", 5)
    path = tmp_path / "s.db"
    g = Guard(StateStore(path), ts_window=15, limit=3, window=60)
    for i in range(12):
        g.failed(parse_address(f"198.18.0.{i}"), NOW - 30 + i)
    g.failed(parse_address("198.18.1.1"), NOW - 61)
    g.commit([], NOW)
    g.forget(NOW)
    newest = [f"198.18.0.{i}/32" for i in range(7, 12)]
    assert sorted(g.counts) == sorted(newest)
    fresh = Guard(StateStore(path), ts_window=15, limit=3, window=60)
    fresh.load(NOW)
    assert sorted(fresh.counts) == sorted(newest), "the file is bounded too"
