"""The privilege boundary: the web user can only drop requests into the spool, and webknockd
trusts nothing it finds there (links, FIFOs, directories, huge files, other owners, odd names,
races between check and use). Also: the daemon's housekeeping of seen/ and rejected/.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.cgi_side import Waiting, open_bell
from tests.conftest import write_instance
from tests.fakes import MemoryFirewall
from webknock import daemon as daemon_mod
from webknock.addresses import parse_address
from webknock.config import ServerConfig, load
from webknock.daemon import Daemon
from webknock.engine import GrantEngine, Outcome
from webknock.events import Event, EventBus
from webknock.protocol.v1 import Keys
from webknock.spool import MAX_REQUEST_BYTES, encode_request, new_request_id, write_request
from webknock.spool_reader import GrantRequest
from webknock.spooldirs import WebIdentity, prepare_spool
from webknock.state import StateStore

WEB = pwd.getpwnam("www-data")


@pytest.fixture
def setup(vector_keys: Keys) -> Iterator[tuple[Daemon, ServerConfig]]:
    base = Path(tempfile.mkdtemp(prefix="webknock-hostile-"))
    os.chmod(base, 0o755)  # the web user must reach the spool, as in a real installation
    cfg = load(write_instance(base, vector_keys, throttle_window="60", ts_window="15"))
    prepare_spool(cfg.spool, WEB.pw_gid)
    engine = GrantEngine(
        cfg.instance, StateStore(cfg.state_file), MemoryFirewall(), EventBus(lambda e: None)
    )
    yield Daemon(cfg, engine, WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid)), cfg
    shutil.rmtree(base)


def request_bytes(ip: str = "192.0.2.10") -> bytes:
    return encode_request(parse_address(ip), [("tcp", 22)], 60, time.time())


def result(waiting: Waiting) -> dict[str, Any]:
    """The daemon's answer to a request whose bell was open before the drain."""
    answer = waiting.result()
    assert answer is not None, f"no answer for {waiting.rid}"
    return answer


TRY_EACH = """
out = {}
for name, fn in tries.items():
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.__class__.__name__
print(json.dumps(out))
"""


def attempts(tries: str, user: str = "www-data", group: str = "www-data") -> dict[str, str]:
    """Run `tries` as `user` (code that defines `tries`, a dict of name -> callable; `os` is
    imported), call each; return what each did ("ok" or the error's class)."""
    code = f"import json, os\n{tries.strip()}\n{TRY_EACH}"
    proc = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", sys.executable],
        input=code,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out: dict[str, str] = json.loads(proc.stdout)
    return out


def test_web_user_can_only_drop_requests(setup: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = setup
    d.engine.store.read().all()  # creates the state file
    tries = f"""
sp = {str(cfg.spool_dir)!r}
tries = {{
    "spool request": lambda: open(sp + "/requests/{"a" * 32}.req", "x").close(),
    "read requests": lambda: os.listdir(sp + "/requests"),
    "write claimed": lambda: open(sp + "/claimed/x", "x").close(),
    "list claimed": lambda: os.listdir(sp + "/claimed"),
    "list rejected": lambda: os.listdir(sp + "/rejected"),
    "list bells": lambda: os.listdir(sp + "/waits"),
    "rename requests": lambda: os.rename(sp + "/requests", sp + "/r2"),
    "state": lambda: open({str(cfg.state_file)!r}, "a").close(),
}}
"""
    assert attempts(tries) == {
        "spool request": "ok",
        "read requests": "PermissionError",  # 1730: drop only, no peeking at others' requests
        "write claimed": "PermissionError",
        "list claimed": "PermissionError",
        "list rejected": "PermissionError",
        "list bells": "PermissionError",  # nor at the ids of the CGIs that wait
        "rename requests": "PermissionError",
        "state": "PermissionError",
    }


def test_nobody_else_reaches_a_bell(setup: tuple[Daemon, ServerConfig]) -> None:
    """A bell is writable for "others" (root without CAP_DAC_OVERRIDE must answer into it),
    so the spool's own modes must keep every other user out of it."""
    _, cfg = setup
    waiting = open_bell(cfg)
    tries = f"""
tries = {{
    "answer": lambda: os.close(os.open({waiting.bell!r}, os.O_WRONLY | os.O_NONBLOCK)),
    "spool": lambda: open({str(cfg.spool.requests / "x")!r}, "x").close(),
    "list": lambda: os.listdir({str(cfg.spool_dir)!r}),
}}
"""
    assert attempts(tries, "nobody", "nogroup") == {
        "answer": "PermissionError",
        "spool": "PermissionError",
        "list": "PermissionError",
    }
    assert waiting.result() is None, "not a byte written"


def test_planted_objects_are_refused_and_the_daemon_survives(
    setup: tuple[Daemon, ServerConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, cfg = setup
    req = cfg.spool.requests
    secret = tmp_path / "secret"
    secret.write_bytes(request_bytes())
    secret_bytes = secret.read_bytes()
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    names = {kind: new_request_id() for kind in ("dir", "huge", "link", "hard", "fifo", "sock")}
    (req / f"{names['dir']}.req").mkdir()
    (req / f"{names['dir']}.req" / "inside").write_bytes(b"x" * 1000)
    os.symlink(canary, req / f"{names['dir']}.req" / "escape")
    with open(req / f"{names['huge']}.req", "wb") as fh:
        fh.truncate(50 * 1024 * 1024)  # sparse: costs no disk in the test
    os.symlink(secret, req / f"{names['link']}.req")
    os.link(secret, req / f"{names['hard']}.req")
    os.mkfifo(req / f"{names['fifo']}.req")
    with socket.socket(socket.AF_UNIX) as s:
        short = tmp_path / "s"  # AF_UNIX paths are short; a rename moves the socket file
        s.bind(str(short))
        os.rename(short, req / f"{names['sock']}.req")
    odd = ["x\nFAKE LOG LINE", "\udcff\udcfe.req", "A" * 250, ".hidden", "-rf"]
    for name in odd:
        (req / name).write_bytes(b"{}")
    deep = new_request_id()
    (req / f"{deep}.req").write_bytes(b"[" * 8000)
    other = new_request_id()
    (req / f"{other}.req").write_bytes(request_bytes())
    os.chown(req / f"{other}.req", 65534, 65534)
    good = new_request_id()
    write_request(req, good, request_bytes("192.0.2.77"))
    bells = {rid: open_bell(cfg, rid) for rid in [*names.values(), deep, other, good]}

    with caplog.at_level(logging.WARNING, logger="webknockd"):
        d.drain()
    held = d.engine.firewall.listed()
    assert [str(k) for k in held] == ["192.0.2.77:tcp/22"]
    assert result(bells[good])["ok"] is True
    for rid in [*names.values(), deep, other]:
        assert result(bells[rid])["errorcode"] == "INVALID", rid
    assert os.listdir(req) == [".hidden"]  # dot files are temp files of the CGI
    assert os.listdir(cfg.spool.claimed) == []
    kept = os.listdir(cfg.spool.rejected)
    assert not any(n.startswith((names["dir"], names["huge"])) for n in kept), "not kept"
    assert secret.read_bytes() == secret_bytes
    assert (canary / "keep").read_text() == "keep", "rmtree never followed the planted link"
    assert not [r for r in caplog.records if "\n" in r.getMessage()], "no forged log lines"


def test_claim_collision_with_a_planted_directory(setup: tuple[Daemon, ServerConfig]) -> None:
    """A name still in claimed/ (could not be removed) planted again as a directory."""
    d, cfg = setup
    rid = new_request_id()
    (cfg.spool.claimed / f"{rid}.req").mkdir()
    (cfg.spool.claimed / f"{rid}.req" / "x").write_text("x")
    (cfg.spool.requests / f"{rid}.req").write_bytes(request_bytes())
    d.drain()
    d.drain()
    assert os.listdir(cfg.spool.requests) == []
    assert d.engine.firewall.listed() == []


def test_request_rewritten_after_claim_is_bounded(setup: tuple[Daemon, ServerConfig]) -> None:
    """The web user keeps its fd after the claim: whatever it writes, root reads at most
    MAX_REQUEST_BYTES + 1 and validates exactly what it read."""
    d, cfg = setup
    waiting = open_bell(cfg)
    path = write_request(cfg.spool.requests, waiting.rid, request_bytes())
    fd = os.open(path, os.O_WRONLY)
    try:
        real_read = os.read

        def racing_read(f: int, n: int) -> bytes:
            os.pwrite(fd, b" " * (2 * MAX_REQUEST_BYTES), 0)  # grows between fstat and read
            assert n == MAX_REQUEST_BYTES + 1
            return real_read(f, n)

        os.read = racing_read
        try:
            d.drain()
        finally:
            os.read = real_read
    finally:
        os.close(fd)
    assert result(waiting)["errorcode"] == "INVALID"
    assert d.engine.firewall.listed() == []


def test_flood_of_requests_is_drained_in_bounded_batches(
    setup: tuple[Daemon, ServerConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, cfg = setup
    monkeypatch.setattr(daemon_mod, "MAX_BATCH", 50)
    rids = [
        write_request(
            cfg.spool.requests, new_request_id(), request_bytes(f"198.18.0.{i % 250 + 1}")
        )
        for i in range(180)
    ]
    batches: list[int] = []
    real_open = d.engine.open

    def counting(requests: Sequence[GrantRequest], now: float) -> dict[str, Outcome]:
        batches.append(len(requests))
        return real_open(requests, now)

    d.engine.open = counting  # type: ignore[method-assign]
    assert d.drain() == 180
    assert max(batches) <= 50 and len(rids) == 180
    assert len(d.engine.firewall.listed()) == 180


def test_prune_keeps_throttle_counters_for_their_window(
    setup: tuple[Daemon, ServerConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, cfg = setup
    seen = cfg.spool.seen
    now = time.time()

    def plant(name: str, age: float, size: int = 0) -> None:
        path = seen / name
        with open(path, "wb") as fh:
            fh.truncate(size)
        os.utime(path, (now - age, now - age))

    plant("r-old", 36)  # replay mark: 2 x 15 + 5 = 35 s
    plant("r-young", 30)
    plant("f-192.0.2.1", 40, 20)  # throttle counter: window 60 + 5 s
    plant("f-192.0.2.2", 70, 20)
    plant("junk", 70)
    (seen / "r-dir").mkdir()  # the web user can plant a directory: removed, never a crash
    (seen / "r-dir" / "inside").write_text("x")
    os.utime(seen / "r-dir", (now - 100, now - 100))
    d.prune()
    assert sorted(os.listdir(seen)) == ["f-192.0.2.1", "r-young"]
    assert os.listdir(cfg.spool.rejected) == [], "a directory is not kept for the admin"

    monkeypatch.setattr(daemon_mod, "MAX_THROTTLE_MARKS", 5)
    for i in range(12):
        plant(f"f-198.18.0.{i}", 30 - i, 1)
    d.prune()
    counters = sorted(n for n in os.listdir(seen) if n.startswith("f-"))
    assert counters == [f"f-198.18.0.{i}" for i in (10, 11, 7, 8, 9)], "the 5 newest stay"


def test_rejected_keeps_at_most_the_newest(
    setup: tuple[Daemon, ServerConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, cfg = setup
    monkeypatch.setattr(daemon_mod, "KEEP_REJECTED", 3)
    for i in range(6):
        path = cfg.spool.rejected / f"r{i}"
        path.write_text("x")
        os.utime(path, (1000 + i, 1000 + i))
    (cfg.spool.rejected / "zdir").mkdir()
    os.utime(cfg.spool.rejected / "zdir", (1, 1))
    d.prune()  # the directory cannot be unlinked: logged, no crash
    assert sorted(os.listdir(cfg.spool.rejected)) == ["r3", "r4", "r5", "zdir"]


def test_out_of_range_received_time_is_stale(setup: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = setup
    for received in (time.time() + 3600, time.time() - 3600):
        waiting = open_bell(cfg)
        data = encode_request(parse_address("192.0.2.10"), [("tcp", 22)], 60, received)
        write_request(cfg.spool.requests, waiting.rid, data)
        d.drain()
        assert result(waiting)["ok"] is False
    for raw in (b"NaN", b"Infinity", b"1e999"):
        waiting = open_bell(cfg)
        data = request_bytes().replace(b'"received":', b'"received":' + raw + b',"x":')
        obj = data.decode()
        obj = obj[: obj.index(',"x":')] + obj[obj.index(',"ua"') :]
        write_request(cfg.spool.requests, waiting.rid, obj.encode())
        d.drain()
        assert result(waiting)["errorcode"] == "INVALID", raw
    assert d.engine.firewall.listed() == []


def test_events_name_rejected_files_safely(setup: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = setup
    events: list[Event] = []
    d.engine.events.add(events.append)
    (cfg.spool.requests / "evil\nname").write_text("x")
    d.drain()
    (ev,) = [e for e in events if e.kind == "reject"]
    assert "\n" not in ev.reason and "evil\\nname" in ev.reason
