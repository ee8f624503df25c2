"""[hooks]: an executable per event kind, run off the apply path with the event in its
environment and on stdin; slow hooks are killed and never delay an emit; unsafe paths are
refused by the config and by check-config."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import write_instance
from tests.fakes import MemoryFirewall
from webknock.config import ConfigError, ServerConfig, load
from webknock.protocol.v1 import Keys
from webknock.server.engine import GrantEngine, Limits
from webknock.server.events import Event, EventBus
from webknock.server.grants import GrantRequest
from webknock.server.hooks import HookRunner, hook_problems, hooks_sink, load_hooks
from webknock.server.state import StateStore


def script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    os.chmod(path, mode)
    return path


def with_hooks(base: Path, keys: Keys, **hooks: str | Path) -> ServerConfig:
    config = write_instance(base, keys)
    with config.open("a") as f:
        f.write("[hooks]\n" + "".join(f"{k} = {v}\n" for k, v in hooks.items()))
    return load(config)


@pytest.fixture
def runners() -> Iterator[list[HookRunner]]:
    """Runners a test made, closed after it (their workers and children gone)."""
    made: list[HookRunner] = []
    yield made
    for runner in made:
        runner.close(timeout=5)


def sink(cfg: ServerConfig, runners: list[HookRunner]) -> HookRunner:
    runner = hooks_sink(cfg)
    assert runner is not None
    runners.append(runner)
    return runner


def wait_for(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)
    assert condition(), "timed out"  # type: ignore[operator]


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` runs (zombies not counted)."""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_hook_sees_every_open_renew_and_close(
    tmp_path: Path, vector_keys: Keys, runners: list[HookRunner]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    hook = script(
        tmp_path / "hook",
        f'f={out}/$$; env > "$f.tmp"; echo "STDIN=$(cat)" >> "$f.tmp"; mv "$f.tmp" "$f"',
    )
    cfg = with_hooks(tmp_path, vector_keys, on_open=hook, on_renew=hook, on_close=hook)
    runner = sink(cfg, runners)
    engine = GrantEngine(
        cfg.instance, StateStore(cfg.state_file), MemoryFirewall(), EventBus(runner), Limits()
    )
    a, b = ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::10")
    now = time.time()
    engine.open([GrantRequest("r1", a, (("tcp", 22),), 60)], now)
    engine.open([GrantRequest("r2", a, (("tcp", 22),), 120)], now + 1)  # renew
    engine.open([GrantRequest("r3", b, (("udp", 51820),), 5, "knock", "laptop")], now + 1)
    engine.reap(now + 10)  # b expires
    engine.revoke(a, None, None, now + 11)
    wait_for(lambda: len(list(out.iterdir())) == 5 and runner.done == 5)
    assert runner.failed == runner.dropped == 0

    seen = []
    for f in out.iterdir():
        env = dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)
        record = json.loads(env.pop("STDIN"))
        assert env["PATH"].startswith("/usr/local/sbin:")
        assert not {k for k in env if k.startswith("WEBKNOCK_")} ^ {
            f"WEBKNOCK_{k}"
            for k in ("EVENT", "INSTANCE", "IP", "PROTO", "PORT", "CLIENT", "EXPIRES", "SOURCE")
        }
        assert "HOME" not in env and "PYTEST_CURRENT_TEST" not in env, "a minimal environment"
        assert record["event"] == env["WEBKNOCK_EVENT"] and record["ip"] == env["WEBKNOCK_IP"]
        assert env["WEBKNOCK_INSTANCE"] == cfg.instance
        seen.append(
            (
                env["WEBKNOCK_EVENT"],
                env["WEBKNOCK_IP"],
                env["WEBKNOCK_PROTO"],
                env["WEBKNOCK_PORT"],
                env["WEBKNOCK_CLIENT"],
                env["WEBKNOCK_SOURCE"],
                env["WEBKNOCK_EXPIRES"] != "",
            )
        )
    assert sorted(seen) == sorted(
        [
            ("open", "192.0.2.10", "tcp", "22", "", "knock", True),
            ("renew", "192.0.2.10", "tcp", "22", "", "knock", True),
            ("open", "2001:db8::10", "udp", "51820", "laptop", "knock", True),
            ("expire", "2001:db8::10", "udp", "51820", "laptop", "", True),
            ("revoke", "192.0.2.10", "tcp", "22", "", "", True),
        ]
    )


def test_only_configured_kinds_run(
    tmp_path: Path, vector_keys: Keys, runners: list[HookRunner]
) -> None:
    hook = script(tmp_path / "hook", f'echo "$WEBKNOCK_EVENT" >> {tmp_path}/ran')
    runner = sink(with_hooks(tmp_path, vector_keys, on_close=hook), runners)
    for kind in ("open", "renew", "reject", "expire"):
        runner(Event(kind, time.time(), "webknock", "192.0.2.10"))
    wait_for(lambda: runner.done == 1)
    runner.close()
    assert (tmp_path / "ran").read_text() == "expire\n"


def test_slow_hook_delays_no_emit_and_is_killed(
    tmp_path: Path, vector_keys: Keys, runners: list[HookRunner], caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp_path / "pids"
    hook = script(tmp_path / "hook", f"echo $$ >> {pids}; sleep 60")
    cfg = with_hooks(tmp_path, vector_keys, on_open=hook, timeout="1", max_running="2")
    runner = sink(cfg, runners)
    bus = EventBus(runner)
    started = time.monotonic()
    for n in range(4):
        t0 = time.monotonic()
        bus.emit(Event("open", time.time(), "webknock", f"192.0.2.{n + 1}", "tcp", 22))
        assert time.monotonic() - t0 < 0.05
    wait_for(lambda: runner.failed == 4, 15)
    took = time.monotonic() - started
    assert 1.9 < took < 8, "two at a time, each killed after 1 s"
    assert runner.done == 0
    shells = [int(p) for p in pids.read_text().split()]
    assert len(shells) == 4
    assert not [pid for pid in shells if group_alive(pid)], "sleep killed with its shell"
    assert "killed after 1 s" in caplog.text


def test_failing_hook_is_logged_and_full_queue_drops(
    tmp_path: Path, vector_keys: Keys, runners: list[HookRunner], caplog: pytest.LogCaptureFixture
) -> None:
    hook = script(tmp_path / "hook", "echo oops; exit 3")
    settings = load_hooks(with_hooks(tmp_path, vector_keys, on_open=hook))
    runner = HookRunner(settings)
    runners.append(runner)
    runner(Event("open", time.time(), "webknock", "192.0.2.10", "tcp", 22))
    wait_for(lambda: runner.failed == 1)
    assert "exit status 3: oops" in caplog.text
    full = HookRunner(settings, max_queue=1)
    full.queue.put_nowait(Event("open", 0, "webknock", "192.0.2.1"))
    full(Event("open", 0, "webknock", "192.0.2.2"))
    assert full.dropped == 1 and "queue full" in caplog.text


def test_no_hooks_no_sink(tmp_path: Path, vector_keys: Keys) -> None:
    assert hooks_sink(load(write_instance(tmp_path, vector_keys))) is None
    cfg = with_hooks(tmp_path, vector_keys, timeout="3")
    assert hooks_sink(cfg) is None and load_hooks(cfg).timeout == 3.0


def not_root(p: Path) -> str:
    os.chown(script(p / "h", "true"), 65534, 0)
    return str(p / "h")


def symlink(p: Path) -> str:
    os.symlink(script(p / "h", "true"), p / "link")
    return str(p / "link")


def writable_dir(p: Path) -> str:
    os.chmod(p, 0o777)
    return str(script(p / "h", "true"))


UNSAFE: dict[str, tuple[Callable[[Path], str], str]] = {
    "relative": (lambda p: "hook", "must be an absolute path"),
    "missing": (lambda p: str(p / "missing"), "does not exist"),
    "group-writable": (lambda p: str(script(p / "h", "true", 0o775)), "writable by others"),
    "world-writable": (lambda p: str(script(p / "h", "true", 0o757)), "writable by others"),
    "not-executable": (lambda p: str(script(p / "h", "true", 0o644)), "is not executable"),
    "not-root": (not_root, "owned by uid 65534"),
    "symlink": (symlink, "is a symlink"),
    "writable-dir": (writable_dir, "hook's directory"),
    "directory": (str, "not a regular file"),
}


@pytest.mark.parametrize("case", UNSAFE)
def test_unsafe_hook_is_refused(tmp_path: Path, vector_keys: Keys, case: str) -> None:
    setup, expect = UNSAFE[case]
    hooks_dir = tmp_path / "hooks"
    hooks_dir.mkdir(mode=0o755)
    value = setup(hooks_dir)
    cfg = with_hooks(tmp_path, vector_keys, on_renew=value)
    with pytest.raises(ConfigError) as info:
        load_hooks(cfg)
    assert f"{cfg.source}: [hooks] on_renew:" in str(info.value) and expect in str(info.value)
    problems = hook_problems(cfg)
    assert problems and all(level == "error" for level, _ in problems)
    assert any("[hooks] on_renew: " in msg and expect in msg for _, msg in problems)


def test_bad_settings_are_refused(tmp_path: Path, vector_keys: Keys) -> None:
    for key, value, expect in [
        ("timeout", "0", "above 0"),
        ("max_running", "0", "1-64"),
        ("on_opne", "/bin/true", "unknown setting"),
    ]:
        cfg = with_hooks(tmp_path, vector_keys, **{key: value})
        with pytest.raises(ConfigError, match=rf"\[hooks\] {key}: .*{expect}"):
            load_hooks(cfg)
        assert [lv for lv, msg in hook_problems(cfg) if f"[hooks] {key}:" in msg] == ["error"]


def test_check_config_reports_hooks(tmp_path: Path, vector_keys: Keys) -> None:
    from webknock.server.checks import check_installation

    cfg = with_hooks(tmp_path, vector_keys, on_open="/nonexistent/hook")
    messages = [msg for level, msg in check_installation(cfg) if level == "error"]
    assert any("[hooks] on_open: hook /nonexistent/hook does not exist" in m for m in messages)


def test_example_config_hooks_keys_are_known() -> None:
    from webknock.server.hooks import KNOWN

    example = (Path(__file__).parents[2] / "etc/webknock/webknock.ini.example").read_text()
    block = example.split("#[hooks]\n")[1].split("\n# Notifications:")[0]
    keys = {line[1:].split(" = ")[0] for line in block.splitlines() if " = " in line}
    assert keys == KNOWN
