"""The spool's housekeeping (webknock.spool.housekeeping): whatever the web user leaves or
plants in requests/ and waits/ goes with one prune, or is logged once and skipped; it
never keeps a valid request out of a batch, and it needs no CAP_DAC_OVERRIDE (webknockd
runs without it) even for a directory the web user made unremovable for such a root."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cgi_side import WEB, reply, submit
from tests.conftest import REPO, write_instance
from tests.fakes import memory_daemon
from webknock.config import ServerConfig, load
from webknock.protocol.v1 import Keys
from webknock.spool import MAX_REQUEST_BYTES
from webknock.spool import housekeeping as spool_housekeeping
from webknock.spool.housekeeping import TMP_TTL, SpoolKeeper, remove_entry
from webknock.spool.mount import prepare_spool
from webknock.spool.request import new_request_id

BELL_TTL = 100.0
YEAR_2100 = 4_102_444_800.0
TIB = 1 << 40


@pytest.fixture
def cfg(tmp_path: Path, vector_keys: Keys) -> ServerConfig:
    config = load(write_instance(tmp_path, vector_keys))
    prepare_spool(config.spool, WEB.pw_gid)
    return config


@pytest.fixture
def keeper(cfg: ServerConfig) -> SpoolKeeper:
    return SpoolKeeper(cfg.spool, BELL_TTL, time.time)


def give_to_web_user(path: Path, mode: int) -> None:
    """What the web user could have made itself: its own, with `mode`."""
    os.lchown(path, WEB.pw_uid, WEB.pw_gid)
    if not path.is_symlink():
        os.chmod(path, mode)


def locked_directory(path: Path, depth: int = 2) -> None:
    """A directory tree of the web user's, 0500 at every level, a 0400 file in each: a root
    without CAP_DAC_OVERRIDE can neither empty nor remove it as it is."""
    path.mkdir()
    (path / "file").write_bytes(b"x" * 100)
    give_to_web_user(path / "file", 0o400)
    if depth > 1:
        locked_directory(path / "inner", depth - 1)
    give_to_web_user(path, 0o500)


def age(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def warnings_and_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_one_prune_removes_everything_planted(
    cfg: ServerConfig,
    keeper: SpoolKeeper,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    req, waits = cfg.spool.requests, cfg.spool.waits
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    # what may stay: a young request, temp file and doorbell
    young = {
        req: [f"{new_request_id()}.req", f".{new_request_id()}.tmp"],
        waits: [new_request_id()],
    }
    for name in young[req]:
        (req / name).write_bytes(b"x")
    os.mkfifo(waits / young[waits][0])
    # entries of a name and kind the spool may hold, dated by hand into the future
    future = [req / f"{new_request_id()}.req", req / f".{new_request_id()}.tmp"]
    future.append(waits / new_request_id())
    for path in future[:2]:
        path.write_bytes(b"x")
    os.mkfifo(future[2])
    # entries of a kind or name the spool never holds
    planted = [
        req / f"{new_request_id()}.req",  # 0500 directory tree of the web user's
        req / f"{new_request_id()}.req",  # 1 TiB, sparse
        req / f"{new_request_id()}.req",  # symlink to a file of root's
        req / "link-to-a-directory",
        req / f"{new_request_id()}.req",  # FIFO
        req / f"{new_request_id()}.req",  # socket
        req / "junk",
        req / "x\nFAKE LOG LINE",
        req / "\udcff\udcfe.req",
        req / ("A" * 250),
        req / ".abc.tmp",
        req / "-rf",
        req / f"{new_request_id()}.req.tmp",
        waits / f"{new_request_id()}.req",  # a FIFO of another name
        waits / new_request_id(),  # a regular file
        waits / new_request_id(),  # a directory
        waits / new_request_id(),  # a symlink to a FIFO elsewhere
    ]
    locked_directory(planted[0])
    with open(planted[1], "wb") as fh:
        os.truncate(fh.fileno(), TIB)
    os.symlink("/etc/passwd", planted[2])
    os.symlink(canary, planted[3])
    os.mkfifo(planted[4])
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s"))
        os.rename(tmp_path / "s", planted[5])
    for path in planted[6:13]:
        path.write_bytes(b"{}")
    os.mkfifo(planted[13])
    planted[14].write_bytes(b"x")
    planted[15].mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", planted[16])
    for path in [*future, *planted]:
        if path != planted[0]:
            give_to_web_user(path, 0o640)
        age(path, YEAR_2100)  # nothing is spared for being dated in the future
    passwd = Path("/etc/passwd").read_bytes()

    with caplog.at_level(logging.DEBUG):
        keeper.prune()
        assert sorted(os.listdir(req)) == sorted(young[req])
        assert os.listdir(waits) == young[waits]
        assert warnings_and_errors(caplog) == [
            f"removed {len(planted)} unexpected spool entries"
        ], "one line, however many; what is dated ahead is not counted as unexpected"
        caplog.clear()
        keeper.prune()
        assert caplog.records == [], "a second prune has nothing to say"
    assert (canary / "keep").read_text() == "keep" and canary.is_dir()
    assert Path("/etc/passwd").read_bytes() == passwd
    assert (tmp_path / "fifo").exists()


def test_temp_files_requests_and_bells_expire(cfg: ServerConfig, keeper: SpoolKeeper) -> None:
    """A temp file its CGI abandoned, a request nobody claimed for that long (stuck), a
    doorbell older than any CGI waits: gone; young ones stay."""
    now = time.time()
    req, waits = cfg.spool.requests, cfg.spool.waits
    young: list[Path] = []
    for directory, name, ttl in (
        (req, f".{new_request_id()}.tmp", TMP_TTL),
        (req, f"{new_request_id()}.req", TMP_TTL),
        (waits, new_request_id(), BELL_TTL),
    ):
        old, new = directory / name, directory / name.replace(name.strip(".")[:32], "f" * 32)
        for path in (old, new):
            if directory == waits:
                os.mkfifo(path)
            else:
                path.write_bytes(b"x")
        age(old, now - ttl - 1)
        age(new, now - ttl + 5)
        young.append(new)
    keeper.prune()
    assert sorted(os.listdir(req)) == sorted(p.name for p in young if p.parent == req)
    assert os.listdir(waits) == ["f" * 32]


def test_what_cannot_be_removed_is_logged_once_and_skipped(
    cfg: ServerConfig,
    keeper: SpoolKeeper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(spool_housekeeping, "MAX_DEPTH", 3)
    deep = cfg.spool.requests / "deep"
    path = deep
    for level in range(5):
        path = path / f"level{level}"
    path.mkdir(parents=True)
    (cfg.spool.requests / "junk").write_text("x")
    with caplog.at_level(logging.DEBUG):
        keeper.prune()
        messages = warnings_and_errors(caplog)
        assert len(messages) == 2, messages
        assert messages[0].startswith(f"cannot remove spool entry {cfg.spool.requests}/'deep'")
        assert messages[0].endswith("(skipped from now on)")
        assert messages[1] == "removed 1 unexpected spool entry", "only what went"
        caplog.clear()
        for _ in range(3):
            keeper.prune()
        assert caplog.records == []
    assert os.listdir(cfg.spool.requests) == ["deep"]


def test_junk_names_never_keep_a_valid_request_out_of_a_batch(
    cfg: ServerConfig, vector_keys: Keys
) -> None:
    """5000 planted names (a batch's worth) in requests/: the next drain, from a listing or
    from inotify's names, claims only requests, and the valid one is granted."""
    d, fw = memory_daemon(cfg)
    d.drain()
    junk = [f"junk-{i:05d}" for i in range(5000)]
    for name in junk:
        (cfg.spool.requests / name).touch()
    listed = submit(cfg, vector_keys, "192.0.2.10")
    assert d.drain() == 1
    assert reply(vector_keys, listed.result())["success"] is True
    named = submit(cfg, vector_keys, "192.0.2.11")
    assert d.drain([*junk, f"{named.rid}.req"]) == 1
    assert reply(vector_keys, named.result())["success"] is True
    assert len(fw.held) == 2
    d.housekeeping()
    assert os.listdir(cfg.spool.requests) == []


def test_a_batch_of_malformed_requests_delays_a_valid_one_by_no_drain(
    cfg: ServerConfig, vector_keys: Keys
) -> None:
    """5000 files named as requests that are none fill a whole batch: the same drain goes on
    to the next batch, which has the valid request."""
    d, _ = memory_daemon(cfg)
    d.drain()
    for _ in range(5000):
        path = cfg.spool.requests / f"{'0' + new_request_id()[1:]}.req"  # sorted first
        path.write_bytes(b"not a frame")
    valid = submit(cfg, vector_keys, "192.0.2.10")
    while valid.rid.startswith("0"):  # (claimed in name order: the valid one last)
        valid = submit(cfg, vector_keys, "192.0.2.10")
    assert d.drain() >= 5001
    assert reply(vector_keys, valid.result())["success"] is True
    assert d.refusals.malformed == 5000
    d.housekeeping()
    assert len(os.listdir(cfg.spool.rejected)) == spool_housekeeping.KEEP_REJECTED


def test_set_aside_keeps_only_a_small_regular_file(
    cfg: ServerConfig, keeper: SpoolKeeper, tmp_path: Path
) -> None:
    claimed = cfg.spool.claimed
    small, big, tree, link = (claimed / f"{new_request_id()}.req" for _ in range(4))
    small.write_bytes(b"x" * MAX_REQUEST_BYTES)
    with open(big, "wb") as fh:
        os.truncate(fh.fileno(), MAX_REQUEST_BYTES + 1)
    locked_directory(tree)
    (tmp_path / "target").write_text("target")
    os.symlink(tmp_path / "target", link)
    for path in (small, big, tree, link):
        keeper.set_aside(path, path.name)
    keeper.set_aside(claimed / "gone", "gone")  # withdrawn meanwhile: nothing to do
    assert os.listdir(claimed) == []
    (kept,) = os.listdir(cfg.spool.rejected)
    assert kept.startswith(f"{small.name}.") and (tmp_path / "target").read_text() == "target"


def test_remove_entry_never_follows_a_link(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    parent = tmp_path / "spool"
    parent.mkdir()
    (parent / "dir").mkdir()
    os.symlink(canary, parent / "dir" / "escape")
    os.symlink(canary, parent / "link")
    remove_entry(str(parent), "dir")
    remove_entry(str(parent), "link")
    assert os.listdir(parent) == [] and (canary / "keep").read_text() == "keep"
    with pytest.raises(FileNotFoundError):
        remove_entry(str(parent), "gone")


# -- without CAP_DAC_OVERRIDE, as webknockd runs -----------------------------------------

CHILD = """
import json, logging, os, shutil, sys
from pathlib import Path
from webknock.config import SpoolPaths
from webknock.spool.housekeeping import SpoolKeeper, remove_entry

logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s")
spool, copy = SpoolPaths(Path(sys.argv[1])), sys.argv[2]
out = {"caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0]}
try:
    shutil.rmtree(copy)
    out["rmtree"] = "ok"
except OSError as exc:
    out["rmtree"] = type(exc).__name__
real_fchown = os.fchown
os.fchown = lambda fd, uid, gid: None
try:
    remove_entry(str(spool.requests), "without-fchown")
    out["without fchown"] = "ok"
except OSError as exc:
    out["without fchown"] = type(exc).__name__
os.fchown = real_fchown
SpoolKeeper(spool, 100.0, __import__("time").time).prune()
out["requests"] = sorted(os.listdir(spool.requests))
out["waits"] = sorted(os.listdir(spool.waits))
print(json.dumps(out))
"""


def without_dac_override(*args: str) -> tuple[dict[str, object], str]:
    """Run CHILD as root with only CAP_CHOWN and CAP_DAC_READ_SEARCH (webknockd's unit keeps
    no CAP_DAC_OVERRIDE); its JSON and its log."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv(1) missing")
    proc = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all,+chown,+dac_read_search",
            "--reuid=0",
            sys.executable,
            "-c",
            CHILD,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, object] = json.loads(proc.stdout)
    return out, proc.stderr


def test_a_locked_directory_of_the_web_user_goes_without_dac_override(
    cfg: ServerConfig, tmp_path: Path
) -> None:
    """A 0500 directory tree of the web user's with files inside: root without
    CAP_DAC_OVERRIDE cannot empty it (rmtree fails), remove_entry can, because it first
    gives each directory to root (fchown, CAP_CHOWN) and opens it up (fchmod): without the
    fchown it fails too. One prune removes it and everything else planted."""
    req, waits = cfg.spool.requests, cfg.spool.waits
    locked_directory(tmp_path / "copy", depth=3)
    locked_directory(req / "without-fchown")
    locked_directory(req / f"{new_request_id()}.req", depth=3)
    locked_directory(req / "junk", depth=1)
    locked_directory(waits / new_request_id())
    (req / "file").write_bytes(b"x")
    give_to_web_user(req / "file", 0o400)
    keep = f"{new_request_id()}.req"
    (req / keep).write_bytes(b"x")
    give_to_web_user(req / keep, 0o640)
    out, log = without_dac_override(str(cfg.spool_dir), str(tmp_path / "copy"))
    caps = int(str(out["caps"]), 16)
    assert caps == (1 << 0) | (1 << 2), "CAP_CHOWN and CAP_DAC_READ_SEARCH only"
    assert out["rmtree"] == "PermissionError", "the 0500 tree defeats a root without the cap"
    assert out["without fchown"] == "PermissionError", "fchown is what makes it removable"
    assert out["requests"] == [keep] and out["waits"] == []
    assert "ERROR" not in log and "removed 5 unexpected spool entries" in log
    st = os.lstat(tmp_path / "copy")
    assert stat.S_IMODE(st.st_mode) == 0o500 and st.st_uid == WEB.pw_uid


@pytest.fixture(autouse=True)
def _unlock(tmp_path: Path) -> Iterator[None]:
    """Leave nothing the test's tmp_path cleanup could trip over."""
    yield
    for root, dirs, _ in os.walk(tmp_path):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
