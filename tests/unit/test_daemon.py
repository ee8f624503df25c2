"""webknockd's drain: valid files become one batch with results; bad files go aside."""

from __future__ import annotations

import json
import os
import pwd
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import MemoryFirewall
from webknock.config import ServerConfig, load
from webknock.daemon import AlreadyRunning, Daemon, acquire_daemon_lock, daemon_running
from webknock.engine import GrantEngine
from webknock.events import Event, EventBus
from webknock.fsutil import write_atomic
from webknock.grants import parse_address
from webknock.spool import REQUEST_SUFFIX, encode_request, new_request_id
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


def spool_request(
    cfg: ServerConfig,
    ip: str = "192.0.2.10",
    ports: list[tuple[str, int]] | None = None,
    time_: int = 60,
    received: float | None = None,
) -> str:
    rid = new_request_id()
    data = encode_request(parse_address(ip), ports or [("tcp", 22)], time_, received or time.time())
    # owned by the web user before it appears: a running daemon may claim it at once
    path = cfg.spool.requests / f"{rid}{REQUEST_SUFFIX}"
    write_atomic(path, data, 0o640, uid=WEB.pw_uid, gid=WEB.pw_gid, fsync=False)
    return rid


def result(cfg: ServerConfig, rid: str) -> dict[str, object]:
    path = cfg.spool.results / f"{rid}.json"
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, WEB.pw_gid, 0o640)
    obj: dict[str, object] = json.loads(path.read_bytes())
    return obj


def test_spool_layout_modes(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    _, cfg, _, _ = daemon
    modes = {p.name: (p.stat().st_mode & 0o7777, p.stat().st_gid) for p in cfg.spool_dir.iterdir()}
    assert modes == {
        "requests": (0o1730, WEB.pw_gid),
        "results": (0o750, WEB.pw_gid),
        "claimed": (0o700, 0),
        "rejected": (0o700, 0),
        "seen": (0o1730, WEB.pw_gid),
        "waits": (0o1730, WEB.pw_gid),
    }


def test_drain_applies_one_batch_and_answers(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, events = daemon
    r1 = spool_request(cfg)
    r2 = spool_request(cfg, "2001:db8::10", [("tcp", 22), ("udp", 51820)])
    assert d.drain() == 2
    assert len(fw.batches) == 1 and len(fw.batches[0][0]) == 3
    assert result(cfg, r1)["ok"] is True and result(cfg, r2)["ok"] is True
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
        EventBus(lambda _event: answered.append(bool(os.listdir(cfg.spool.results)))),
    )
    d = Daemon(cfg, engine, WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid))
    rid = spool_request(cfg)
    assert d.drain() == 1
    assert result(cfg, rid)["ok"] is True
    assert answered == [True]


def test_invalid_files_are_moved_aside_never_applied(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, events = daemon
    bad = spool_request(cfg, ports=[("tcp", 23)])  # not offered
    (cfg.spool.requests / "junk").write_text("x")
    os.symlink("/etc/shadow", cfg.spool.requests / f"{'e' * 32}.req")
    os.mkfifo(cfg.spool.requests / f"{'f' * 32}.req")
    good = spool_request(cfg)
    d.drain()
    assert fw.held and len(fw.held) == 1
    assert result(cfg, bad)["errorcode"] == "INVALID"
    assert result(cfg, "e" * 32)["ok"] is False
    assert result(cfg, good)["ok"] is True
    assert len(os.listdir(cfg.spool.rejected)) == 4
    assert os.listdir(cfg.spool.requests) == []
    assert sum(e.kind == "reject" for e in events) == 4


def test_stale_request_refused(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, _ = daemon
    rid = spool_request(cfg, received=time.time() - 3600)
    d.drain()
    assert fw.held == {} and result(cfg, rid)["ok"] is False


def test_firewall_failure_is_reported(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, fw, _ = daemon
    fw.fail_apply = fw.fail_sync = True
    rid = spool_request(cfg)
    d.drain()
    assert result(cfg, rid) == {
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
    rid = spool_request(cfg)
    os.rename(cfg.spool.requests / f"{rid}.req", cfg.spool.claimed / f"{rid}.req")
    d.drain()
    assert result(cfg, rid)["ok"] is True


def test_prune_removes_old_results_and_temp_files(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, _, _ = daemon
    old = time.time() - 1000
    for path in (
        cfg.spool.results / "x.json",
        cfg.spool.requests / ".abc.tmp",
        cfg.spool.seen / "r-00",
    ):
        path.write_text("")
        os.utime(path, (old, old))
    fresh = cfg.spool.results / "fresh.json"
    fresh.write_text("")
    d.prune()
    assert os.listdir(cfg.spool.results) == ["fresh.json"]
    assert os.listdir(cfg.spool.requests) == [] and os.listdir(cfg.spool.seen) == []


def test_run_loop_answers_immediately(
    daemon: tuple[Daemon, ServerConfig, MemoryFirewall, list[Event]],
) -> None:
    d, cfg, _, _ = daemon
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        time.sleep(0.2)
        rid = spool_request(cfg)
        deadline = time.monotonic() + 5
        while not (cfg.spool.results / f"{rid}.json").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert result(cfg, rid)["ok"] is True
    finally:
        d.stopping = True
        thread.join(5)
    assert not thread.is_alive()


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
