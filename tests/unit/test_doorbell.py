"""The CGI's doorbell: a FIFO through which the daemon (root) hands the CGI its result.
Root must never block on it, follow a link through it, or write into anything but the web
user's own FIFO (or root's); the CGI never takes a bad or missing answer for a success."""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import ANY

import pytest

from tests.cgi_side import submit
from tests.conftest import REPO, write_instance
from tests.fakes import MemoryFirewall
from tests.lab import unit_bounding_set
from webknock import doorbell, spool
from webknock.config import ServerConfig, load
from webknock.daemon import TMP_TTL, Daemon
from webknock.engine import GrantEngine
from webknock.events import EventBus
from webknock.protocol.v1 import Keys
from webknock.spooldirs import WebIdentity, prepare_spool
from webknock.state import StateStore

WEB = pwd.getpwnam("www-data")
ME = frozenset({os.getuid()})
THEIRS = frozenset({WEB.pw_uid})


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def bells(tmp_path: Path) -> Path:
    directory = tmp_path / "waits"
    directory.mkdir()
    return directory


RESULT = doorbell.result_payload(True, expires=1234.5, ports=[["tcp", 22]])


def test_install_wait_deliver_remove(bells: Path) -> None:
    path = str(bells / "a")
    fd = spool.install_bell(path)
    assert os.stat(path).st_mode & 0o7777 == spool.BELL_MODE, "whatever the umask"
    assert doorbell.wait_bell(fd, 0.01) is None, "no answer yet: the wait times out"
    assert doorbell.deliver(path, ME, RESULT)
    assert doorbell.wait_bell(fd, 5) == {
        "v": 1,
        "ok": True,
        "expires": 1234.5,
        "ports": [["tcp", 22]],
    }
    spool.remove_bell(path, fd)
    assert os.listdir(bells) == []
    assert not doorbell.deliver(path, ME, RESULT), "no bell any more"


def test_root_without_dac_override_can_answer(bells: Path) -> None:
    """webknockd runs with the unit's capabilities: no CAP_DAC_OVERRIDE. The bell's mode
    must let it write all the same (and only it: others cannot reach waits/)."""
    path = str(bells / "b")
    fd = spool.install_bell(path)
    os.chown(path, WEB.pw_uid, WEB.pw_gid)
    os.chmod(bells, 0o1730)
    code = (
        "import sys; from webknock import doorbell; "
        f"sys.exit(0 if doorbell.deliver({path!r}, frozenset({{{WEB.pw_uid}}}), {RESULT!r}) else 1)"
    )
    caps = unit_bounding_set()
    subprocess.run(
        ["setpriv", "--no-new-privs", f"--bounding-set={caps}", sys.executable, "-c", code],
        check=True,
        cwd=REPO,
    )
    assert doorbell.wait_bell(fd, 5) == json.loads(RESULT)
    spool.remove_bell(path, fd)


def test_the_bounding_set_of_that_test_is_the_units() -> None:
    assert unit_bounding_set() == "-all,+net_admin,+net_raw,+chown,+dac_read_search"


@pytest.mark.parametrize(
    ("written", "seen"),
    [
        (b"", doorbell.NO_RESULT),  # opened and closed: no answer is no success
        (b"yes", doorbell.UNREADABLE),
        (b'{"v": 1, "ok": "yes"}', doorbell.UNREADABLE),
        (b"\xff\xfe", doorbell.UNREADABLE),
        (b"[" * 4000, doorbell.UNREADABLE),
    ],
)
def test_a_bad_answer_is_never_a_success(bells: Path, written: bytes, seen: object) -> None:
    path = str(bells / "c")
    fd = spool.install_bell(path)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, written)
    os.close(writer)
    assert doorbell.wait_bell(fd, 5) == seen
    spool.remove_bell(path, fd)


def test_a_result_too_big_for_one_write_is_refused(bells: Path) -> None:
    path = str(bells / "d")
    fd = spool.install_bell(path)
    with pytest.raises(ValueError, match="does not fit"):
        doorbell.deliver(path, ME, b" " * (doorbell.MAX_RESULT_BYTES + 1))
    spool.remove_bell(path, fd)


def test_nobody_listening_never_blocks(bells: Path) -> None:
    path = str(bells / "gone")
    os.mkfifo(path, 0o600)  # a CGI that died after making its bell
    started = time.monotonic()
    assert not doorbell.deliver(path, ME, RESULT)  # ENXIO at once
    assert time.monotonic() - started < 0.5


def test_a_full_pipe_does_not_block_either(bells: Path) -> None:
    path = str(bells / "full")
    fd = spool.install_bell(path)
    while doorbell.deliver(path, ME, RESULT):  # bounded by the pipe's size (64 KiB)
        pass
    assert readable(fd)
    spool.remove_bell(path, fd)


def test_root_writes_only_into_the_web_users_own_fifo(bells: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    os.symlink(target, bells / "link")
    assert not doorbell.deliver(str(bells / "link"), THEIRS, RESULT)
    (bells / "file").write_bytes(b"keep")
    os.chown(bells / "file", WEB.pw_uid, WEB.pw_gid)
    assert not doorbell.deliver(str(bells / "file"), THEIRS, RESULT)
    assert (bells / "file").read_bytes() == b"keep" and target.read_bytes() == b"keep"
    (bells / "dir").mkdir()
    assert not doorbell.deliver(str(bells / "dir"), THEIRS, RESULT)
    roots = str(tmp_path / "initctl")  # some FIFO of root's, and a hard link to it
    fd = spool.install_bell(roots)
    os.link(roots, bells / "hardlink")
    assert not doorbell.deliver(str(bells / "hardlink"), frozenset({0}), RESULT)
    assert os.read(fd, 16) == b"", "a FIFO of two names: not a byte written"
    mine = str(bells / "mine")
    fd_mine = spool.install_bell(mine)  # root's own, one name: a CGI running as root
    assert not doorbell.deliver(mine, THEIRS, RESULT), "not the given owner's"
    assert os.read(fd_mine, 16) == b""
    spool.remove_bell(roots, fd)
    spool.remove_bell(mine, fd_mine)


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


def test_daemon_answers_through_each_bell(daemon: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = daemon
    granted = submit(cfg, ports=[("tcp", 22)])
    refused = submit(cfg, ports=[("tcp", 23)])  # not offered: rejected
    assert not readable(granted.fd) and not readable(refused.fd)
    d.drain()
    assert granted.result() == {"v": 1, "ok": True, "expires": ANY, "ports": [["tcp", 22]]}
    assert refused.result() == {
        "v": 1,
        "ok": False,
        "error": "request refused by the server",
        "errorcode": "INVALID",
    }


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
