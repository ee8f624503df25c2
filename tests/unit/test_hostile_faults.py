"""Faults: a state file that refuses writes (full disk, read-only), a firewall changed behind
the daemon's back, a daemon step that fails. Nothing is reported as success that is not in
the firewall, nothing is corrupted, and the daemon keeps running.

The disk faults are real: a tiny tmpfs or a read-only bind mount, made inside a private
mount namespace (``unshare -m``) of a child process, so the host never sees them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.cgi_side import reply, submit
from tests.conftest import run_in_mount_namespace, write_instance
from tests.fakes import SETTINGS, MemoryFirewall, RecordingRunner, memory_daemon
from webknock.addresses import Address, parse_address
from webknock.config import ServerConfig, load
from webknock.protocol import messages, transport, v1
from webknock.server import loop as daemon_loop
from webknock.server.engine import GrantEngine, Outcome, census
from webknock.server.events import EventBus
from webknock.server.firewall.iptables import IptablesFirewall
from webknock.server.grants import GrantKey, GrantRequest
from webknock.server.loop import Daemon
from webknock.server.state import StateError, StateStore
from webknock.spool.request import new_request_id

A = parse_address("192.0.2.10")
B = parse_address("2001:db8::10")


def request(ip: Address = A, seconds: int = 600, port: int = 22) -> GrantRequest:
    return GrantRequest(new_request_id(), ip, (("tcp", port),), seconds, user_agent="t")


# -- state commit refused after the kernel batch went in ---------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> GrantEngine:
    return GrantEngine("webknock", StateStore(tmp_path / "s.db"), MemoryFirewall(), EventBus())


@contextmanager
def commit_refused(engine: GrantEngine, *, grants_only: bool = False) -> Iterator[None]:
    """Every COMMIT fails as SQLite fails it on a full disk; `grants_only`: only that of a
    transaction that wrote grants (replay marks and bad-packet counts are recorded)."""
    real = engine.store._connect
    wrote_grants = [False]

    class Db:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("BEGIN"):
                wrote_grants[0] = False
            if sql.startswith("INSERT INTO grants"):
                wrote_grants[0] = True
            if sql == "COMMIT" and (wrote_grants[0] or not grants_only):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *args)

        def executemany(self, sql: str, *args: Any) -> Any:
            if sql.startswith("INSERT INTO grants"):
                wrote_grants[0] = True
            return self.db.executemany(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

    engine.store._connect = lambda: Db(real())  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        engine.store._connect = real  # type: ignore[method-assign]


def test_refused_commit_takes_new_rules_back_out(engine: GrantEngine) -> None:
    fw = engine.firewall
    assert isinstance(fw, MemoryFirewall)
    first = request()
    assert engine.open([first], time.time())[first.id].ok
    with commit_refused(engine), pytest.raises(StateError, match="disk is full"):
        engine.open([request(B), request(A)], time.time())
    assert sorted(map(str, fw.held)) == ["192.0.2.10:tcp/22"], "new grant undone, old kept"
    assert [str(g.key) for g in engine.store.read().all()] == ["192.0.2.10:tcp/22"]
    assert engine.check(time.time(), full=True) is None


def test_refused_commit_of_a_revoke_puts_live_rules_back(engine: GrantEngine) -> None:
    now = time.time()
    engine.open([request(A, 600), request(B, 1)], now)
    with commit_refused(engine), pytest.raises(StateError):
        engine.revoke(A, None, None, now)
    with commit_refused(engine), pytest.raises(StateError):
        engine.reap(now + 5)  # B expired: it stays out of the kernel, row kept for later
    assert sorted(map(str, engine.firewall.listed())) == ["192.0.2.10:tcp/22"]
    assert len(engine.store.read().all()) == 2
    assert engine.check(now + 5) is None, "an expired row the kernel dropped is no drift"
    assert [str(g.key) for g in engine.reap(now + 5)] == ["[2001:db8::10]:tcp/22"]


def test_replay_marks_not_recorded_accept_nothing(tmp_path: Path, vector_keys: v1.Keys) -> None:
    """A mark the state file did not take would let the packet be replayed: every verified
    request of the batch gets 503, nothing is applied; the next batch works again."""
    cfg = load(write_instance(tmp_path, vector_keys))
    d, fw = memory_daemon(cfg)
    first = [submit(cfg, vector_keys, str(A)), submit(cfg, vector_keys, str(B))]
    with commit_refused(d.engine):
        d.drain()
    assert [w.result() for w in first] == [(503, "", b"")] * 2
    assert fw.listed() == [] and d.engine.store.read().all() == []
    again = submit(cfg, vector_keys, str(A))
    d.drain()
    assert reply(vector_keys, again.result())["success"] is True


def test_daemon_answers_state_failure_and_keeps_going(tmp_path: Path, vector_keys: v1.Keys) -> None:
    """The marks are recorded, the grants are not: a sealed STATE reply, nothing applied."""
    cfg = load(write_instance(tmp_path, vector_keys))
    d, fw = memory_daemon(cfg)
    waiting = submit(cfg, vector_keys, str(A))
    with commit_refused(d.engine, grants_only=True):
        d.drain()
    assert reply(vector_keys, waiting.result()) == {
        "success": False,
        "error": "server state unavailable",
        "errorcode": "STATE",
    }
    assert fw.listed() == [] and d.engine.store.read().all() == []
    assert d.guard.commit([(b"v1:other", "0" * 32)], time.time()) == [True], "it works again"


# -- the firewall changed behind the daemon's back ---------------------------------------


def running_daemon(tmp_path: Path, keys: v1.Keys) -> tuple[Daemon, ServerConfig, MemoryFirewall]:
    cfg = load(write_instance(tmp_path, keys))
    d, fw = memory_daemon(cfg)
    return d, cfg, fw


def test_flushed_firewall_is_restored_within_two_seconds(
    tmp_path: Path, vector_keys: v1.Keys, caplog: pytest.LogCaptureFixture
) -> None:
    d, _, fw = running_daemon(tmp_path, vector_keys)
    d.engine.open([request(A), request(B, port=2222)], time.time())
    d.engine.store.close()  # the daemon thread opens its own connection
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        time.sleep(0.3)
        for damage in (fw.held.clear, lambda: fw.held.pop(next(iter(fw.held)))):
            damage()
            t0 = time.monotonic()
            while len(fw.held) != 2 and time.monotonic() - t0 < 3:
                time.sleep(0.02)
            assert len(fw.held) == 2 and time.monotonic() - t0 < 2
        fw.held[GrantKey(parse_address("198.51.100.1"), "tcp", 22)] = time.time() + 60
        t0 = time.monotonic()
        while len(fw.held) != 2 and time.monotonic() - t0 < 3:
            time.sleep(0.02)
        assert len(fw.held) == 2, "an extra grant somebody added is removed"
    finally:
        d.stopping = True
        thread.join(5)
    assert "firewall differs from the state file" in caplog.text
    assert "firewall restored: 2 live grant(s)" in caplog.text


def test_full_check_catches_same_count_other_keys(tmp_path: Path, vector_keys: v1.Keys) -> None:
    d, _, fw = running_daemon(tmp_path, vector_keys)
    d.engine.open([request(A)], time.time())
    fw.held = {GrantKey(parse_address("198.51.100.1"), "tcp", 22): time.time() + 60}
    assert d.engine.check(time.time()) is None, "counts agree"
    assert "1 missing, 1 extra" in (d.engine.check(time.time(), full=True) or "")
    d.next_full_check = 0
    d.check_firewall(time.time())
    assert [str(k) for k in fw.held] == ["192.0.2.10:tcp/22"]


def test_failing_check_backs_off(tmp_path: Path, vector_keys: v1.Keys) -> None:
    d, _, fw = running_daemon(tmp_path, vector_keys)
    d.engine.open([request(A)], time.time())
    fw.held.clear()
    fw.fail_sync = True
    now = time.time()
    d.check_firewall(now)
    assert d.next_check == now + daemon_loop.CHECK_BACKOFF


def test_a_slow_repair_does_not_delay_the_next_check(
    tmp_path: Path, vector_keys: v1.Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check's own cost sets its cadence; a repair that took long (a big sync on a busy
    host) must not make the daemon look less often for the next damage."""
    d, _, fw = running_daemon(tmp_path, vector_keys)
    d.engine.open([request(A)], time.time())
    fw.held.clear()
    reconcile = d.engine.reconcile

    def slow_reconcile(now: float) -> int:
        time.sleep(0.3)  # x CHECK_SHARE: many seconds without a look
        return reconcile(now)

    monkeypatch.setattr(d.engine, "reconcile", slow_reconcile)
    now = time.time()
    d.check_firewall(now)
    assert fw.held, "repaired"
    assert d.next_check <= now + daemon_loop.TICK


def save(lines: list[str]) -> str:
    return "\n".join(["*filter", ":INPUT DROP [0:0]", *lines, "COMMIT"]) + "\n"


INTACT = [
    ":WEBKNOCK - [0:0]",
    ":WEBKNOCK-GRANTS - [0:0]",
    "-A INPUT -j WEBKNOCK",
    "-A WEBKNOCK -j WEBKNOCK-GRANTS",
]
GRANT4 = "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT"


@pytest.mark.parametrize(
    ("v4", "problem"),
    [
        ([*INTACT, GRANT4], None),
        ([*INTACT[1:], GRANT4], "chain WEBKNOCK missing"),
        ([x for x in INTACT if "INPUT" not in x] + [GRANT4], "INPUT jumps to WEBKNOCK 0 times"),
        ([*INTACT, "-A INPUT -j WEBKNOCK", GRANT4], "INPUT jumps to WEBKNOCK 2 times"),
        ([x for x in INTACT if "-A WEBKNOCK " not in x] + [GRANT4], "chain WEBKNOCK does not"),
        (["-A INPUT -p tcp --dport 80 -j ACCEPT"], "chain WEBKNOCK, WEBKNOCK-GRANTS missing"),
    ],
)
def test_iptables_census_sees_hook_chains_and_counts(v4: list[str], problem: str | None) -> None:
    runner = RecordingRunner({"iptables-save": save(v4), "ip6tables-save": save(INTACT)})
    held, problems = census(IptablesFirewall(SETTINGS, runner))
    assert held == {4: sum(x.startswith("-A WEBKNOCK-GRANTS") for x in v4), 6: 0}
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_iptables_census_with_protect_counts_main_rules() -> None:
    settings = dataclasses.replace(SETTINGS, protect=True)
    fw = IptablesFirewall(settings, RecordingRunner())
    body = [f"-A WEBKNOCK {' '.join(r)}" for r in fw.main_rules()]
    lines = [*INTACT[:3], *body]
    fw.run = RecordingRunner({"iptables-save": save(lines), "ip6tables-save": save(lines)})
    assert census(fw) == ({4: 0, 6: 0}, [])
    fw.run = RecordingRunner({"iptables-save": save(lines[:-1]), "ip6tables-save": save(lines)})
    assert census(fw)[1] == ["IPv4: chain WEBKNOCK does not hold its 5 rule(s)"]


def test_daemon_loop_survives_failing_steps(
    tmp_path: Path, vector_keys: v1.Keys, caplog: pytest.LogCaptureFixture
) -> None:
    d, cfg, _ = running_daemon(tmp_path, vector_keys)
    calls = {"n": 0}
    real_open = d.engine.open

    def flaky(requests: Sequence[GrantRequest], now: float) -> dict[str, Outcome]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error")
        return real_open(requests, now)

    d.engine.open = flaky  # type: ignore[method-assign]
    shutil.rmtree(cfg.spool.rejected)  # the housekeeping fails every time
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        time.sleep(0.2)
        first = submit(cfg, vector_keys, str(A))
        time.sleep(0.5)
        second = submit(cfg, vector_keys, str(B))
        answer = second.result(5)
        time.sleep(1.2)
        assert thread.is_alive()
        retried = first.result(5)
    finally:
        d.stopping = True
        thread.join(5)
    assert reply(vector_keys, answer)["success"] is True
    # left in claimed/ with its mark burnt: taken up again by root, not a replay
    assert reply(vector_keys, retried)["success"] is True, "granted after all"
    assert sorted(str(k.ip) for k in d.engine.firewall.listed()) == [str(A), str(B)]
    assert "drain failed: [Errno 5] Input/output error" in caplog.text
    assert "spool housekeeping failed" in caplog.text


# -- real disk faults, in a private mount namespace --------------------------------------


def in_mount_namespace(scenario: str, base: Path, keys: v1.Keys) -> dict[str, Any]:
    """Run `scenario` of this module in a child with its own mount namespace."""
    code = (
        "import json, sys\n"
        "from tests.unit import test_hostile_faults as t\n"
        "from webknock.protocol.v1 import Keys\n"
        f"out = t.{scenario}(t.Path({str(base)!r}), Keys.from_hex({keys.to_hex()!r}))\n"
        "print(json.dumps(out))\n"
    )
    stdout = run_in_mount_namespace(code)
    result: dict[str, Any] = json.loads(stdout.splitlines()[-1])
    return result


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True)


def _fill(directory: Path, *, inodes: bool = True) -> None:
    """Fill the file system of `directory` to the last byte (and inode)."""
    with open(directory / ".filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    for i in range(100000 if inodes else 0):
        try:
            (directory / f"inode{i}").touch()
        except OSError:
            break


def _cgi(cfg_path: Path, keys: v1.Keys, obj: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
    """The CGI relays one knock (in this process); its status and the reply it opened."""
    from webknock.cgi import relay as cgi

    obj = {"nonce": os.urandom(8).hex(), **obj}
    body = b"data=" + transport.encode_field(v1.encode(keys, messages.dumps(obj))).encode()
    env = {
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": obj.get("ip", "192.0.2.10"),
        "WEBKNOCK_CONFIG": str(cfg_path),
    }
    stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(body))
    try:
        status, _, packet = cgi.handle(env)
    except cgi.Reply as refused:
        return refused.status, None
    finally:
        sys.stdin = stdin
    if status != 200:
        return status, None
    reply_obj: dict[str, Any] = json.loads(v1.decode(keys, packet))
    return 200, reply_obj


def _knock(ip: str) -> dict[str, Any]:
    return {
        "api": "openports",
        "ip": ip,
        "ports": [{"proto": "TCP", "num": 22}],
        "time": 600,
        "ver": 1,
        "ts": int(time.time()),
    }


def _integrity(state: Path) -> tuple[str, list[str]]:
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = [r[0] for r in db.execute("SELECT ip FROM grants ORDER BY ip")]
    finally:
        db.close()
    return check, rows


def _running_daemon(
    cfg: ServerConfig,
) -> tuple[Daemon, GrantEngine, MemoryFirewall, threading.Thread]:
    """webknockd's loop for `cfg` in a thread, on an in-memory firewall, settled in."""
    d, fw = memory_daemon(cfg)
    thread = threading.Thread(target=d.run)
    thread.start()
    time.sleep(0.2)
    return d, d.engine, fw, thread


def scenario_full_disk(base: Path, keys: v1.Keys) -> dict[str, Any]:
    """State dir and spool on tiny tmpfs file systems, filled up, with a daemon running."""
    cfg_path = write_instance(base, keys, result_timeout="2")
    cfg = load(cfg_path)
    cfg.state_file.parent.mkdir(mode=0o700)
    _mount(
        "-t", "tmpfs", "-o", "size=256k,nr_inodes=64,mode=0700", "tmpfs", str(cfg.state_file.parent)
    )
    cfg.spool_dir.mkdir()
    _mount("-t", "tmpfs", "-o", "size=128k", "tmpfs", str(cfg.spool_dir))
    d, _, fw, thread = _running_daemon(cfg)
    out: dict[str, Any] = {}
    try:
        out["before"] = _cgi(cfg_path, keys, _knock("192.0.2.10"))
        _fill(cfg.state_file.parent)
        out["state_full"] = _cgi(cfg_path, keys, _knock("192.0.2.11"))
        ctl = GrantEngine(cfg.instance, StateStore(cfg.state_file), fw, EventBus())  # webknockctl
        out["revoke_full"] = repr(_try(lambda: ctl.revoke(A, None, None, time.time())))
        out["held_state_full"] = sorted(map(str, fw.held))
        # now the spool fills up as well
        _fill(cfg.spool.requests, inodes=False)  # the CGI can create its file, not fill it
        out["spool_full"] = _cgi(cfg_path, keys, _knock("192.0.2.12"))
        out["spool_left"] = sorted(os.listdir(cfg.spool.requests))
        (cfg.spool.requests / ".filler").unlink()
        for f in os.listdir(cfg.state_file.parent):
            if f == ".filler" or f.startswith("inode"):
                os.unlink(cfg.state_file.parent / f)
        out["after"] = _cgi(cfg_path, keys, _knock("192.0.2.13"))
        out["alive"] = thread.is_alive()
    finally:
        d.stopping = True
        thread.join(5)
    out["held"] = sorted(map(str, fw.held))
    out["integrity"] = _integrity(cfg.state_file)
    return out


def _try(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_full_disk_answers_errors_and_corrupts_nothing(
    tmp_path: Path, vector_keys: v1.Keys
) -> None:
    out = in_mount_namespace("scenario_full_disk", tmp_path, vector_keys)
    assert out["before"][0] == 200 and out["before"][1]["success"] is True
    assert out["state_full"] == [503, None], "no replay mark recorded: nothing accepted"
    assert "StateError" in out["revoke_full"] and "full" in out["revoke_full"]
    assert out["held_state_full"] == ["192.0.2.10:tcp/22"], "revoke refused: rule stays"
    assert out["spool_full"] == [503, None]
    assert out["spool_left"] == [".filler"], "no half-written request left behind"
    assert out["after"][0] == 200 and out["after"][1]["success"] is True
    assert out["alive"] is True
    assert out["held"] == ["192.0.2.10:tcp/22", "192.0.2.13:tcp/22"]
    assert out["integrity"] == ["ok", ["192.0.2.10", "192.0.2.13"]]


def _immutable(directory: Path, on: bool) -> None:
    """chattr +i / -i on `directory` and everything in it: no write succeeds, not even
    through a descriptor opened before (what a file system turned read-only does). Not on
    SQLite's -shm, which it writes through a mapping (that would be SIGBUS, not an error)."""
    flag = "+i" if on else "-i"
    paths = [str(directory), *(str(p) for p in directory.iterdir() if p.name[-4:] != "-shm")]
    subprocess.run(["chattr", flag, *paths], check=True, capture_output=True)


def scenario_read_only_state(base: Path, keys: v1.Keys) -> dict[str, Any]:
    """The state files turn unwritable under a running daemon, then writable again."""
    daemon_loop.CHECK_BACKOFF = 1.0  # this child only: no need to wait the full 5 s
    cfg_path = write_instance(base, keys, result_timeout="2")
    cfg = load(cfg_path)
    state_dir = cfg.state_file.parent
    state_dir.mkdir(mode=0o700)
    d, _, fw, thread = _running_daemon(cfg)
    out: dict[str, Any] = {}
    try:
        out["before"] = _cgi(cfg_path, keys, _knock("192.0.2.10"))
        _immutable(state_dir, True)
        out["ro"] = _cgi(cfg_path, keys, _knock("2001:db8::10"))
        out["renew_ro"] = _cgi(cfg_path, keys, _knock("192.0.2.10"))
        out["held_ro"] = sorted(map(str, fw.held))
        fw.held.clear()  # and the firewall is flushed meanwhile
        deadline = time.monotonic() + daemon_loop.CHECK_BACKOFF + 2
        while not fw.held and time.monotonic() < deadline:
            time.sleep(0.05)
        out["held_restored_ro"] = sorted(map(str, fw.held))
        _immutable(state_dir, False)
        out["after"] = _cgi(cfg_path, keys, _knock("2001:db8::10"))
        out["alive"] = thread.is_alive()
    finally:
        d.stopping = True
        thread.join(5)
        _immutable(state_dir, False)
    out["held"] = sorted(map(str, fw.held))
    out["integrity"] = _integrity(cfg.state_file)
    return out


def test_read_only_state_answers_errors_and_corrupts_nothing(
    tmp_path: Path, vector_keys: v1.Keys
) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], check=False, capture_output=True).returncode:
        pytest.skip(f"{tmp_path}: no immutable flag on this file system (chattr +i)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    out = in_mount_namespace("scenario_read_only_state", tmp_path, vector_keys)
    assert out["before"][1]["success"] is True
    assert out["ro"] == out["renew_ro"] == [503, None], "no replay mark recorded: no grant"
    assert out["held_ro"] == ["192.0.2.10:tcp/22"], "nothing applied, nothing taken out"
    assert out["held_restored_ro"] == ["192.0.2.10:tcp/22"], "repair only reads the state"
    assert out["after"][1]["success"] is True and out["alive"] is True
    assert out["held"] == ["192.0.2.10:tcp/22", "[2001:db8::10]:tcp/22"]
    assert out["integrity"] == ["ok", ["192.0.2.10", "2001:db8::10"]]


def test_census_counts_the_lines_listed_parses() -> None:
    """Guard: a grant line the census counts is exactly one `listed()` parses."""
    fw = IptablesFirewall(SETTINGS, RecordingRunner())
    line = "-A WEBKNOCK-GRANTS " + " ".join(fw.grant_rule(GrantKey(A, "tcp", 22)))
    assert line == GRANT4
    assert fw._parse_grant(line) == GrantKey(A, "tcp", 22)
