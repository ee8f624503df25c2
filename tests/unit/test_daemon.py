"""webknockd's drain: valid files become one batch, each CGI gets its answer through its
doorbell; bad files go aside."""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from tests.cgi_side import open_bell, submit
from tests.fakes import MemoryFirewall
from webknock.config import ServerConfig, load
from webknock.daemon import (
    PRUNE_EVERY,
    AlreadyRunning,
    Daemon,
    acquire_daemon_lock,
    daemon_running,
)
from webknock.engine import GrantEngine
from webknock.events import Event, EventBus
from webknock.spooldirs import WebIdentity, prepare_spool
from webknock.state import StateStore

WEB = pwd.getpwnam("www-data")


@pytest.fixture
def daemon(
    instance_config: Path,
) -> Iterator[tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]]]:
    cfg = load(instance_config)
    prepare_spool(cfg.spool, WEB.pw_gid)
    fw = MemoryFirewall()
    events: list[Event] = []
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), fw, EventBus(events.append))
    yield Daemon(cfg, engine, WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid)), cfg, fw, events


def test_spool_layout_modes(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    _, cfg, _, _ = daemon
    modes = {p.name: (p.stat().st_mode & 0o7777, p.stat().st_gid) for p in cfg.spool_dir.iterdir()}
    assert modes == {
        "requests": (0o1730, WEB.pw_gid),
        "claimed": (0o700, 0),
        "rejected": (0o700, 0),
        "seen": (0o1730, WEB.pw_gid),
        "waits": (0o1730, WEB.pw_gid),
    }


def test_drain_applies_one_batch_and_answers(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, events = daemon
    r1 = submit(cfg)
    r2 = submit(cfg, "2001:db8::10", [("tcp", 22), ("udp", 51820)])
    assert r1.result() is None, "no answer before the drain"
    assert d.drain() == 2
    assert len(fw.batches) == 1 and len(fw.batches[0][0]) == 3
    assert r1.result() == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}
    assert r2.result() == {
        "v": 1,
        "ok": True,
        "expires": ANY,
        "ports": [["tcp", 22], ["udp", 51820]],
    }
    assert os.listdir(cfg.spool.requests) == [] and os.listdir(cfg.spool.claimed) == []
    assert [e.kind for e in events] == ["open", "open", "open"]


def test_answers_are_written_before_events_are_delivered(
    instance_config: Path,
) -> None:
    """Log, audit and notification sinks run after the waiting CGIs have their results."""
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
    waiting = submit(cfg)
    assert d.drain() == 1
    assert answered == [True]
    assert waiting.result() == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}


def test_invalid_files_are_moved_aside_never_applied(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, events = daemon
    bad = submit(cfg, ports=[("tcp", 23)])  # not offered
    (cfg.spool.requests / "junk").write_text("x")
    linked = open_bell(cfg, "e" * 32)
    os.symlink("/etc/shadow", cfg.spool.requests / f"{'e' * 32}.req")
    os.mkfifo(cfg.spool.requests / f"{'f' * 32}.req")
    good = submit(cfg)
    d.drain()
    assert fw.held and len(fw.held) == 1
    refused = {
        "v": 1,
        "ok": False,
        "error": "request refused by the server",
        "errorcode": "INVALID",
    }
    assert bad.result() == refused
    assert linked.result() == refused
    assert good.result() == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}
    assert len(os.listdir(cfg.spool.rejected)) == 4
    assert os.listdir(cfg.spool.requests) == []
    assert sum(e.kind == "reject" for e in events) == 4


def test_stale_request_refused(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, _ = daemon
    waiting = submit(cfg, received=time.time() - 3600)
    d.drain()
    assert fw.held == {}
    assert waiting.result() == {
        "v": 1,
        "ok": False,
        "error": "request refused by the server",
        "errorcode": "INVALID",
    }


def test_firewall_failure_is_reported(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, _ = daemon
    fw.fail_apply = fw.fail_sync = True
    waiting = submit(cfg)
    d.drain()
    assert waiting.result() == {
        "v": 1,
        "ok": False,
        "error": "firewall failed to apply the rule",
        "errorcode": "FIREWALL",
    }
    assert d.engine.store.read().all() == []


def test_claimed_leftovers_processed_after_crash(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, _, _ = daemon
    waiting = submit(cfg)
    os.rename(cfg.spool.requests / f"{waiting.rid}.req", cfg.spool.claimed / f"{waiting.rid}.req")
    d.drain()
    assert waiting.result() == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}


def test_drain_claims_the_names_inotify_reported(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    """The names of the events are the batch; anything else waits for a listing (the
    tick's), and names that are gone (withdrawn) or not requests cost nothing."""
    d, cfg, fw, _ = daemon
    d.drain()  # the start-up look at claimed/
    named, unnamed = submit(cfg), submit(cfg, "192.0.2.11")
    assert d.drain([f"{named.rid}.req", f"{'a' * 32}.req", ".tmp", ""]) == 1
    assert named.result() is not None and unnamed.result() is None
    assert d.drain() == 1
    assert unnamed.result() is not None
    assert len(fw.held) == 2


def test_prune_removes_old_temp_files_and_marks(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, _, _ = daemon
    old = time.time() - 1000
    for path in (cfg.spool.requests / ".abc.tmp", cfg.spool.seen / "r-00"):
        path.write_text("")
        os.utime(path, (old, old))
    (cfg.spool.requests / ".fresh.tmp").write_text("")
    d.prune()
    assert os.listdir(cfg.spool.requests) == [".fresh.tmp"] and os.listdir(cfg.spool.seen) == []


def test_tick_prunes_the_spool_every_prune_every_seconds(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    """Pruning walks every replay mark: the tick does it every PRUNE_EVERY, not every second."""
    d, cfg, _, _ = daemon
    clock = [time.time()]
    d.clock = lambda: clock[0]

    def old_mark(name: str) -> None:
        path = cfg.spool.seen / name
        path.write_text("")
        os.utime(path, (clock[0] - 1000, clock[0] - 1000))

    old_mark("r-01")
    d.tick()
    assert os.listdir(cfg.spool.seen) == [], "the first tick prunes"
    old_mark("r-02")
    clock[0] += PRUNE_EVERY - 1
    d.tick()
    assert os.listdir(cfg.spool.seen) == ["r-02"], "not again within PRUNE_EVERY"
    clock[0] += 1
    d.tick()
    assert os.listdir(cfg.spool.seen) == []


def test_the_retired_results_directory_is_removed(instance_config: Path) -> None:
    """Earlier versions wrote results as files in results/; the spool no longer has it."""
    cfg = load(instance_config)
    old = cfg.spool_dir / "results"
    old.mkdir(parents=True)
    (old / f"{'b' * 32}.json").write_text("{}")
    prepare_spool(cfg.spool, WEB.pw_gid)
    assert not old.exists()
    assert sorted(os.listdir(cfg.spool_dir)) == [
        "claimed",
        "rejected",
        "requests",
        "seen",
        "waits",
    ]


def test_run_loop_answers_immediately(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
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
        waiting = submit(cfg)
        assert waiting.result(5) == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}
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
