"""The privilege boundary: the web user can only drop requests into the spool, and webknockd
trusts nothing it finds there: not the file (links, FIFOs, directories, huge files, other
owners, odd names, races between check and use), not the frame (the address it names, the
agent), not the packet (verified with keys the web user cannot read). Also: rejected/.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.cgi_side import Waiting, frame, open_bell, openports_packet, reply, submit
from tests.conftest import write_instance
from tests.fakes import memory_daemon
from webknock.config import ServerConfig, load
from webknock.protocol import messages, v1
from webknock.protocol.v1 import Keys
from webknock.server import claim
from webknock.server.engine import Outcome
from webknock.server.events import Event
from webknock.server.grants import GrantRequest
from webknock.server.loop import Daemon
from webknock.spool import MAX_REQUEST_BYTES
from webknock.spool import housekeeping as spool_housekeeping
from webknock.spool.request import new_request_id, write_request

Setup = tuple[Daemon, ServerConfig, Keys]


@pytest.fixture
def setup(vector_keys: Keys) -> Iterator[Setup]:
    base = Path(tempfile.mkdtemp(prefix="webknock-hostile-"))
    os.chmod(base, 0o755)  # the web user must reach the spool, as in a real installation
    cfg = load(write_instance(base, vector_keys, throttle_window="60", ts_window="15"))
    d, _ = memory_daemon(cfg)
    yield d, cfg, vector_keys
    shutil.rmtree(base)


def request_bytes(keys: Keys, ip: str = "192.0.2.10") -> bytes:
    """The frame of a valid openports for `ip`, relayed from `ip`."""
    return frame(openports_packet(keys, ip), ip)


def answer(waiting: Waiting) -> tuple[int, str, bytes]:
    """The daemon's answer to a request whose bell was open before the drain."""
    got = waiting.result()
    assert got is not None, f"no answer for {waiting.rid}"
    return got


def granted(d: Daemon) -> list[str]:
    return sorted(str(k) for k in d.engine.firewall.listed())


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


def test_web_user_can_only_drop_requests(setup: Setup) -> None:
    d, cfg, _ = setup
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
    "read keys": lambda: open({str(cfg.keys_file)!r}).close(),
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
        "state": "PermissionError",  # replay marks and bad-packet counts are in there
        "read keys": "PermissionError",  # it cannot seal a packet of its own
    }


def test_nobody_else_reaches_a_bell(setup: Setup) -> None:
    """A bell is writable for "others" (root without CAP_DAC_OVERRIDE must answer into it),
    so the spool's own modes must keep every other user out of it."""
    _, cfg, _ = setup
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


# -- a frame forged by the web user ------------------------------------------------------


def test_a_packet_not_sealed_with_the_keys_opens_nothing(setup: Setup) -> None:
    """The web user writes frames as it likes; a packet it seals itself (it cannot read the
    keys) or makes up does not verify: 403, nothing opened, no reply it could read."""
    d, cfg, keys = setup
    own_keys = Keys.generate()
    data = messages.openports_request("192.0.2.10", [("tcp", 22)], 60, int(time.time()))
    forged = {
        "other keys": v1.encode(own_keys, data),
        "random": os.urandom(512),
        "a real packet, one bit flipped": bytearray(openports_packet(keys)),
    }
    forged["a real packet, one bit flipped"][100] ^= 1  # type: ignore[index]
    bells = {what: submit(cfg, payload=frame(bytes(packet))) for what, packet in forged.items()}
    d.drain()
    assert {what: answer(w) for what, w in bells.items()} == dict.fromkeys(forged, (403, "", b""))
    assert granted(d) == [] and d.engine.store.read().all() == []


def test_a_forged_remote_address_cannot_move_a_packet_to_another_address(setup: Setup) -> None:
    """The packet's ip (sealed) must be the client address the frame names: a packet for
    one address relayed as if from another opens nothing, for neither of them."""
    d, cfg, keys = setup
    stolen = submit(cfg, keys, "192.0.2.10", remote="198.51.100.66")
    own_ip_claimed = submit(cfg, keys, "198.51.100.66", remote="192.0.2.10")
    d.drain()
    for waiting in (stolen, own_ip_claimed):
        assert answer(waiting) == (403, "address mismatch: the server sees another address", b"")
    assert granted(d) == []


@pytest.mark.parametrize(
    ("trusted", "remote", "forwarded", "expected"),
    [
        ("", "192.0.2.10", "198.51.100.66", (403, "address mismatch")),  # no proxy trusted
        ("192.0.2.0/24", "198.51.100.7", "198.51.100.66", (403, "address mismatch")),
        ("192.0.2.0/24", "192.0.2.10", "198.51.100.66", (200, "")),
        ("192.0.2.0/24", "192.0.2.10", "198.51.100.66, 192.0.2.9", (200, "")),
        ("192.0.2.0/24", "192.0.2.10", "not-an-address", (400, "")),
        ("192.0.2.0/24", "192.0.2.10", "fe80::1%eth0", (400, "")),
        ("", "not-an-address", "", (500, "")),
        ("", "", "", (500, "")),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path,
    vector_keys: Keys,
    trusted: str,
    remote: str,
    forwarded: str,
    expected: tuple[int, str],
) -> None:
    cfg = load(write_instance(tmp_path, vector_keys, trusted_proxies=trusted))
    d, fw = memory_daemon(cfg)
    packet = openports_packet(vector_keys, "198.51.100.66")
    waiting = submit(cfg, payload=frame(packet, remote, forwarded=forwarded))
    d.drain()
    status, note, _ = answer(waiting)
    assert (status, note.split(":")[0]) == expected
    assert sorted(str(k.ip) for k in fw.held) == (["198.51.100.66"] if status == 200 else [])


def test_the_grant_source_is_root_s_knowledge_not_the_frame_s(setup: Setup) -> None:
    """Whatever the agent header says, a knock is a knock: "admin" is only webknockctl's
    (tests/unit/test_audit.py), and no header of the frame can name a client."""
    d, cfg, keys = setup
    events: list[Event] = []
    d.engine.events.add(events.append)
    agents = ["admin", "webknockctl", "source=admin", "client=alice"]
    for i, agent in enumerate(agents):
        ip = f"192.0.2.{i + 1}"
        submit(cfg, payload=frame(openports_packet(keys, ip), ip, agent=agent))
    d.drain()
    assert sorted((e.ip, e.kind, e.source, e.client, e.user_agent) for e in events) == [
        (f"192.0.2.{i + 1}", "open", "knock", None, agent) for i, agent in enumerate(agents)
    ]


# -- files that are no request ------------------------------------------------------------


def test_planted_objects_are_refused_and_the_daemon_survives(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, cfg, keys = setup
    req = cfg.spool.requests
    secret = tmp_path / "secret"
    secret.write_bytes(request_bytes(keys))
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
    (req / f"{other}.req").write_bytes(request_bytes(keys))
    os.chown(req / f"{other}.req", 65534, 65534)
    good = new_request_id()
    write_request(str(req), good, request_bytes(keys, "192.0.2.77"))
    bells = {rid: open_bell(cfg, rid) for rid in [*names.values(), deep, other, good]}

    with caplog.at_level(logging.DEBUG):
        d.drain()
        assert granted(d) == ["192.0.2.77:tcp/22"]
        assert reply(keys, bells[good].result())["success"] is True
        for rid in [*names.values(), deep, other]:
            assert answer(bells[rid]) == (400, "", b""), rid
        assert sorted(os.listdir(req)) == sorted(odd), "not requests: not even claimed"
        assert os.listdir(cfg.spool.claimed) == []
        d.housekeeping()
    assert os.listdir(req) == []
    kept = os.listdir(cfg.spool.rejected)
    assert not any(n.startswith((names["dir"], names["huge"])) for n in kept), "not kept"
    assert secret.read_bytes() == secret_bytes
    assert (canary / "keep").read_text() == "keep", "the removal never followed the planted link"
    assert not [r for r in caplog.records if "\n" in r.getMessage()], "no forged log lines"


def test_claim_collision_with_a_planted_directory(setup: Setup) -> None:
    """A name still in claimed/ (could not be removed) planted again as a directory."""
    d, cfg, keys = setup
    rid = new_request_id()
    (cfg.spool.claimed / f"{rid}.req").mkdir()
    (cfg.spool.claimed / f"{rid}.req" / "x").write_text("x")
    (cfg.spool.requests / f"{rid}.req").write_bytes(request_bytes(keys))
    d.drain()
    d.drain()
    assert os.listdir(cfg.spool.requests) == [] and os.listdir(cfg.spool.claimed) == []
    assert granted(d) == []


def test_request_rewritten_after_claim_is_bounded(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The web user keeps its fd after the claim: whatever it writes, root reads at most
    MAX_REQUEST_BYTES + 1 and checks exactly what it read."""
    d, cfg, keys = setup
    waiting = open_bell(cfg)
    path = write_request(str(cfg.spool.requests), waiting.rid, request_bytes(keys))
    fd = os.open(path, os.O_WRONLY)
    try:
        real_read = os.read

        def racing_read(f: int, n: int) -> bytes:
            os.pwrite(fd, b" " * (2 * MAX_REQUEST_BYTES), 0)  # grows between fstat and read
            assert n == MAX_REQUEST_BYTES + 1
            return real_read(f, n)

        with monkeypatch.context() as mp:
            mp.setattr(os, "read", racing_read)
            d.drain()
    finally:
        os.close(fd)
    assert answer(waiting) == (400, "", b"")
    assert granted(d) == []


def test_flood_of_requests_is_drained_in_bounded_batches(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, cfg, keys = setup
    monkeypatch.setattr(claim, "MAX_BATCH", 50)
    for i in range(180):
        ip = f"198.18.0.{i % 250 + 1}"
        write_request(str(cfg.spool.requests), new_request_id(), request_bytes(keys, ip))
    batches: list[int] = []
    real_open = d.engine.open

    def counting(requests: Sequence[GrantRequest], now: float) -> dict[str, Outcome]:
        batches.append(len(requests))
        return real_open(requests, now)

    d.engine.open = counting  # type: ignore[method-assign]
    assert d.drain() == 180
    assert max(batches) <= 50 and sum(batches) == 180
    assert len(granted(d)) == 180


def test_rejected_keeps_at_most_the_newest(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    d, cfg, _ = setup
    monkeypatch.setattr(spool_housekeeping, "KEEP_REJECTED", 3)
    for i in range(6):
        path = cfg.spool.rejected / f"r{i}"
        path.write_text("x")
        os.utime(path, (1000 + i, 1000 + i))
    (cfg.spool.rejected / "zdir").mkdir()
    (cfg.spool.rejected / "zdir" / "inside").write_text("x")
    os.utime(cfg.spool.rejected / "zdir", (1, 1))
    d.housekeeping()  # the directory, the oldest, goes as well
    assert sorted(os.listdir(cfg.spool.rejected)) == ["r3", "r4", "r5"]


@pytest.mark.parametrize(
    "ts",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999",
        b"1.7e9",
        b'"1e9"',
        b"true",
        b"9" * 1900,
        b'"\\u0661"',  # a digit to str.isdigit(), the number 1 to int()
    ],
)
def test_sealed_timestamps_out_of_any_range_are_refused(setup: Setup, ts: bytes) -> None:
    """A client holding the keys may still send nonsense: refused with 403, not a crash."""
    d, cfg, keys = setup
    data = b'{"api":"openports","ip":"192.0.2.10","ports":[{"proto":"tcp","num":22}],'
    data += b'"time":60,"ver":1,"ts":' + ts + b"}"
    waiting = submit(cfg, payload=frame(v1.encode(keys, data)))
    d.drain()
    assert answer(waiting)[0] == 403
    assert granted(d) == []


def test_malformed_files_are_counted_not_logged_one_by_one(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of malformed request files costs one warning per housekeeping, not one per
    file, and no event; what names them in a debug line cannot forge a log line."""
    d, cfg, _ = setup
    events: list[Event] = []
    d.engine.events.add(events.append)
    for _ in range(50):
        submit(cfg, payload=b"webknock-spool 2\nfield=v1\nremote=x\nFAKE\n")
    (cfg.spool.requests / "evil\nname").write_text("x")
    with caplog.at_level(logging.INFO):
        d.drain()
        assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
        d.housekeeping()
        d.housekeeping()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        "removed 1 unexpected spool entry",
        "refused 50 malformed spool file(s)",
    ]
    assert events == []
