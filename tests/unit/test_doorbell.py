"""The CGI's doorbell: a FIFO the daemon (root) rings once the result is written. Root
must never block on it, follow a link through it, or write into anything but the web
user's own FIFO."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_instance
from tests.fakes import MemoryFirewall
from webknock import spool
from webknock.config import ServerConfig, load
from webknock.daemon import TMP_TTL, Daemon
from webknock.engine import GrantEngine
from webknock.events import EventBus
from webknock.grants import parse_address
from webknock.protocol.v1 import Keys
from webknock.spool import REQUEST_SUFFIX, encode_request, new_request_id
from webknock.spooldirs import WebIdentity, prepare_spool
from webknock.state import StateStore

WEB = pwd.getpwnam("www-data")


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def bells(tmp_path: Path) -> Path:
    directory = tmp_path / "waits"
    directory.mkdir()
    return directory


def test_install_wait_ring_remove(bells: Path) -> None:
    path = str(bells / "a")
    fd = spool.install_bell(path)
    assert not spool.wait_bell(fd, 0.01), "no ring yet: the wait times out"
    assert spool.ring_bell(path, os.getuid())
    assert spool.wait_bell(fd, 5)
    spool.remove_bell(path, fd)
    assert os.listdir(bells) == []
    assert not spool.ring_bell(path, os.getuid()), "no bell any more"


def test_nobody_listening_never_blocks(bells: Path) -> None:
    path = str(bells / "gone")
    os.mkfifo(path, 0o600)  # a CGI that died after making its bell
    started = time.monotonic()
    assert not spool.ring_bell(path, os.getuid())  # ENXIO at once
    assert time.monotonic() - started < 0.5


def test_a_full_pipe_does_not_block_either(bells: Path) -> None:
    path = str(bells / "full")
    fd = spool.install_bell(path)
    while spool.ring_bell(path, os.getuid()):  # bounded by the pipe's size (64 KiB)
        pass
    assert readable(fd)
    spool.remove_bell(path, fd)


def test_root_writes_only_into_the_web_users_own_fifo(bells: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    os.symlink(target, bells / "link")
    assert not spool.ring_bell(str(bells / "link"), WEB.pw_uid)
    (bells / "file").write_bytes(b"keep")
    os.chown(bells / "file", WEB.pw_uid, WEB.pw_gid)
    assert not spool.ring_bell(str(bells / "file"), WEB.pw_uid)
    assert (bells / "file").read_bytes() == b"keep" and target.read_bytes() == b"keep"
    (bells / "dir").mkdir()
    assert not spool.ring_bell(str(bells / "dir"), WEB.pw_uid)
    theirs = str(bells / "roots")  # e.g. a hard link to some FIFO of root's
    fd = spool.install_bell(theirs)
    assert not spool.ring_bell(theirs, WEB.pw_uid)
    assert os.read(fd, 16) == b"", "not the web user's FIFO: not a byte written"
    spool.remove_bell(theirs, fd)


@pytest.fixture
def daemon(vector_keys: Keys) -> Iterator[tuple[Daemon, ServerConfig]]:
    base = Path(tempfile.mkdtemp(prefix="webknock-bell-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    cfg = load(write_instance(base, vector_keys))
    prepare_spool(cfg.spool, WEB.pw_gid)
    engine = GrantEngine(
        cfg.instance, StateStore(cfg.state_file), MemoryFirewall(), EventBus(lambda e: None)
    )
    yield Daemon(cfg, engine, WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid)), cfg
    shutil.rmtree(base)


def spool_with_bell(cfg: ServerConfig, ports: list[tuple[str, int]]) -> tuple[str, int]:
    """What the CGI does: its bell (owned by the web user), then the request."""
    rid = new_request_id()
    bell = str(cfg.spool.waits / rid)
    fd = spool.install_bell(bell)
    os.chown(bell, WEB.pw_uid, WEB.pw_gid)
    payload = encode_request(parse_address("192.0.2.10"), ports, 60, time.time())
    (cfg.spool.requests / f"{rid}{REQUEST_SUFFIX}").write_bytes(payload)
    os.chown(cfg.spool.requests / f"{rid}{REQUEST_SUFFIX}", WEB.pw_uid, WEB.pw_gid)
    return rid, fd


def test_daemon_rings_after_the_result_is_written(daemon: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = daemon
    granted, fd_granted = spool_with_bell(cfg, [("tcp", 22)])
    refused, fd_refused = spool_with_bell(cfg, [("tcp", 23)])  # not offered: rejected
    assert not readable(fd_granted) and not readable(fd_refused)
    d.drain()
    for rid, fd in ((granted, fd_granted), (refused, fd_refused)):
        assert readable(fd), "rung"
        assert (cfg.spool.results / f"{rid}.json").exists(), "and the result was there first"
        spool.remove_bell(str(cfg.spool.waits / rid), fd)


def test_prune_removes_bells_of_cgis_that_died(daemon: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = daemon
    now = time.time()
    old = now - (2 * cfg.result_timeout + TMP_TTL) - 5
    for name in ("dead", "alive"):
        os.mkfifo(cfg.spool.waits / name, 0o600)
    (cfg.spool.waits / "planted").mkdir()
    for name in ("dead", "planted"):
        os.utime(cfg.spool.waits / name, (old, old))
    d.prune()
    assert os.listdir(cfg.spool.waits) == ["alive"]
