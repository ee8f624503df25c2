"""webknockd's drain: requests are verified and become one batch, each CGI gets its answer
(status, note, sealed reply) through its doorbell; malformed files go aside."""

from __future__ import annotations

import logging
import os
import pwd
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from unittest.mock import ANY

import pytest

from tests.cgi_side import (
    WEB,
    Waiting,
    frame,
    getinfo_packet,
    open_bell,
    openports_packet,
    reply,
    submit,
)
from tests.conftest import MemoryInstance, spool_as, write_instance
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.config import ServerConfig, load
from webknock.protocol.v1 import Keys
from webknock.server.daemon import AlreadyRunning, acquire_daemon_lock, daemon_running
from webknock.server.engine import GrantEngine
from webknock.server.events import Event, EventBus
from webknock.server.loop import PRUNE_EVERY, Daemon
from webknock.server.state import StateStore
from webknock.spool import request as spool
from webknock.spool.mount import WebIdentity, prepare_spool

Setup = tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]]
GRANTED = {"success": True, "expires": ANY}


@pytest.fixture
def daemon(memory_instance: MemoryInstance) -> Setup:
    m = memory_instance
    return m.daemon, m.cfg, m.fw, m.events


def test_spool_layout_modes(daemon: Setup) -> None:
    _, cfg, _, _ = daemon
    modes = {p.name: (p.stat().st_mode & 0o7777, p.stat().st_gid) for p in cfg.spool_dir.iterdir()}
    web_gid = pwd.getpwnam("www-data").pw_gid
    assert modes == {
        "requests": (0o1730, web_gid),
        "claimed": (0o700, 0),
        "rejected": (0o700, 0),
        "waits": (0o1730, web_gid),
    }


def test_drain_applies_one_batch_and_answers(daemon: Setup, vector_keys: Keys) -> None:
    d, cfg, fw, events = daemon
    r1 = submit(cfg, vector_keys)
    r2 = submit(cfg, vector_keys, "2001:db8::10", [("tcp", 22), ("udp", 51820)])
    assert r1.result() is None, "no answer before the drain"
    assert d.drain() == 2
    assert len(fw.batches) == 1 and len(fw.batches[0][0]) == 3
    assert reply(vector_keys, r1.result()) == GRANTED
    assert reply(vector_keys, r2.result()) == GRANTED
    assert os.listdir(cfg.spool.requests) == [] and os.listdir(cfg.spool.claimed) == []
    assert [e.kind for e in events] == ["open", "open", "open"]
    assert {(e.ip, e.source, e.user_agent) for e in events} == {
        ("192.0.2.10", "knock", "test-agent"),
        ("2001:db8::10", "knock", "test-agent"),
    }


def test_granted_expiry_is_the_rules_and_time_is_capped(daemon: Setup, vector_keys: Keys) -> None:
    d, cfg, fw, _ = daemon
    short = submit(cfg, vector_keys, "192.0.2.10", time_=30)
    long = submit(cfg, vector_keys, "192.0.2.11", time_=10**6)  # max_time is 3600
    now = time.time()
    d.drain()
    expires = {str(k.ip): e for k, e in fw.held.items()}
    assert reply(vector_keys, short.result())["expires"] == int(expires["192.0.2.10"])
    assert reply(vector_keys, long.result())["expires"] == int(expires["192.0.2.11"])
    assert now + 3590 < expires["192.0.2.11"] <= now + 3605


def test_getinfo_is_answered_without_a_grant(daemon: Setup, vector_keys: Keys) -> None:
    d, cfg, fw, events = daemon
    waiting = submit(cfg, payload=frame(getinfo_packet(vector_keys), "2001:db8::5"))
    d.drain()
    assert reply(vector_keys, waiting.result()) == {
        "success": True,
        "tcp": [22, 2222],
        "udp": [51820],
        "maxtime": 3600,
        "ip": "2001:db8::5",
    }
    assert fw.held == {} and events == []


def test_answers_are_written_before_events_are_delivered(
    instance_config: Path, vector_keys: Keys
) -> None:
    """Log, audit and notification sinks run after the waiting CGIs have their answers."""
    cfg = load(instance_config)
    prepare_spool(cfg.spool, WEB.pw_gid)
    answered: list[bool] = []
    engine = GrantEngine(
        cfg.instance,
        StateStore(cfg.state_file),
        MemoryFirewall(),
        EventBus(lambda _event: answered.append(waiting.result() is not None)),
    )
    d = Daemon(cfg, engine, WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid))
    waiting = submit(cfg, vector_keys)
    assert d.drain() == 1
    assert answered == [True]
    assert reply(vector_keys, waiting.result()) == GRANTED


def test_refused_and_malformed_requests_are_never_applied(
    daemon: Setup, vector_keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A port not offered is a sealed NOPORTS; files that are no request (link, FIFO, not a
    frame) get 400 and go aside, one log line for all of them at the next housekeeping;
    a name that is no request is not even claimed (it is the housekeeping's)."""
    d, cfg, fw, events = daemon
    noports = submit(cfg, vector_keys, ports=[("tcp", 23)])
    (cfg.spool.requests / "junk").write_text("x")
    linked = open_bell(cfg, "e" * 32)
    os.symlink("/etc/shadow", cfg.spool.requests / f"{'e' * 32}.req")
    fifo = open_bell(cfg, "f" * 32)
    os.mkfifo(cfg.spool.requests / f"{'f' * 32}.req")
    garbage = submit(cfg, payload=b"not a frame at all")
    good = submit(cfg, vector_keys)
    with caplog.at_level(logging.DEBUG, logger="webknockd"):
        d.drain()
    assert list(fw.held) and len(fw.held) == 1
    assert reply(vector_keys, noports.result()) == {
        "success": False,
        "error": "none of the requested ports is offered",
        "errorcode": "NOPORTS",
    }
    for waiting in (linked, fifo, garbage):
        assert waiting.result() == (400, "", b"")
    assert reply(vector_keys, good.result()) == GRANTED
    assert os.listdir(cfg.spool.requests) == ["junk"]
    assert os.listdir(cfg.spool.claimed) == []
    kept = os.listdir(cfg.spool.rejected)
    assert len(kept) == 1 and kept[0].startswith(garbage.rid), "only a small file is kept"
    assert [e.kind for e in events] == ["open"], "no event per refused file"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="webknockd"):
        d.housekeeping()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "refused 3 malformed spool file(s)" in warnings
    assert "removed 1 unexpected spool entry" in warnings
    assert os.listdir(cfg.spool.requests) == []


def test_a_packet_outside_the_time_window_is_refused(daemon: Setup, vector_keys: Keys) -> None:
    """The packet's own timestamp (sealed) says how old it is: a clock-skew note for the
    client, nothing applied, and not counted as a bad packet (it verified)."""
    d, cfg, fw, _ = daemon
    for skew in (-3600, 3600):
        packet = openports_packet(vector_keys, ts=time.time() + skew)
        waiting = submit(cfg, payload=frame(packet))
        d.drain()
        status, note, body = waiting.result() or (0, "", b"")
        assert (status, body) == (403, b"") and note.startswith("clock skew: request time is")
    assert fw.held == {}
    assert d.guard.counts == {}


def test_a_request_older_than_any_waiting_cgi_is_dropped(daemon: Setup, vector_keys: Keys) -> None:
    """A request that waited in the spool longer than its CGI waits (twice result_timeout)
    is never applied: its client was told 504. Nobody waits for an answer."""
    d, cfg, fw, _ = daemon
    waiting = submit(cfg, vector_keys)
    d.clock = lambda: time.time() + d.max_wait + 1
    assert d.drain() == 1
    assert waiting.result() is None and fw.held == {}
    assert os.listdir(cfg.spool.claimed) == [] and os.listdir(cfg.spool.rejected) == []


def test_firewall_failure_is_reported(daemon: Setup, vector_keys: Keys) -> None:
    d, cfg, fw, _ = daemon
    fw.fail_apply = fw.fail_sync = True
    waiting = submit(cfg, vector_keys)
    d.drain()
    assert reply(vector_keys, waiting.result()) == {
        "success": False,
        "error": "firewall failed to apply the rule",
        "errorcode": "FIREWALL",
    }
    assert d.engine.store.read().all() == []


def test_claimed_leftovers_processed_after_crash(daemon: Setup, vector_keys: Keys) -> None:
    d, cfg, _, _ = daemon
    waiting = submit(cfg, vector_keys)
    os.rename(cfg.spool.requests / f"{waiting.rid}.req", cfg.spool.claimed / f"{waiting.rid}.req")
    d.drain()
    assert reply(vector_keys, waiting.result()) == GRANTED


def test_drain_claims_the_names_inotify_reported(daemon: Setup, vector_keys: Keys) -> None:
    """The names of the events are the batch; anything else waits for a listing (the
    tick's), and names that are gone (withdrawn) or not requests cost nothing."""
    d, cfg, fw, _ = daemon
    d.drain()  # the start-up look at claimed/
    named, unnamed = submit(cfg, vector_keys), submit(cfg, vector_keys, "192.0.2.11")
    names = [f"{named.rid}.req", f"{'a' * 32}.req", f".{unnamed.rid}.tmp", "", "junk"]
    assert d.drain(names) == 1
    assert named.result() is not None and unnamed.result() is None
    assert d.drain() == 1
    assert unnamed.result() is not None
    assert len(fw.held) == 2


def test_limits_refuse_only_the_request_beyond_them(tmp_path: Path, vector_keys: Keys) -> None:
    """max_grants_per_prefix (an IPv6 /64 here) and max_grants: the request that would go
    past a limit gets a sealed LIMIT reply, the rest of the batch is granted; a renewal is
    never refused."""
    cfg = load(write_instance(tmp_path, vector_keys, max_grants="4", max_grants_per_prefix="2"))
    d, fw = memory_daemon(cfg)

    def knock(rid: str, ip: str) -> Waiting:
        return spool_as(cfg, rid * 32, frame(openports_packet(vector_keys, ip), ip))

    batch = {
        "1": knock("1", "2001:db8::1"),
        "2": knock("2", "2001:db8::2"),
        "3": knock("3", "2001:db8::3"),  # a third grant in 2001:db8::/64
        "4": knock("4", "2001:db8:0:1::1"),  # another /64
        "5": knock("5", "192.0.2.10"),
    }
    d.drain()
    answers = {k: reply(vector_keys, w.result()) for k, w in batch.items()}
    assert answers["3"] == {
        "success": False,
        "error": "2001:db8::/64 holds its limit of 2 grants",
        "errorcode": "LIMIT",
    }
    assert all(answers[k] == GRANTED for k in "1245")
    assert sorted(str(k.ip) for k in fw.held) == [
        "192.0.2.10",
        "2001:db8:0:1::1",
        "2001:db8::1",
        "2001:db8::2",
    ]
    later = {
        "a": knock("a", "2001:db8::2"),  # renewal: at both limits, still granted
        "b": knock("b", "198.51.100.1"),  # a fifth grant on the instance
    }
    d.drain()
    assert reply(vector_keys, later["a"].result()) == GRANTED
    assert reply(vector_keys, later["b"].result()) == {
        "success": False,
        "error": "this server holds its limit of 4 grants",
        "errorcode": "LIMIT",
    }
    assert len(fw.held) == 4


def test_housekeeping_prunes_the_spool(daemon: Setup) -> None:
    d, cfg, _, _ = daemon
    old = time.time() - 1000
    stale, fresh = (cfg.spool.requests / f".{spool.new_request_id()}.tmp" for _ in range(2))
    for path in (stale, fresh, cfg.spool.requests / ".abc.tmp"):
        path.write_text("")
    os.utime(stale, (old, old))
    d.housekeeping()
    assert os.listdir(cfg.spool.requests) == [fresh.name], "not a temp name: goes at once"


def test_tick_does_the_housekeeping_every_prune_every_seconds(daemon: Setup) -> None:
    """The housekeeping lists the spool and cleans the state file: the tick does it every
    PRUNE_EVERY, not every second."""
    d, cfg, _, _ = daemon
    clock = [time.time()]
    d.clock = lambda: clock[0]

    def old_temp_file() -> str:
        name = f".{spool.new_request_id()}.tmp"
        path = cfg.spool.requests / name
        path.write_text("")
        os.utime(path, (clock[0] - 1000, clock[0] - 1000))
        return name

    old_temp_file()
    d.tick()
    assert os.listdir(cfg.spool.requests) == [], "the first tick prunes"
    name = old_temp_file()
    clock[0] += PRUNE_EVERY - 1
    d.tick()
    assert os.listdir(cfg.spool.requests) == [name], "not again within PRUNE_EVERY"
    clock[0] += 1
    d.tick()
    assert os.listdir(cfg.spool.requests) == []


def test_the_retired_spool_directories_are_removed(instance_config: Path) -> None:
    """Earlier versions wrote results as files in results/ and replay marks and counters in
    seen/ (where the web user could delete and date them); the spool has neither now."""
    cfg = load(instance_config)
    for name, planted in (("results", f"{'b' * 32}.json"), ("seen", "r-0123")):
        old = cfg.spool_dir / name
        old.mkdir(parents=True)
        (old / planted).write_text("{}")
    prepare_spool(cfg.spool, WEB.pw_gid)
    assert sorted(os.listdir(cfg.spool_dir)) == ["claimed", "rejected", "requests", "waits"]


def test_run_loop_answers_immediately(daemon: Setup, vector_keys: Keys) -> None:
    """The request's own inotify event wakes the loop and names the request to claim."""
    d, cfg, _, _ = daemon
    drains: list[list[str] | None] = []
    drain = d.drain

    def spy(names: Iterable[str] | None = None) -> int:
        drains.append(None if names is None else list(names))
        return drain(names)

    d.drain = spy  # type: ignore[method-assign]
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        wait_until = time.monotonic() + 5
        while not drains and time.monotonic() < wait_until:  # the first tick's drain
            time.sleep(0.01)
        waiting = submit(cfg, vector_keys)
        assert reply(vector_keys, waiting.result(5)) == GRANTED
    finally:
        d.stopping = True
        thread.join(5)
    assert not thread.is_alive()
    assert [f"{waiting.rid}.req"] in drains, drains


def test_one_daemon_per_instance(instance_config: Path) -> None:
    cfg = load(instance_config)
    assert daemon_running(cfg) is None
    fd = acquire_daemon_lock(cfg)
    try:
        assert daemon_running(cfg) == os.getpid()
        with pytest.raises(AlreadyRunning):
            acquire_daemon_lock(cfg)
    finally:
        os.close(fd)
    assert daemon_running(cfg) is None
